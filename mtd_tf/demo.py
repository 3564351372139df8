"""`mtd-demo`: the MNIST experiment at SNR 1 on a few shipped digits.

Simulates measurements of shipped MNIST test digits (never seen by the
prior), reconstructs each with and without the shipped score prior
(mnist_unet) in one batched EM, prints the errors and writes the figures and
results.json into --out_dir. Needs nothing but the repository.

Example:
  mtd-demo --digits=0,3,6,7 --out_dir=mtd_demo
"""

import dataclasses

from absl import flags

from mtd_tf import cli
from mtd_tf.base import table1


def define_flags(fv):
  flags.DEFINE_list(
    "digits",
    ["0", "3", "6", "7"],
    "Shipped test digits (classes 0-9) to reconstruct.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "snr", 1.0, "SNR of the simulated measurements.", flag_values=fv
  )
  flags.DEFINE_string(
    "prior",
    table1.DATASETS["mnist"]["prior"],
    "Score prior: a shipped name or a SavedModel folder.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out_dir",
    "mtd_demo",
    "Where the figures and results.json go (created in "
    "the current folder by default).",
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of the measurements.", flag_values=fv)
  flags.DEFINE_list(
    "methods",
    ["recommended", "recommended_no_prior", "prior"],
    "Methods to run (names in mtd_tf.recovery.methods.METHODS).",
    flag_values=fv,
  )


def main(fv):
  if not fv.digits:
    raise cli.UsageError(
      "--digits is empty: give classes 0-9, e.g. --digits=0,3."
    )
  try:
    classes = tuple(int(d) for d in fv.digits)
  except ValueError:
    raise cli.UsageError(
      f"--digits must be integers 0-9, got {','.join(fv.digits)}."
    ) from None
  if not 0 < fv.snr < float("inf"):
    raise cli.UsageError(f"--snr must be positive and finite, got {fv.snr}.")
  # Deferred: the pipeline loads TensorFlow; --help and usage errors do not.
  from mtd_tf.pipelines import experiments  # pylint: disable=g-import-not-at-top

  try:
    config = experiments.default_config(
      "mnist",
      snrs=(fv.snr,),
      trials=len(classes),
      digit_classes=classes,
      seed=fv.seed,
      prior=fv.prior,
      methods=tuple(fv.methods),
    )
  except ValueError as err:
    raise cli.UsageError(str(err)) from None
  config = dataclasses.replace(
    config, options=dataclasses.replace(config.options, progress_every=10)
  )
  results, paths = experiments.run_to_folder(config, fv.out_dir)
  print(
    f"MNIST digits {list(classes)} at SNR {fv.snr:g}, prior {fv.prior}; "
    "mean error +- std [shift-aligned error]:"
  )
  print(experiments.summary_table(results))
  for path in paths.values():
    print(f"wrote {path}")
  print(
    f"{len(results['runs'])} reconstructions in "
    f"{results['seconds']['em_total']:.3g} s of EM."
  )


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
