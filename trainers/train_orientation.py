"""`train-orientation`: a prior's orientation classifier (the gauge).

Trains a classifier of quarter turns on the MNIST train split (the prior's
own training digits; x_test is never read) and exports a new version of the
prior holding its unchanged score network and the classifier (signature
``orientation``), which `gauge` then uses to put estimates upright
(`mtd_tf.priors.orientation`). The defaults are those of the shipped
``mnist_unet/3``. Ctrl-C stops it before anything is written.

Example:
  train-orientation --mnist_npz=mnist.npz --source=mnist_unet/2 \\
      --export_dir=saved_models/mnist_unet
"""

import dataclasses
import os

from absl import flags

from mtd_tf import cli
from mtd_tf.priors import orientation  # numpy only: --help stays fast
from trainers import flags_common

_HELP = {
  "epochs": "Passes over the digits (fresh turns and noise each).",
  "batch_size": "Examples per step.",
  "learning_rate": "Adam's rate.",
  "max_blur": "Largest blur sd (pixels) of an example.",
  "max_noise": "Largest noise sd of an example (images in [0, 1]).",
  "heldout": "Train-split digits held out at the end.",
  "seed": "Seed of init, turns and noise.",
}


def define_flags(fv):
  flags.DEFINE_string(
    "source",
    "mnist_unet/2",
    "Prior to extend: a shipped name or a version folder exported with its "
    "Keras model.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "export_dir",
    os.path.join("mtd_priors", "mnist_unet"),
    "Model folder the new version is written into.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "export_version",
    None,
    "Version number to write (default: the next free one; an existing one "
    "is refused).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "mnist_npz",
    "",
    "MNIST npz in keras.datasets.mnist layout (only x_train is read). "
    "Empty: download with keras.datasets.mnist.load_data().",
    flag_values=fv,
  )
  # One flag per OrientationConfig field, with its default.
  for field in dataclasses.fields(orientation.OrientationConfig):
    define = flags.DEFINE_float if field.type is float else flags.DEFINE_integer
    define(field.name, field.default, _HELP[field.name], flag_values=fv)


def main(fv):
  from trainers import training  # pylint: disable=g-import-not-at-top

  config = flags_common.usage_checked(
    orientation.OrientationConfig,
    **{
      f.name: getattr(fv, f.name)
      for f in dataclasses.fields(orientation.OrientationConfig)
    },
  )
  path = training.train_orientation_prior(
    fv.source,
    fv.export_dir,
    config,
    mnist_npz=fv.mnist_npz,
    version=fv.export_version,
  )
  print(f"Exported {path}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
