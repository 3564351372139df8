"""`train-mnist-prior`: the MNIST score prior (section IV.B).

Trains a time-conditioned U-Net by denoising score matching (eq. 7) on the
MNIST train split and exports it as a SavedModel version under --export_dir
(default mtd_priors/mnist_unet/<next free version>). Checkpoints resume
automatically; Ctrl-C saves one and exits; --export_only exports the run's
latest checkpoint.

Example:
  train-mnist-prior --mnist_npz=mnist.npz --steps=20000
"""

import os

from mtd_tf import cli
from trainers import configs

NAME = "mnist_unet"
# This tool's defaults where they differ from `configs.TrainConfig`'s.
DEFAULTS = dict(
  name=NAME,
  steps=20000,
  warmup_steps=200,
  export_dir=os.path.join("mtd_priors", NAME),
)


def define_flags(fv):
  cli.define_config_flags(fv, configs.TrainConfig, defaults=DEFAULTS)
  cli.define_config_flags(fv, configs.MnistDataConfig)


def main(fv):
  config = cli.config_from_flags(fv, configs.TrainConfig)
  data = cli.config_from_flags(fv, configs.MnistDataConfig)
  if config.export_dir:
    try:
      configs.check_export_dir(config.export_dir)
    except configs.TrainingError as err:
      raise cli.UsageError(str(err)) from None
  # Loads TensorFlow: imported only now so that --help stays fast.
  from trainers import mnist_prior

  print(mnist_prior.train_mnist_prior(config, data).summary())


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
