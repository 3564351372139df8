"""`mtd-reconstruct`: approximate EM (Algorithm 1) on measurement files.

Reads one or more measurements (.npz, .npy, .mrc; a list or glob of
micrographs that share one image), runs EM with or without a score prior,
writes the estimate, and prints a summary with the error when the file
records the true image (progress goes to the log on stderr).

Each micrograph's background level (the mean of the pixels no copy
covers) is estimated and removed before EM, and reported (--background=none
keeps the data as they are); without --sigma each micrograph's noise level
is measured too, and micrographs on different scales are refused, named.
With a prior, the data's gain against the prior's units (detector counts
against MNIST's [0, 1]) is estimated and divided out before EM where it is
not within a factor 2 of 1 (--gain; logged and recorded as gain); without
a prior the estimate is in the data's units. Every file is read and
checked before the first iteration.

Micrographs whose patch spectra exceed --memory_budget are streamed from
disk every iteration in bounded memory (--stream=always forces it), and EM
is accelerated (the diagonal secant method, SQUAREM or Anderson) where it
helps (--acceleration).

Every --checkpoint_every iterations the run's state is saved beside --out
(<out>.checkpoint); after a crash, a kill or Ctrl-C, the same command with
--resume continues where it stopped and ends with the same estimate.

With --rotations=continuous (copies turned by any angle, as particles in a
micrograph) EM's K defaults to 16 instead of 4, the recommended method
puts its estimate upright at any angle (not only by quarter turns), and
the error against a recorded true image is also minimised over 360 angles.

With --logdir=DIR every EM iteration is written as TensorBoard summaries
(log-likelihood, relative change, sigma, the prior's weight and time, each
start's curve, the estimates as images); view them with
`tensorboard --logdir=DIR` (pip install tensorboard).

On Ctrl-C the estimate reached so far is written, marked: an .npz --out
holds interrupted=True (and a multistart run's best start so far); an .npy
or .mrc, which cannot carry the mark, goes to <name>.interrupted.npy /
.mrc and --out is not written.

Example:
  mtd-reconstruct --measurement=m.npz --image_size=28 --out=estimate.npz
"""

import json

from absl import flags

from mtd_tf import cli
from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.em import options
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction_config
from mtd_tf.recovery import methods


def define_flags(fv):
  flags.DEFINE_list(
    "measurement",
    None,
    "Measurement file(s) or glob(s): .npz, .npy or .mrc. "
    "Several micrographs share one image and one sigma (and scale).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "image_size", None, "L, the image side in pixels.", flag_values=fv
  )
  flags.DEFINE_float(
    "sigma",
    None,
    "Noise standard deviation; default: the values recorded in the "
    "measurement files, else each micrograph's estimated from its data "
    "(they must agree: files on different scales are refused, named) and, "
    "by the recommended method, refined by EM (logged and recorded in the "
    "output). Given, it is used for every micrograph.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "method",
    "recommended",
    list(methods.METHODS),
    "; ".join(
      f"{m.name}: {m.description.rstrip('.')}" for m in methods.METHODS.values()
    )
    + " Without --prior a method runs its no-prior form.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "init",
    "auto",
    "Initial estimate F(0): 'auto' (mnist_mean for L=28, else uniform), "
    "'mnist_mean' (Table I: the mean of ten training digits), 'uniform' "
    "(U[0,1], --seed), 'truth+R' (the recorded true image plus R relative "
    "noise, for checking local convergence) or a .npy file.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "seed", 0, "Seed of random initialisations.", flag_values=fv
  )
  flags.DEFINE_string(
    "prior",
    None,
    "Score prior: a shipped prior's name (mnist_unet, "
    "gaussian_fc) or a SavedModel folder.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "crop",
    False,
    "Crop measurement sides to a multiple of L instead of "
    "stopping with an error.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out",
    "estimate.npz",
    "Output .npz, .npy or .mrc. An interrupted run writes an .npz marked "
    "interrupted=True, or <name>.interrupted.npy / .mrc instead of an "
    ".npy / .mrc.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "background",
    "estimate",
    list(reconstruction_config.BACKGROUND_MODES),
    "Each micrograph's background level: estimate (the mean of the pixels "
    "no copy covers, removed before EM and reported) or none (the data are "
    "zero-mean noise around the copies already).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "memory_budget",
    None,
    "MiB of patch spectra held at once; micrographs beyond "
    "it are streamed from disk every iteration (default: "
    "1024).",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "stream",
    "auto",
    ["auto", "always", "never"],
    "Stream micrographs from disk: auto (when their spectra "
    "exceed --memory_budget), always or never.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "checkpoint_every",
    10,
    "EM iterations between checkpoints (and never more than two minutes "
    "of work apart; 0: none), saved in --checkpoint_dir; a finished run "
    "removes its checkpoint.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "checkpoint_dir",
    None,
    "Checkpoint folder (default: <out>.checkpoint beside --out).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "resume",
    False,
    "Continue the interrupted or killed run whose checkpoint is in "
    "--checkpoint_dir, with the same inputs and options; it ends with the "
    "estimate of an uninterrupted run.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "rotations",
    "discrete",
    list(reconstruction_config.ROTATION_MODES),
    "How the copies in the data are turned: discrete (one of K angles, the "
    "paper's) or continuous (any angle): the default --num_rotations "
    f"becomes {simulation.CONTINUOUS_NUM_ROTATIONS}, the recommended "
    "method puts its estimate upright at any angle, and the error against "
    f"a recorded true image is minimised over {simulation.ERROR_ANGLES} "
    "angles too.",
    flag_values=fv,
  )
  # Declared once in `ReconstructionConfig` (its Attributes: table).
  cli.define_config_flags(
    fv, reconstruction_config.ReconstructionConfig, ("gain",)
  )
  cli.define_config_flags(
    fv,
    reconstruction_config.ReconstructionConfig,
    ("logdir",),
    helps={"logdir": "View with tensorboard --logdir=DIR."},
  )
  # EM's options, declared once in `em.EMOptions`.
  cli.define_config_flags(
    fv,
    options.EMOptions,
    reconstruction_config.EM_FLAGS,
    defaults={
      "m_step": None,
      "max_iterations": None,
      "gamma": None,
      "chunk_size": None,
      **reconstruction_config.EM_DEFAULTS,
    },
    helps={
      "m_step": "Default: the method's.",
      "num_rotations": f"{simulation.CONTINUOUS_NUM_ROTATIONS} by default "
      "with --rotations=continuous.",
      "max_iterations": f"Default: {table1.MAX_ITERATIONS} (Table I) from "
      "one start, 40 for the recommended method.",
      "gamma": "Default: Table I's for the prior's kind.",
      "chunk_size": f"Default: {options.CHUNK_PAIRS} / K (64 at K = 4).",
    },
  )


def _check_without_tensorflow(fv):
  """The checks that need no TensorFlow, before the pipeline loads it: the
  input files exist and are files, and EM's size fits the machine."""
  for path in io.expand_paths(fv.measurement):
    io.check_input_file(path)
  em_options = _without_default_k(
    fv,
    cli.config_values(
      fv, options.EMOptions, ("num_rotations", "chunk_size", "dtype")
    ),
  )
  if fv.rotations == "continuous":
    em_options.setdefault("num_rotations", simulation.CONTINUOUS_NUM_ROTATIONS)
  em_options.setdefault(
    "chunk_size",
    options.chunk_size_for(
      em_options.get("num_rotations", options.EMOptions.num_rotations)
    ),
  )
  try:
    options.EMOptions(**em_options).check_size(fv.image_size)
  except ValueError as err:
    raise cli.UsageError(str(err)) from None


def _without_default_k(fv, em_values):
  """EM's options given; with --rotations=continuous and no --num_rotations
  given, K is left out so that the library's continuous default applies."""
  if fv.rotations == "continuous" and not fv["num_rotations"].present:
    em_values = {k: v for k, v in em_values.items() if k != "num_rotations"}
  return em_values


def main(fv):
  if not fv.measurement:
    raise cli.UsageError("--measurement is required.")
  for number, name in enumerate(fv.measurement, 1):
    if not name.strip():
      raise cli.UsageError(
        f"--measurement={','.join(fv.measurement)}: entry {number} of "
        f"{len(fv.measurement)} is an empty file name (a stray comma?); "
        "give file names or globs separated by commas."
      )
  if fv.image_size is None or fv.image_size < 1:
    raise cli.UsageError("--image_size is required and must be >= 1.")
  _check_without_tensorflow(fv)
  # Deferred: it loads TensorFlow; --help and usage errors do not.
  from mtd_tf.pipelines import reconstruction  # pylint: disable=g-import-not-at-top

  try:
    atomic.check_output_path(fv.out, io.ESTIMATE_EXTENSIONS)
  except (ValueError, OSError) as err:
    raise cli.UsageError(f"--out: {err}") from None
  config = reconstruction.ReconstructionConfig(
    measurements=tuple(fv.measurement),
    image_size=fv.image_size,
    out=fv.out,
    sigma=fv.sigma,
    method=fv.method,
    init=fv.init,
    seed=fv.seed,
    prior=fv.prior,
    crop=fv.crop,
    memory_budget_mb=fv.memory_budget,
    stream=fv.stream,
    background=fv.background,
    checkpoint_every=fv.checkpoint_every,
    checkpoint_dir=fv.checkpoint_dir,
    resume=fv.resume,
    rotations=fv.rotations,
    em=_without_default_k(
      fv,
      cli.config_values(fv, options.EMOptions, reconstruction_config.EM_FLAGS),
    ),
    **cli.config_values(
      fv, reconstruction_config.ReconstructionConfig, ("gain",)
    ),
    **cli.config_values(
      fv, reconstruction_config.ReconstructionConfig, ("logdir",)
    ),
  )
  try:
    reconstruction.check_config(config)
    reconstruction_config.parse_gain(config.gain)
  except (FileNotFoundError, IsADirectoryError, io.NotARegularFileError):
    raise  # An input that is not a file is a failure, not a usage error.
  except (ValueError, OSError) as err:
    raise cli.UsageError(str(err)) from None
  summary = reconstruction.reconstruct(config)
  line = (
    f"Wrote {summary['out']} after {summary['iterations']} iterations "
    f"({summary['seconds']:.3g} s)"
  )
  if "error" in summary:
    line += (
      f"; relative error vs the recorded true image "
      f"{summary['error']:.3g} (initial {summary['initial_error']:.3g}"
    )
    if "oracle_alignment_error" in summary:
      line += (
        f"; copies averaged at their true positions: "
        f"{summary['oracle_alignment_error']:.3g}"
      )
    line += ")"
  print(line + ".")
  print(json.dumps(summary))


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
