"""`python -m mtd_tf.demo`: the MNIST experiment at SNR 1 on a few digits.

Simulates measurements of shipped MNIST test digits (never seen by the
prior), reconstructs each with and without the shipped score prior
(saved_models/mnist_unet/1) in one batched EM, prints the errors and writes
the figures and results.json. Needs nothing but the repository.
"""

import dataclasses
import time

from absl import flags

from mtd_tf import cli
from mtd_tf import experiment

flags.DEFINE_list("digits", ["0", "3", "6", "7"],
                  "Shipped test digits (classes 0-9) to reconstruct.")
flags.DEFINE_float("snr", 1.0, "SNR of the simulated measurements.")
flags.DEFINE_string("prior", experiment.TABLE_I["mnist"]["prior"],
                    "Score prior SavedModel.")
flags.DEFINE_string("out_dir", "mtd_demo", "Where the figures go.")
flags.DEFINE_integer("seed", 0, "Seed of the measurements.")

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    classes = tuple(int(d) for d in FLAGS.digits)
  except ValueError:
    raise cli.UsageError(f"--digits must be integers 0-9, got "
                         f"{FLAGS.digits}.") from None
  if not FLAGS.snr > 0:
    raise cli.UsageError(f"--snr must be positive, got {FLAGS.snr}.")
  config = experiment.default_config(
      "mnist", snrs=(FLAGS.snr,), trials=len(classes), digit_classes=classes,
      seed=FLAGS.seed, prior_path=FLAGS.prior)
  config = dataclasses.replace(config, options=dataclasses.replace(
      config.options, progress_every=10))
  start = time.perf_counter()
  results, arrays = experiment.run_experiment(config)
  results["seconds"]["end_to_end"] = time.perf_counter() - start
  paths = experiment.write_results(FLAGS.out_dir, results, arrays)
  print(f"MNIST digits {list(classes)} at SNR {FLAGS.snr:g}, prior "
        f"{FLAGS.prior}; mean error +- std [shift-aligned error]:")
  print(experiment.summary_table(results))
  for name, path in paths.items():
    print(f"wrote {path}")
  print(f"{len(results['runs'])} reconstructions in "
        f"{results['seconds']['em_total']:.1f} s of EM.")


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
