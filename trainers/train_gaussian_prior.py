"""`train-gaussian-prior`: the 5x5 Gaussian score prior (section IV.A).

Trains the paper's three-layer MLP by implicit score matching (eq. 5) on
samples of N(mu, I) and exports it as a SavedModel version under
--export_dir (default mtd_priors/gaussian_fc/<next free version>).
Checkpoints resume automatically; Ctrl-C saves one and exits.

Example:
  train-gaussian-prior --steps=6000 --export_dir=mtd_priors/gaussian_fc
"""

from absl import flags

from mtd_tf import cli
from trainers import flags_common


def define_flags(fv):
  flags_common.define_common_flags(
    fv,
    "gaussian_fc",
    steps=6000,
    batch_size=256,
    learning_rate=1e-3,
    warmup_steps=100,
    ema_decay=0.999,
  )
  flags.DEFINE_integer(
    "image_size", 5, "L of the Gaussian images.", flag_values=fv
  )
  flags.DEFINE_integer(
    "num_samples", 10000, "Training samples of N(mu, I).", flag_values=fv
  )
  flags.DEFINE_integer(
    "mu_seed", 2024, "Seed of the one draw of mu.", flag_values=fv
  )
  flags.DEFINE_integer(
    "data_seed", 1, "Seed of the training samples.", flag_values=fv
  )
  flags.DEFINE_integer(
    "hidden", 256, "Hidden width of the MLP.", flag_values=fv
  )


def main(fv):
  from trainers import training  # pylint: disable=g-import-not-at-top

  config = flags_common.train_config_from_flags(fv)
  data = flags_common.usage_checked(
    training.GaussianDataConfig,
    image_size=fv.image_size,
    num_samples=fv.num_samples,
    mu_seed=fv.mu_seed,
    data_seed=fv.data_seed,
    hidden=fv.hidden,
  )
  flags_common.print_summary(training.train_gaussian_prior(config, data))


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
