"""`mtd-experiment`: the paper's section IV experiments, error against SNR.

Simulates measurements of fresh targets at each SNR, reconstructs them with
and without the score prior as batched EM (Table I settings), and writes
results.json, error_vs_snr.png (Figures 3-4), reconstructions.png (Figure 5)
and measurements.png (Figure 1) into --out_dir. With --block_size the runs
are saved in blocks as they finish, and --resume continues an interrupted
experiment. With --logdir every EM iteration is written as TensorBoard
summaries, a run per problem.

Example:
  mtd-experiment --dataset=mnist --out_dir=out/mnist
"""

import dataclasses

from absl import flags

from mtd_tf import cli
from mtd_tf.base import table1
from mtd_tf.em import options
from mtd_tf.recovery import methods

# The EM options this tool exposes, declared once in `em.EMOptions`; the
# others are Table I's.
_EM_FLAGS = (
  "max_iterations",
  "learning_rate",
  "gradient_steps",
  "gamma",
  "t_prior",
  "progress_every",
)


def define_flags(fv):
  flags.DEFINE_enum(
    "dataset",
    None,
    sorted(table1.DATASETS),
    "Which experiment.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "snrs", None, "SNRs (default: the paper's).", flag_values=fv
  )
  flags.DEFINE_integer("trials", 10, "Target images.", flag_values=fv)
  flags.DEFINE_integer(
    "seed", 0, "Seed of targets, starts and measurements.", flag_values=fv
  )
  flags.DEFINE_string(
    "prior",
    None,
    "Prior name or SavedModel folder (default: Table I's shipped prior).",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "methods",
    list(methods.PAPER_METHODS),
    f"Methods to run, of {', '.join(methods.METHODS)} (recovery.methods).",
    flag_values=fv,
  )
  cli.define_config_flags(
    fv,
    options.EMOptions,
    _EM_FLAGS,
    defaults={"gamma": None, "t_prior": table1.T_PRIOR, "progress_every": 10},
    helps={
      "gamma": "Default: Table I's (constant:1 for gaussian, linear for mnist)."
    },
  )
  flags.DEFINE_string(
    "mnist_npz", None, "MNIST .npz for more targets.", flag_values=fv
  )
  flags.DEFINE_list(
    "digit_classes", None, "MNIST target classes.", flag_values=fv
  )
  flags.DEFINE_integer(
    "first_digit",
    0,
    "With --mnist_npz: the targets of a class start at its test digit of "
    "this index (0: the first).",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "sigma",
    "true",
    ["true", "estimated"],
    "Noise level EM is given: the simulator's, or estimated from each "
    "measurement alone (as mtd-reconstruct without --sigma) and refined by "
    "EM in the recommended methods; results.json records them per run.",
    flag_values=fv,
  )
  flags.DEFINE_string("out_dir", None, "Output folder.", flag_values=fv)
  flags.DEFINE_integer(
    "block_size",
    0,
    "Runs per batched EM execution, each saved when done "
    "(0: all runs in one execution).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "resume",
    False,
    "Continue an interrupted experiment from the blocks it "
    "finished (in OUT_DIR/partial).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "logdir",
    None,
    "Folder of TensorBoard summaries of every EM iteration, a run per "
    "problem (<method>/snr_<s>/trial_<i>): log-likelihood, sigma, the "
    "prior's weight, each start's curve, the estimates. View with "
    "tensorboard --logdir=DIR.",
    flag_values=fv,
  )


def _flag_checks(fv):
  """Refusals that need no library: one line each."""
  if fv.dataset is None or fv.out_dir is None:
    raise cli.UsageError("--dataset and --out_dir are required.")
  if fv.trials < 1:
    raise cli.UsageError(f"--trials must be >= 1, got {fv.trials}.")
  if not fv.methods:
    raise cli.UsageError(
      f"--methods is empty: give some of {','.join(methods.METHODS)}."
    )
  if fv.snrs is not None and not fv.snrs:
    raise cli.UsageError("--snrs is empty: give SNRs, e.g. --snrs=0.5,1.")
  if fv.digit_classes is not None and not fv.digit_classes:
    raise cli.UsageError("--digit_classes is empty: give classes 0-9.")
  if fv.block_size < 0:
    raise cli.UsageError(f"--block_size must be >= 0, got {fv.block_size}.")
  if fv.progress_every < 0:
    raise cli.UsageError(
      f"--progress_every must be >= 0, got {fv.progress_every}."
    )
  try:
    snrs = tuple(float(s) for s in fv.snrs) if fv.snrs else None
    classes = (
      tuple(int(c) for c in fv.digit_classes) if fv.digit_classes else None
    )
  except ValueError as err:
    raise cli.UsageError(
      f"Malformed --snrs or --digit_classes: {err}"
    ) from None
  return snrs, classes


def main(fv):
  snrs, classes = _flag_checks(fv)
  # Deferred: the pipeline loads TensorFlow; --help and usage errors do not.
  from mtd_tf.em import summaries  # pylint: disable=g-import-not-at-top
  from mtd_tf.pipelines import experiments  # pylint: disable=g-import-not-at-top

  try:
    overrides = cli.config_values(fv, options.EMOptions, _EM_FLAGS)
    em_options = dataclasses.replace(
      experiments.table_options(fv.dataset), **overrides
    ).validate()
    config = experiments.default_config(
      fv.dataset,
      snrs=snrs,
      trials=fv.trials,
      seed=fv.seed,
      prior=fv.prior,
      methods=tuple(fv.methods),
      options=em_options,
      mnist_npz=fv.mnist_npz,
      digit_classes=classes,
      first_digit=fv.first_digit,
      sigma=fv.sigma,
    )
    experiments.check_memory(config, fv.block_size or None)
    if fv.logdir:
      summaries.check_logdir(fv.logdir)
  except (ValueError, PermissionError) as err:
    raise cli.UsageError(str(err)) from None
  results, paths = experiments.run_to_folder(
    config,
    fv.out_dir,
    block_size=fv.block_size or None,
    resume=fv.resume,
    logdir=fv.logdir,
  )
  print(experiments.summary_table(results))
  seconds = results["seconds"]
  print(
    f"EM {seconds['em_total']:.3g} s, end to end "
    f"{seconds['end_to_end']:.3g} s; {results['blocks']['resumed']} of "
    f"{results['blocks']['total']} block(s) resumed."
  )
  for path in paths.values():
    print(f"wrote {path}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
