"""`train-orientation`: a prior's orientation classifier (the gauge).

Trains a classifier of quarter turns on the MNIST train split (the prior's
own training digits; x_test is never read) and exports a new version of the
prior holding its unchanged score network and the classifier (signature
``orientation``), which `gauge` then uses to put estimates upright
(`mtd_tf.orientation`). Ctrl-C stops it before anything is written.

Example:
  train-orientation --mnist_npz=mnist.npz --source=mnist_unet/2 \\
      --export_dir=saved_models/mnist_unet
"""

import os

from absl import flags

from mtd_tf import cli


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
  flags.DEFINE_integer("epochs", 12, "Passes over the digits.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 128, "Examples per step.", flag_values=fv)
  flags.DEFINE_float("learning_rate", 1e-3, "Adam's rate.", flag_values=fv)
  flags.DEFINE_float(
    "max_blur", 1.2, "Largest blur sd (pixels) of an example.", flag_values=fv
  )
  flags.DEFINE_float(
    "max_noise", 0.2, "Largest noise sd of an example.", flag_values=fv
  )
  flags.DEFINE_integer(
    "heldout", 1024, "Train-split digits held out at the end.", flag_values=fv
  )
  flags.DEFINE_integer(
    "seed", 0, "Seed of init, turns and noise.", flag_values=fv
  )


def main(fv):
  from mtd_tf import datasets  # pylint: disable=g-import-not-at-top
  from mtd_tf import orientation  # pylint: disable=g-import-not-at-top
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  from trainers import training  # pylint: disable=g-import-not-at-top

  try:
    config = orientation.OrientationConfig(
      epochs=fv.epochs,
      batch_size=fv.batch_size,
      learning_rate=fv.learning_rate,
      max_blur=fv.max_blur,
      max_noise=fv.max_noise,
      heldout=fv.heldout,
      seed=fv.seed,
    )
  except orientation.OrientationError as err:
    raise cli.UsageError(str(err)) from err
  if fv.mnist_npz and not os.path.isfile(fv.mnist_npz):
    raise cli.UsageError(
      f"--mnist_npz={fv.mnist_npz} does not exist: pass the mnist.npz file."
    )
  try:
    path = training.train_orientation_prior(
      fv.source,
      fv.export_dir,
      config,
      mnist_npz=fv.mnist_npz,
      version=fv.export_version,
    )
  except (
    priors.PriorError,
    orientation.OrientationError,
    datasets.DatasetError,
  ) as err:
    raise cli.UsageError(str(err)) from err
  print(f"Exported {path}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
