"""`train-mnist-prior`: the MNIST score prior (section IV.B).

Trains a time-conditioned U-Net by denoising score matching (eq. 7) on the
MNIST train split and exports it as a SavedModel version under --export_dir
(default mtd_priors/mnist_unet/<next free version>). Checkpoints resume
automatically; Ctrl-C saves one and exits; --export_only exports the run's
latest checkpoint.

Example:
  train-mnist-prior --mnist_npz=mnist.npz --steps=20000
"""

from absl import flags

from mtd_tf import cli
from trainers import flags_common


def define_flags(fv):
  flags_common.define_common_flags(
    fv,
    "mnist_unet",
    steps=20000,
    batch_size=64,
    learning_rate=1e-3,
    warmup_steps=200,
    ema_decay=0.999,
  )
  flags.DEFINE_string(
    "mnist_npz",
    "",
    "MNIST npz in keras.datasets.mnist layout (only "
    "x_train is read). Empty: download with "
    "keras.datasets.mnist.load_data().",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "heldout", 1024, "Train-split images held out at the end.", flag_values=fv
  )
  flags.DEFINE_list(
    "channels",
    ["32", "64", "128"],
    "U-Net channels per resolution level.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "embed_dim", 128, "Time-embedding width.", flag_values=fv
  )
  flags.DEFINE_enum(
    "activation",
    "swish",
    ["swish", "logsigmoid", "softplus"],
    "Activation ('logsigmoid' is the paper's).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "eps", 1e-5, "Smallest diffusion time of the loss.", flag_values=fv
  )


def main(fv):
  from trainers import training  # pylint: disable=g-import-not-at-top

  config = flags_common.train_config_from_flags(fv)
  try:
    channels = tuple(int(c) for c in fv.channels)
  except ValueError as err:
    raise cli.UsageError(
      f"--channels={','.join(fv.channels)}: give integers such as 32,64,128."
    ) from err
  data = flags_common.usage_checked(
    training.MnistDataConfig,
    mnist_npz=fv.mnist_npz,
    heldout=fv.heldout,
    channels=channels,
    embed_dim=fv.embed_dim,
    activation=fv.activation,
    eps=fv.eps,
  )
  flags_common.print_summary(training.train_mnist_prior(config, data))


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
