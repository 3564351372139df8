"""What one reconstruction is asked to do: its config, checked by
`reconstruction.check_config`. Loads no TensorFlow: the `mtd-reconstruct`
tool defines its flags from it.
"""

import dataclasses
import typing

from mtd_tf.model import simulation

__all__ = [
  "ReconstructionConfig",
  "ReconstructionError",
  "EM_FLAGS",
  "EM_DEFAULTS",
  "INIT_SPECS",
  "STREAM_MODES",
  "BACKGROUND_MODES",
  "GAIN_MODES",
  "ROTATION_MODES",
  "parse_gain",
]

INIT_SPECS = ("auto", "mnist_mean", "uniform", "truth+R", "<file>.npy")
# When micrographs are streamed from disk: "auto" (their spectra exceed the
# memory budget), "always", "never".
STREAM_MODES = ("auto", "always", "never")
# Each micrograph's background level: "estimate" (`noise.estimate_noise`,
# removed before EM) or "none" (the data are zero-mean noise around the
# copies already).
BACKGROUND_MODES = ("estimate", "none")
# The data's units against the prior's, data = gain * (prior units):
# "auto" (estimated with a prior, `recovery.units`), "none" (as they are),
# or a positive number.
GAIN_MODES = ("auto", "none")
# How the copies in the data are turned (`simulation.ROTATION_MODES`):
# "discrete" (one of the K angles) or "continuous" (any angle).
ROTATION_MODES = simulation.ROTATION_MODES


# The EM options `mtd-reconstruct` exposes as flags (`ReconstructionConfig.em`).
EM_FLAGS = (
  "m_step",
  "max_iterations",
  "tolerance",
  "learning_rate",
  "gradient_steps",
  "num_rotations",
  "gamma",
  "t_prior",
  "chunk_size",
  "dtype",
  "progress_every",
  "acceleration",
)
# Where a reconstruction's EM options differ from `em.EMOptions`' defaults.
EM_DEFAULTS = {"progress_every": 10, "acceleration": "auto"}


class ReconstructionError(ValueError):
  """A reconstruction request that cannot run, with what to change."""


def parse_gain(gain):
  """The gain a config asks for: "auto", None ("none") or a float > 0.

  Args:
    gain: "auto", "none", or a positive finite number (or its text).

  Raises:
    ReconstructionError: anything else, in one line.
  """
  text = str(gain).strip().lower()
  if text in GAIN_MODES:
    return None if text == "none" else text
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not (value > 0 and value < float("inf")):
    raise ReconstructionError(
      f"gain {gain!r}: give auto (estimated with a prior), none (the data "
      "as they are) or a positive finite number, the data's units per "
      "prior unit (data = gain x image)."
    )
  return value


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
  """One reconstruction (defaults: Table I).

  Attributes:
    measurements: measurement files or glob patterns (several micrographs
      share one image and one sigma).
    image_size: L.
    out: output .npz (estimate and metadata), .npy or .mrc.
    sigma: noise standard deviation (None: the files' recorded sigmas, or
      where one records none, each micrograph's `noise.estimate_noise`;
      micrographs whose sigmas disagree, `noise.scale_outliers`, are
      refused).
    method: a name in `recovery.methods.METHODS`: "recommended"
      (`recovery.multistart_em`: several starts, pruning, selection, the
      prior's gauge; docs/recommended.md), "paper" (Algorithm 1 from one
      start, Table I), or any other registered method; without a prior a
      method runs its `without_prior` form.
    init: F(0): "auto" (mnist_mean for L = 28, else uniform), "mnist_mean"
      (Table I), "uniform" (U[0, 1] with `seed`), "truth+R" (the recorded
      true image plus R relative noise) or a .npy file.
    seed: seed of random initialisations.
    prior: a shipped prior's name ("mnist_unet", "gaussian_fc") or a
      SavedModel folder; None: no prior.
    crop: crop measurement sides to multiples of L.
    memory_budget_mb: MiB of patch spectra held at once (None: the
      library's `streaming.DEFAULT_MEMORY_BUDGET_BYTES`).
    stream: "auto" (stream from disk when the spectra of all files exceed
      the budget), "always" or "never".
    background: "estimate" (each micrograph's background level, the mean
      of the pixels no copy covers, is estimated and removed before EM)
      or "none" (the data are zero-mean around the copies already).
    gain: the data's units per unit of the prior's images, data = gain x
      image: "auto" (with a prior, estimated, `recovery.units`, and where
      it is not within a factor 2 of 1 the measurements and sigma are
      divided by it before EM, so that the estimate is in the prior's
      units), "none" (the data as they are), or a positive number to
      divide by. Without a prior nothing fixes the units: "auto" leaves
      the data, and the estimate, in their own. Streamed data are not
      rescaled.
    checkpoint_every: EM iterations between checkpoints (and at most
      `checkpoints.DEFAULT_EVERY_SECONDS` of work apart; 0: none), in
      checkpoint_dir; a finished run removes its checkpoint.
    checkpoint_dir: the checkpoint folder (None: `<out>.checkpoint` beside
      out).
    resume: continue the interrupted or killed run whose checkpoint is in
      checkpoint_dir (same inputs and options, else refused); without it
      a folder holding a checkpoint is refused.
    logdir: folder of TensorBoard summaries of EM's iterations
      (`em.summaries`: log-likelihood, sigma, the prior's weight, each
      start's curve, the estimates), one run per problem; without it
      none are written.
    rotations: how the copies in the data are turned: "discrete" (one of
      the K angles, the paper's) or "continuous" (any angle, as particles
      in a micrograph): EM's K is then
      `simulation.CONTINUOUS_NUM_ROTATIONS` unless em gives num_rotations,
      and the error against a recorded true image is also minimised over
      `simulation.ERROR_ANGLES` angles (the oracle floor is not reported).
    em: `em.EMOptions` fields the user chose ({name: value}); the others
      come from `EM_DEFAULTS`, rotations (num_rotations) and the method:
      m_step its M-step, max_iterations Table I's (one start) or
      `recovery.RECOMMENDED_ITERATIONS` (several), gamma Table I's for the
      prior's kind, t_prior the prior's own.
  """

  measurements: typing.Tuple[str, ...]
  image_size: int
  out: str = "estimate.npz"
  sigma: typing.Optional[float] = None
  method: str = "recommended"
  init: str = "auto"
  seed: int = 0
  prior: typing.Optional[str] = None
  crop: bool = False
  memory_budget_mb: typing.Optional[float] = None
  stream: str = "auto"
  background: str = "estimate"
  gain: str = "auto"
  checkpoint_every: int = 10
  checkpoint_dir: typing.Optional[str] = None
  resume: bool = False
  logdir: typing.Optional[str] = None
  rotations: str = "discrete"
  em: typing.Mapping[str, typing.Any] = dataclasses.field(default_factory=dict)
