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

from mtd_tf import cli
from mtd_tf.priors import orientation
from trainers import configs


def define_flags(fv):
  cli.define_config_flags(fv, configs.OrientationExportConfig)
  cli.define_config_flags(fv, orientation.OrientationConfig)


def main(fv):
  target = cli.config_from_flags(fv, configs.OrientationExportConfig)
  config = cli.config_from_flags(fv, orientation.OrientationConfig)
  try:
    configs.check_export_dir(target.export_dir)
  except configs.TrainingError as err:
    raise cli.UsageError(str(err)) from None
  # Defers TensorFlow (through keras) until there is work to do.
  from trainers import orientation_classifier  # pylint: disable=g-import-not-at-top

  path = orientation_classifier.train_orientation_prior(
    target.source,
    target.export_dir,
    config,
    mnist_npz=target.mnist_npz,
    version=target.version,
  )
  print(f"Exported {path}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
