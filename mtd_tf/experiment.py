"""`mtd-experiment`: the paper's section IV experiments, error against SNR.

Simulates measurements of fresh targets at each SNR, reconstructs them with
and without the score prior as batched EM (Table I settings), and writes
results.json, error_vs_snr.png (Figures 3-4), reconstructions.png (Figure 5)
and measurements.png (Figure 1) into --out_dir. With --block_size the runs
are saved in blocks as they finish, and --resume continues an interrupted
experiment. With --logdir every EM iteration is written as TensorBoard
summaries, a run per problem.

Measurements are Table I's (N = 11 L, density 0.1, corners 2L apart, K = 4)
unless --size_factor (N / L; the copy count follows density N^2 / L^2),
--density, --min_separation (L: copies touch; below L they overlap) or
--rotations=continuous (each copy turned by an angle uniform on [0, 2 pi);
EM runs on --num_rotations angles, 16 by default, and errors are minimised
over 360 angles) say otherwise. With --size_factors=F1,F2,... the
experiment runs at each size (OUT_DIR/size_<F>) and error_vs_data.png
draws the error against the number of copies.

Example:
  mtd-experiment --dataset=mnist --out_dir=out/mnist
"""

import dataclasses

from absl import flags

from mtd_tf import cli
from mtd_tf.base import table1
from mtd_tf.em import options
from mtd_tf.model import simulation
from mtd_tf.recovery import methods

# The EM options this tool exposes, declared once in `em.EMOptions`; the
# others are Table I's.
_EM_FLAGS = (
  "num_rotations",
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
    defaults={
      "num_rotations": None,
      "gamma": None,
      "t_prior": table1.T_PRIOR,
      "progress_every": 10,
    },
    helps={
      "num_rotations": "Also the simulator's with discrete rotations. "
      f"Default: Table I's {table1.NUM_ROTATIONS}, or "
      f"{simulation.CONTINUOUS_NUM_ROTATIONS} with --rotations=continuous.",
      "gamma": "Default: Table I's (constant:1 for gaussian, linear for mnist).",
    },
  )
  flags.DEFINE_integer(
    "size_factor",
    table1.SIZE_FACTOR,
    "N / L: each measurement is N x N, with round(density N^2 / L^2) copies.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "size_factors",
    None,
    "Run the experiment at each of these size factors (into "
    "OUT_DIR/size_<F>) and draw the error against the number of copies "
    "(OUT_DIR/error_vs_data.png and error_vs_data.json); replaces "
    "--size_factor.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "density", table1.DENSITY, "p L^2 / N^2, p copies.", flag_values=fv
  )
  cli.define_placement_flags(
    fv, "EM runs on K angles and the error is minimised over 360 angles too"
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
  if fv.size_factor < 2:
    raise cli.UsageError(f"--size_factor must be >= 2, got {fv.size_factor}.")
  if not 0 < fv.density < float("inf"):
    raise cli.UsageError(
      f"--density must be positive and finite, got {fv.density}."
    )
  if fv.min_separation is not None and fv.min_separation < 1:
    raise cli.UsageError(
      f"--min_separation must be >= 1 pixel, got {fv.min_separation} "
      "(2L: the paper's; L: touching copies; below L: overlapping)."
    )
  try:
    snrs = tuple(float(s) for s in fv.snrs) if fv.snrs else None
    classes = (
      tuple(int(c) for c in fv.digit_classes) if fv.digit_classes else None
    )
    factors = (
      tuple(int(f) for f in fv.size_factors)
      if fv.size_factors is not None
      else None
    )
  except ValueError as err:
    raise cli.UsageError(
      f"Malformed --snrs, --digit_classes or --size_factors: {err}"
    ) from None
  if factors is not None:
    if not factors:
      raise cli.UsageError("--size_factors is empty: give e.g. 11,22,44.")
    if min(factors) < 2:
      raise cli.UsageError(f"--size_factors must be >= 2, got {min(factors)}.")
    if len(set(factors)) != len(factors):
      raise cli.UsageError(
        f"--size_factors repeats a value: {','.join(fv.size_factors)}."
      )
    if fv.logdir:
      raise cli.UsageError(
        "--logdir takes one experiment: run each size factor on its own "
        "(--size_factor) to write its summaries."
      )
  return snrs, classes, factors


def main(fv):
  snrs, classes, factors = _flag_checks(fv)
  # Deferred: the pipeline loads TensorFlow; --help and usage errors do not.
  from mtd_tf.em import summaries  # pylint: disable=g-import-not-at-top
  from mtd_tf.pipelines import experiments  # pylint: disable=g-import-not-at-top

  try:
    overrides = cli.config_values(fv, options.EMOptions, _EM_FLAGS)
    if "num_rotations" in overrides:
      overrides["chunk_size"] = options.chunk_size_for(
        overrides["num_rotations"]
      )
    em_options = dataclasses.replace(
      experiments.table_options(fv.dataset, fv.rotations), **overrides
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
      size_factor=fv.size_factor,
      density=fv.density,
      min_separation=fv.min_separation,
      rotations=fv.rotations,
    )
    experiments.check_memory(config, fv.block_size or None)
    if fv.logdir:
      summaries.check_logdir(fv.logdir)
  except (ValueError, PermissionError) as err:
    raise cli.UsageError(str(err)) from None
  if factors is not None:
    _scaling(config, factors, fv)
    return
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


def _scaling(config, factors, fv):
  """The experiment at every size factor, and the error against data."""
  # Deferred: the pipeline loads TensorFlow; --help and usage errors do not.
  from mtd_tf.pipelines import data_scaling  # pylint: disable=g-import-not-at-top
  from mtd_tf.pipelines import experiments  # pylint: disable=g-import-not-at-top

  try:
    for factor in factors:  # every size fits before the first runs
      experiments.check_memory(
        dataclasses.replace(config, size_factor=factor), fv.block_size or None
      )
  except ValueError as err:
    raise cli.UsageError(str(err)) from None
  rows, paths = data_scaling.run_data_scaling(
    config,
    factors,
    fv.out_dir,
    block_size=fv.block_size or None,
    resume=fv.resume,
  )
  print("copies  method                      SNR     error  [shift-aligned]")
  for row in rows:
    print(
      f"{row['copies']:<7d} {row['method']:<27s} {row['snr']:<7g} "
      f"{row['mean_error']:.3f} [{row['mean_error_shift_aligned']:.3f}]"
    )
  for path in paths.values():
    print(f"wrote {path}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
