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
from trainers import flags_common

NAME = "mnist_unet"
# This tool's defaults where they differ from `configs.TrainConfig`'s.
DEFAULTS = dict(
  name=NAME,
  steps=20000,
  warmup_steps=200,
  export_dir=os.path.join("mtd_priors", NAME),
)


def define_flags(fv):
  flags_common.define_config_flags(fv, configs.TrainConfig, **DEFAULTS)
  flags_common.define_config_flags(fv, configs.MnistDataConfig)


def main(fv):
  config = flags_common.config_from_flags(fv, configs.TrainConfig)
  data = flags_common.config_from_flags(fv, configs.MnistDataConfig)
  # Loads TensorFlow: imported only now so that --help stays fast.
  from trainers import mnist_prior  # pylint: disable=g-import-not-at-top

  flags_common.print_summary(mnist_prior.train_mnist_prior(config, data))


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
