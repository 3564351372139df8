"""`train-gaussian-prior`: the 5x5 Gaussian score prior (section IV.A).

Trains the paper's three-layer MLP by implicit score matching (eq. 5) on
samples of N(mu, I) and exports it as a SavedModel version under
--export_dir (default mtd_priors/gaussian_fc/<next free version>).
Checkpoints resume automatically; Ctrl-C saves one and exits.

Example:
  train-gaussian-prior --steps=6000 --export_dir=mtd_priors/gaussian_fc
"""

import os

from mtd_tf import cli
from trainers import configs

NAME = "gaussian_fc"
# This tool's defaults where they differ from `configs.TrainConfig`'s.
DEFAULTS = dict(
  name=NAME,
  steps=6000,
  batch_size=256,
  export_dir=os.path.join("mtd_priors", NAME),
)


def define_flags(fv):
  cli.define_config_flags(fv, configs.TrainConfig, defaults=DEFAULTS)
  cli.define_config_flags(fv, configs.GaussianDataConfig)


def main(fv):
  config = cli.config_from_flags(fv, configs.TrainConfig)
  data = cli.config_from_flags(fv, configs.GaussianDataConfig)
  if config.export_dir:
    try:
      configs.check_export_dir(config.export_dir)
    except configs.TrainingError as err:
      raise cli.UsageError(str(err)) from None
  # Loads TensorFlow: imported only now so that --help stays fast.
  from trainers import gaussian_prior

  print(gaussian_prior.train_gaussian_prior(config, data).summary())


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
