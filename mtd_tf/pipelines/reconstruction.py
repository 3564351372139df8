"""Reconstruction from measurement files: Algorithm 1 end to end.

`reconstruct(ReconstructionConfig(...))` reads one or more measurements
(.npz, .npy, .mrc; micrographs that share one image and one sigma), checks
everything it can before EM starts (the output path, every file, the
initial estimate, the prior, the recorded ground truth), runs approximate
EM with or without a score prior (`em.approximate_em`), writes the estimate
and returns a summary with the error against the recorded true image and
the oracle-alignment floor (`metrics.oracle_alignment_error`) when the
files record the copies.

Real micrographs sit on a background level in arbitrary units, and eq. (1)
has zero-mean noise around the copies: each micrograph's background (the
mean of the pixels no copy covers, `noise.estimate_noise`) is removed
before EM, logged, and recorded (`background` in the summary and the
saved .npz). Without a given sigma each micrograph's own sigma is
measured (or read from its record); micrographs whose sigmas disagree
(`noise.scale_outliers`: another scale or normalisation, which one image
cannot fit) are refused, named, and the shared sigma is their pooled one.
A constant micrograph, one without noise, or one of fewer than 2 x 2
patches (`validation.enough_patches`) is refused in one line.

The data's units are not the prior's (detector counts against MNIST's
[0, 1]): with a prior and gain="auto" the gain s of data = s x image is
estimated (`units.estimate_gain`: a short EM without the prior, and the
scale at which the prior finds its estimate typical) and, unless it is
within a factor 2 of 1 (data already in the prior's units are left as
they are, bit for bit), every measurement (background removed) and sigma
are divided by it before EM, so that the estimate comes out in the
prior's units; a number given as gain is divided by the same way. The
gain applied is logged and recorded (`gain`, `gain_found`, `gain_source`
in the summary and the saved .npz; background and micrograph_sigma stay
in the data's units). Without a prior nothing fixes the units: the
estimate is in the data's. Streamed data are rescaled alike: the gain is
read from the first micrograph (read whole before EM anyway) and each
micrograph is divided by it as it is streamed.

Micrographs whose patch spectra would not fit `memory_budget_mb` (or all
of them with stream="always") are streamed from disk every iteration
(`streaming.StreamingData`): peak memory then stays near the budget
whatever the number of files, and the result equals the in-memory run up
to rounding. The oracle-alignment floor needs every micrograph in memory
and is not reported for a streamed run.

With acceleration="auto" (the default here, unlike `em.EMOptions`) EM is
accelerated where it helps (closed-form or preconditioned M-steps without a
time-dependent gamma; see `em.uses_acceleration`): the diagonal secant
method from 4 patches per image pixel, SQUAREM on less data
(`em.auto_accelerator`).

With logdir, every EM iteration is written as TensorBoard summaries
(`em.summaries`: the log-likelihood, sigma, the prior's weight and time,
each start's curve, the estimates as images).

On Ctrl-C (or SIGTERM through `mtd_tf.cli`) during EM, the estimate reached
so far is written and the interrupt re-raised: an .npz `out` marked
`interrupted=True` (a multistart run's best start so far by its data
log-likelihood, its index in `start`), an .npy or .mrc, which cannot carry
the mark, to `io.interrupted_path` (`<name>.interrupted.npy`) instead.
"""

import dataclasses
import math
import os
import typing

from absl import logging
import numpy as np

from mtd_tf import em
from mtd_tf import priors
from mtd_tf import recovery
from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.base import validation
from mtd_tf.em import callbacks as em_callbacks
from mtd_tf.em import checkpoints
from mtd_tf.em import options as em_options_lib
from mtd_tf.em import streaming
from mtd_tf.em import summaries
from mtd_tf.model import datasets
from mtd_tf.model import io
from mtd_tf.model import metrics
from mtd_tf.model import noise
from mtd_tf.model import simulation
from mtd_tf.pipelines.reconstruction_config import BACKGROUND_MODES
from mtd_tf.pipelines.reconstruction_config import EM_DEFAULTS
from mtd_tf.pipelines.reconstruction_config import EM_FLAGS
from mtd_tf.pipelines.reconstruction_config import GAIN_MODES
from mtd_tf.pipelines.reconstruction_config import INIT_SPECS
from mtd_tf.pipelines.reconstruction_config import ROTATION_MODES
from mtd_tf.pipelines.reconstruction_config import STREAM_MODES
from mtd_tf.pipelines.reconstruction_config import ReconstructionConfig
from mtd_tf.pipelines.reconstruction_config import ReconstructionError
from mtd_tf.pipelines.reconstruction_config import parse_gain
from mtd_tf.recovery import methods
from mtd_tf.recovery import units

__all__ = [
  "ReconstructionConfig",
  "ReconstructionError",
  "reconstruct",
  "check_config",
  "initial_estimate",
  "uses_streaming",
  "INIT_SPECS",
  "STREAM_MODES",
  "BACKGROUND_MODES",
  "GAIN_MODES",
  "ROTATION_MODES",
  "EM_FLAGS",
  "EM_DEFAULTS",
]


def _init_kind(spec):
  """Checks an init spec's syntax; returns its kind."""
  if spec in ("auto", "mnist_mean", "uniform"):
    return spec
  if spec.startswith("truth+"):
    try:
      level = float(spec[len("truth+") :])
    except ValueError:
      raise ReconstructionError(
        f"Malformed init {spec!r}: use e.g. truth+0.3."
      ) from None
    if not (math.isfinite(level) and level >= 0):
      raise ReconstructionError(
        f"init {spec!r}: the noise level must be finite and >= 0."
      )
    return "truth"
  if spec.endswith(".npy"):
    return "file"
  raise ReconstructionError(
    f"Unknown init {spec!r}: use auto, mnist_mean, uniform, truth+R or a "
    ".npy file."
  )


def _method(config, prior=None):
  """The registered method a config runs (its no-prior form without one)."""
  return methods.for_prior(config.method, prior is not None)


def _options(config, prior=None):
  """`em.EMOptions` of a config: the user's fields over the method's."""
  method = _method(config, prior)
  fields = {**EM_DEFAULTS, **config.em}
  unknown = sorted(set(config.em) - set(em.EMOptions.__dataclass_fields__))
  if unknown:
    raise ReconstructionError(f"Unknown EM options {unknown}.")
  if fields.get("gamma") is None:
    fields["gamma"] = (
      table1.gamma_for(prior.kind) if prior is not None else "constant:1"
    )
  if fields.get("m_step") is None:
    fields["m_step"] = method.m_step
  if fields.get("num_rotations") is None:
    # Copies turned by any angle: a fine grid of EM's angles.
    fields["num_rotations"] = _num_rotations(config)
  if fields.get("chunk_size") is None:
    fields["chunk_size"] = em.chunk_size_for(fields["num_rotations"])
  if fields.get("max_iterations") is None:
    fields["max_iterations"] = (
      recovery.RECOMMENDED_ITERATIONS
      if method.multistart
      else table1.MAX_ITERATIONS
    )
  return em.EMOptions(**fields).validate()


def check_config(config):
  """Refuses a config that cannot run, before reading any data.

  Checks the image size, the EM options, the init spec and the output path
  (an output that is one of the inputs is refused).

  Returns:
    The measurement file paths, globs expanded.

  Raises:
    ReconstructionError (a ValueError) or OSError, with one line saying
    what to change.
  """
  if not config.measurements:
    raise ReconstructionError("No measurement files given.")
  if int(config.image_size) < 1:
    raise ReconstructionError(
      f"image_size must be >= 1, got {config.image_size}."
    )
  if config.sigma is not None:
    validation.positive_finite(config.sigma, "sigma")
  if config.method not in methods.METHODS:
    raise ReconstructionError(
      f"method must be one of {tuple(methods.METHODS)}, got {config.method!r}."
    )
  _options(config)
  if not config.prior:
    # Checked after their values (`_options`), so a bad value is named as such.
    ignored = [
      f"{name}={config.em[name]!r}"
      for name in ("gamma", "t_prior")
      if config.em.get(name) is not None
    ]
    if ignored:
      raise ReconstructionError(
        f"{' and '.join(ignored)} given without a prior: gamma weights and "
        "t_prior times the prior's score (eq. 18), so without one they do "
        "nothing; give a prior or drop them."
      )
  every = config.checkpoint_every
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ReconstructionError(
      f"checkpoint_every must be an integer >= 0 (0: no checkpoints), got "
      f"{every!r}."
    )
  if config.stream not in STREAM_MODES:
    raise ReconstructionError(
      f"stream must be one of {STREAM_MODES}, got {config.stream!r}."
    )
  if config.memory_budget_mb is not None and not (
    math.isfinite(config.memory_budget_mb) and config.memory_budget_mb >= 0
  ):
    raise ReconstructionError(
      f"memory_budget_mb must be >= 0, got {config.memory_budget_mb}."
    )
  if config.background not in BACKGROUND_MODES:
    raise ReconstructionError(
      f"background must be one of {BACKGROUND_MODES}, got "
      f"{config.background!r}."
    )
  if config.rotations not in ROTATION_MODES:
    raise ReconstructionError(
      f"rotations must be one of {ROTATION_MODES}, got {config.rotations!r}."
    )
  kind = _init_kind(config.init)
  if kind == "mnist_mean" and int(config.image_size) != 28:
    raise ReconstructionError("init mnist_mean needs image_size 28.")
  paths = io.expand_paths(config.measurements)
  inputs = list(paths) + [
    io.sidecar_path(p)
    for p in paths
    if p.lower().endswith((".mrc", ".mrcs", ".map"))
  ]
  if kind == "file":
    inputs.append(config.init)
  atomic.check_output_path(config.out, io.ESTIMATE_EXTENSIONS, inputs=inputs)
  if io.interrupted_path(config.out) != config.out:
    # Where an interrupted run writes its estimate (`_save_partial`).
    atomic.check_output_path(
      io.interrupted_path(config.out), io.ESTIMATE_EXTENSIONS, inputs=inputs
    )
  if config.logdir:
    try:
      summaries.check_logdir(config.logdir)
    except ValueError as err:
      raise ReconstructionError(str(err)) from None
  return paths


def initial_estimate(spec, image_size, truth=None, seed=0):
  """F(0) [L, L] float64 from an init spec (see `ReconstructionConfig`).

  Raises:
    ReconstructionError: on an unknown spec, a missing truth, or a file of
      the wrong shape.
  """
  size = int(image_size)
  kind = _init_kind(spec)
  rng = np.random.default_rng(seed)
  if kind == "auto":
    kind = "mnist_mean" if size == 28 else "uniform"
  if kind == "mnist_mean":
    if size != 28:
      raise ReconstructionError("init mnist_mean needs image_size 28.")
    return np.asarray(datasets.mnist_initialisation(), np.float64)
  if kind == "uniform":
    return rng.uniform(0.0, 1.0, (size, size))
  if kind == "truth":
    if truth is None:
      raise ReconstructionError(
        f"init {spec} needs a measurement file that records the true "
        f"{size} x {size} image."
      )
    level = float(spec[len("truth+") :])
    noise = rng.standard_normal(truth.shape)
    return truth + level * np.linalg.norm(truth) * noise / np.linalg.norm(noise)
  try:
    init = io.read_npy(spec)
  except (OSError, ValueError) as err:
    raise ReconstructionError(f"Cannot read init file {spec}: {err}") from None
  if init.shape != (size, size):
    raise ReconstructionError(
      f"init file {spec} holds shape {init.shape}; expected {(size, size)}."
    )
  return validation.image_array(init, f"init file {spec}")


def _truth(files, size):
  """The recorded true image of the first file, if usable, else None."""
  image = files[0].image
  if image is None:
    return None
  image = np.asarray(image)
  if image.shape != (size, size) or not np.all(np.isfinite(image)):
    logging.warning(
      "%s records a true image of shape %s that is not a "
      "finite %d x %d array: no error is reported.",
      files[0].path,
      image.shape,
      size,
      size,
    )
    return None
  return image.astype(np.float64)


def _oracle_inputs(files, size, num_rotations):
  """Stacked measurement, corners and rotations for the oracle floor.

  Returns None (after a warning where the records are bad) unless every
  file records valid copies: corners inside the measurement, rotation
  indices in 0..K-1 and the same K as this reconstruction.
  """
  if any(f.corners is None or f.rotations is None for f in files):
    return None
  if len({f.measurement.shape[1] for f in files}) != 1:
    return None
  corners, rotations = [], []
  offset = 0
  for f in files:
    height, width = f.measurement.shape
    c = np.asarray(f.corners)
    r = np.asarray(f.rotations)
    problem = None
    if c.size == 0:
      problem = None if r.size == 0 else "rotations without corners"
    elif (
      c.ndim != 2 or c.shape[1] != 2 or not np.issubdtype(c.dtype, np.integer)
    ):
      problem = f"corners of shape {c.shape} and dtype {c.dtype}"
    elif r.shape != (len(c),) or not np.issubdtype(r.dtype, np.integer):
      problem = f"{r.shape} rotations for {len(c)} corners"
    elif (
      c.min() < 0
      or c[:, 0].max() > height - size
      or c[:, 1].max() > width - size
    ):
      problem = "corners outside the measurement"
    elif r.min() < 0 or r.max() >= num_rotations:
      problem = f"rotation indices outside 0..{num_rotations - 1}"
    elif f.num_rotations is not None and int(f.num_rotations) != num_rotations:
      problem = f"copies rotated by K={f.num_rotations}, not K={num_rotations}"
    if problem is not None:
      logging.warning(
        "%s: %s; the oracle-alignment floor is not reported.", f.path, problem
      )
      return None
    if c.size:
      corners.append(c.reshape(-1, 2) + [offset, 0])
      rotations.append(r.reshape(-1))
    offset += height
  if not corners:
    return None
  return (
    np.vstack([f.measurement for f in files]),
    np.vstack(corners),
    np.concatenate(rotations),
  )


def _run_multistart(
  method,
  measurements,
  size,
  sigma,
  init,
  options,
  prior,
  estimate_sigma,
  continuous=False,
):
  """`recovery.multistart_em` on one problem.

  The user's T and M-step (`options`) stand; the rest is the method's
  recommended set. With estimate_sigma, sigma is the start of EM's own
  estimate (`em.EMOptions.estimate_sigma`). With continuous (copies
  turned by any angle) the gauge puts the winner upright at any angle.

  Returns:
    (`em.EMResult` of the winner in the prior's gauge, its sigma the
    winner's, (float [L, L] the winner before the gauge, the gauge's
    position_sd)). The
    log-likelihood history is not kept across the starts: it holds the
    winner's final value only.
  """
  em_options, recovery_options = methods.em_options(
    method, options, size, estimate_sigma, continuous
  )
  em_options = dataclasses.replace(
    em_options, max_iterations=options.max_iterations, m_step=options.m_step
  )
  found = recovery.multistart_em(
    [measurements],
    size,
    [sigma],
    inits=np.asarray(init)[None],
    prior=prior,
    m_step=em_options.m_step,
    options=em_options,
    recovery=recovery_options,
  )
  winner = int(np.flatnonzero(found.groups == 0)[found.winner[0]])
  logging.info(
    "%s: %d starts, start %d won, %d problem-iterations",
    method.name,
    len(found.groups),
    int(found.winner[0]),
    found.problem_iterations,
  )
  return em.EMResult(
    found.estimate[0],
    int(found.iterations[0]),
    np.array([found.objective[winner]]),
    found.seconds,
    float(found.sigma[0]),
  ), (found.raw_estimate[0], float(found.position_sd[0]))


def _budget_bytes(config):
  if config.memory_budget_mb is None:
    return streaming.DEFAULT_MEMORY_BUDGET_BYTES
  return int(config.memory_budget_mb * 2**20)


def _em_field(config, name):
  if name == "chunk_size" and config.em.get(name) is None:
    return em.chunk_size_for(_num_rotations(config))
  return config.em.get(name, getattr(em.EMOptions, name))


def _num_rotations(config):
  """EM's K: the given one, else `simulation.CONTINUOUS_NUM_ROTATIONS` for
  continuous rotations, else Table I's."""
  if config.em.get("num_rotations") is not None:
    return int(config.em["num_rotations"])
  if config.rotations == "continuous":
    return simulation.CONTINUOUS_NUM_ROTATIONS
  return table1.NUM_ROTATIONS


def uses_streaming(config, paths):
  """Whether `reconstruct` streams `paths` from disk (see `stream`).

  "auto" streams when the patch spectra of all files (`streaming.
  spectra_bytes`, counted from the file headers without reading pixels)
  exceed the memory budget.
  """
  if config.stream != "auto":
    return config.stream == "always"
  dtype = _em_field(config, "dtype")
  try:
    data = streaming.StreamingData(
      paths,
      config.image_size,
      chunk_size=_em_field(config, "chunk_size"),
      dtype=dtype,
      crop=config.crop,
    )
  except ValueError:
    return False  # The in-memory path reports the bad file in full.
  return streaming.spectra_bytes(
    data.num_patches, config.image_size, dtype
  ) > _budget_bytes(config)


class _Level(typing.NamedTuple):
  """One micrograph's background and noise (`_micrograph_level`)."""

  path: str
  background: float  # removed from every pixel before EM (0: none)
  sigma: typing.Optional[float]  # recorded or estimated; None: not needed
  empty_pixels: typing.Optional[int]  # sigma's pixels; None: recorded
  pixels: int  # H W as EM sees it


class _Inputs(typing.NamedTuple):
  """What `reconstruct` read before EM."""

  paths: list
  files: list  # `io.Measurement`s (background removed): all, or the first
  measurements: typing.Any  # arrays [H, W], or a `streaming.StreamingData`
  streamed: bool
  levels: list  # `_Level` per micrograph
  sigma: float
  sigma_source: str  # "given", "file" or "estimated"
  truth: typing.Optional[np.ndarray]  # float64 [L, L]
  init: np.ndarray  # float64 [L, L]
  oracle: typing.Any  # `_oracle_inputs` or None
  prior: typing.Any
  options: typing.Any  # `em.EMOptions`
  method: typing.Any  # `methods.Method`
  # data = gain x image: measurements and sigma above are divided by it.
  gain: float = 1.0
  gain_found: typing.Optional[float] = None  # `units.estimate_gain`'s
  gain_source: str = "none"  # see `_gain`


def _micrograph_level(config, record, array):
  """A micrograph's `_Level`: its background and sigma, or a refusal.

  Args:
    config: the `ReconstructionConfig`.
    record: its `io.Measurement` (the recorded sigma, if any).
    array: float32 [H, W], the checked micrograph as EM sees it.

  Raises:
    ReconstructionError: a constant micrograph, or one whose background
      or sigma cannot be estimated (no noise).
  """
  size = int(config.image_size)
  recorded = (
    None
    if record.sigma is None
    else validation.positive_finite(record.sigma, f"sigma of {record.path}")
  )
  if float(np.min(array)) == float(np.max(array)):
    raise ReconstructionError(
      f"{record.path} is constant (every pixel is {float(array.flat[0]):g}):"
      " it holds neither noise nor copies; nothing can be reconstructed "
      "from it."
    )
  estimate_level = config.background == "estimate"
  if not estimate_level and (config.sigma is not None or recorded):
    return _Level(record.path, 0.0, recorded, None, array.size)
  try:
    found = noise.estimate_noise(
      array, size, background=None if estimate_level else 0.0
    )
  except noise.NoiseEstimateError as err:
    hint = (
      "give --sigma with --background=none to use it as it is"
      if estimate_level
      else "give --sigma"
    )
    raise ReconstructionError(
      f"{record.path}: {err} A micrograph is noise around copies: {hint}."
    ) from None
  if recorded is not None:
    return _Level(record.path, found.background, recorded, None, array.size)
  return _Level(
    record.path, found.background, found.sigma, found.empty_pixels, array.size
  )


def _read_measurements(config, paths, streamed):
  """(files, arrays, levels): every file read once and checked, before EM.

  Each file is read in turn (and, when streamed, let go): checked
  (`validation.measurement_array`, at least 2 x 2 patches) and its
  background and sigma measured (`_micrograph_level`). In memory the
  background is removed from the arrays; a streamed run gives the levels
  to its `streaming.StreamingData` (`_stream`), which removes them as it
  reads.

  Returns:
    files: `io.Measurement`s, background removed (streamed: the first
      only, for its truth and pixel size); arrays: float32 [H, W] per file
      as EM sees them (None when streamed); levels: `_Level` per file.
  """
  size = int(config.image_size)
  if streamed or len(paths) > 10:
    logging.info(
      "Checking %d micrograph(s) and measuring their background before EM.",
      len(paths),
    )
  files, arrays, levels = [], [], []
  for index, path in enumerate(paths):
    record = io.load_measurement(path)
    name = f"measurement {record.path}"
    array = validation.measurement_array(
      record.measurement, size, crop=config.crop, name=name
    )  # [H, W] float32
    validation.enough_patches(array.shape, size, name)
    level = _micrograph_level(config, record, array)
    levels.append(level)
    offset = np.float32(level.background)
    if streamed:
      if index == 0:  # its truth, pixel size and (for the gain) pixels
        files.append(
          dataclasses.replace(
            record, measurement=array - offset if offset else array
          )
        )
      continue
    arrays.append(array - offset if offset else array)
    if offset:  # the oracle floor sees what EM sees
      record = dataclasses.replace(
        record,
        measurement=np.asarray(record.measurement, np.float32) - offset,
      )
    files.append(record)
    del array
  _log_levels(levels)
  return files, (None if streamed else arrays), levels


def _stream(config, paths, levels, gain=1.0):
  """The `streaming.StreamingData` of a streamed run, backgrounds and the
  gain set."""
  data = streaming.StreamingData(
    paths,
    int(config.image_size),
    chunk_size=_em_field(config, "chunk_size"),
    dtype=_em_field(config, "dtype"),
    memory_budget_bytes=_budget_bytes(config),
    crop=config.crop,
    num_streams=em.resolved_streams(em.EMOptions()),
  )
  data.store.set_backgrounds([level.background for level in levels])
  data.set_gain(gain)
  logging.info(
    "Streaming %d micrographs from disk (%d patches, budget %.3g MB).",
    len(paths),
    data.num_patches,
    _budget_bytes(config) / 1e6,
  )
  return data


def _log_levels(levels):
  """One line per micrograph (a summary line beyond 10: the rest at -v 1)."""
  few = len(levels) <= 10
  for level in levels:
    if level.background or level.empty_pixels:
      (logging.info if few else logging.debug)(
        "%s: background %.6g removed (the level of the pixels no copy "
        "covers)%s.",
        os.path.basename(level.path),
        level.background,
        ""
        if level.empty_pixels is None
        else f", sigma {level.sigma:.4g} about it",
      )
  if not few:
    backgrounds = [level.background for level in levels]
    logging.info(
      "Backgrounds of %d micrographs removed: %.4g to %.4g (median %.4g).",
      len(levels),
      min(backgrounds),
      max(backgrounds),
      float(np.median(backgrounds)),
    )


def _noise_level(config, levels):
  """(sigma, its source): given, recorded in the files, or estimated.

  Without a given sigma each micrograph has its own (recorded, else
  estimated: `_micrograph_level`); they must agree (`noise.
  scale_outliers`), and the shared one is their mean square weighted by
  the pixels they were measured on.

  Raises:
    ReconstructionError: micrographs whose sigmas disagree, named.
  """
  if config.sigma is not None:
    return validation.positive_finite(config.sigma, "sigma"), "given"
  sigmas = np.array([level.sigma for level in levels])  # [N]
  counts = [level.empty_pixels for level in levels]
  outliers, median = noise.scale_outliers(sigmas, counts)
  if outliers:
    named = ", ".join(
      f"{levels[i].path} (sigma {sigmas[i]:.3g})" for i in outliers[:5]
    )
    more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
    raise ReconstructionError(
      f"Micrographs on different scales: {named}{more} against "
      f"{levels[median].path} (sigma {sigmas[median]:.3g}, the median of "
      f"{len(levels)} files), beyond what one noise level allows "
      "(noise.scale_outliers). Micrographs of one image must share one "
      "scale: normalise them (e.g. divide each by its sigma), reconstruct "
      "them separately, or give --sigma to impose one."
    )
  recorded = all(level.empty_pixels is None for level in levels)
  if np.all(sigmas == sigmas[0]):
    sigma = float(sigmas[0])
  else:
    weights = np.array(
      [level.empty_pixels or level.pixels for level in levels], np.float64
    )
    sigma = float(np.sqrt(np.sum(weights * sigmas**2) / np.sum(weights)))
  if recorded:
    return validation.positive_finite(sigma, "sigma"), "file"
  logging.info(
    "%s: estimated sigma %.3g from the data (noise.estimate_noise).",
    "the files record no sigma"
    if len(levels) > 1
    else f"{levels[0].path} records no sigma",
    sigma,
  )
  return validation.positive_finite(sigma, "sigma"), "estimated"


def _gain(config, spec, prior, measurements, sigma, options, streamed):
  """(gain to divide by, the gain estimated or None, where it came from).

  Sources: "none" (gain="none"), "given" (a number), "no prior" ("auto"
  without a prior: nothing fixes the units), "estimated" (`units.estimate_gain`; 1.0 is returned
  where it is within `units.UNIT_FACTOR` of 1), "unreliable" (found, but
  EM's estimate without the prior is mostly noise, or the prior's score
  is not a diffusion's: logged, recorded, not applied), "not found" (no
  scale could be read). Where no gain is applied the data stay as they
  are.

  Args:
    config: the `ReconstructionConfig`.
    spec: `parse_gain(config.gain)`.
    prior: the loaded prior or None.
    measurements: arrays [H, W] (background removed) the gain is read
      from: all micrographs in memory, the first one when streamed (it
      is read whole before EM anyway).
    sigma: the noise sd in the data's units.
    options: the run's `em.EMOptions` (K, chunking, dtype).
    streamed: whether the data are streamed from disk.
  """
  if spec is None:
    return 1.0, None, "none"
  if spec == "auto" and prior is None:
    return 1.0, None, "no prior"
  if spec != "auto":
    logging.info(
      "Gain %.4g given: the measurements and sigma are divided by it "
      "before EM.",
      spec,
    )
    return float(spec), None, "given"
  try:
    found = units.estimate_gain(
      measurements,
      int(config.image_size),
      sigma,
      prior,
      num_rotations=options.num_rotations,
      chunk_size=options.chunk_size,
      dtype=options.dtype,
    )
  except (units.GainError, em.EMDivergedError) as err:
    logging.warning(
      "No gain found (%s); the data are used in their own units.",
      _first_sentence(err),
    )
    return 1.0, None, "not found"
  factor = units.UNIT_FACTOR
  source = "estimated" if found.reliable else "unreliable"
  if 1.0 / factor <= found.gain <= factor:
    logging.info(
      "Gain %.3g found (data = gain x image%s): within a factor %g of the "
      "prior's units, the data are used as they are.",
      found.gain,
      "" if found.reliable else f"; not reliable: {found.note}",
      factor,
    )
    return 1.0, found.gain, source
  if not found.reliable:
    logging.warning(
      "Gain %.3g found but not applied: %s; the data are used in their "
      "own units (give --gain to divide by one).",
      found.gain,
      found.note,
    )
    return 1.0, found.gain, source
  logging.info(
    "Gain %.4g found (data = gain x image; EM's estimate without the "
    "prior is typical under it at t = %.3g): the measurements and sigma "
    "are divided by it before EM, the estimate is in the prior's units.",
    found.gain,
    found.time,
  )
  return found.gain, found.gain, "estimated"


def _first_sentence(err):
  return str(err).split("\n")[0].rstrip(".")


def _rescaled(files, measurements, gain):
  """(files, measurements) divided by gain: new arrays, the inputs kept.

  The files' measurements too: the oracle floor sees what EM sees.
  """
  scale = np.float32(gain)
  files = [
    dataclasses.replace(
      f, measurement=np.asarray(f.measurement, np.float32) / scale
    )
    for f in files
  ]
  return files, [np.asarray(a, np.float32) / scale for a in measurements]


def _prepare(config):
  """Reads and checks everything a reconstruction needs, before EM."""
  paths = check_config(config)
  gain_spec = parse_gain(config.gain)
  size = int(config.image_size)
  streamed = uses_streaming(config, paths)
  files, measurements, levels = _read_measurements(config, paths, streamed)
  sigma, sigma_source = _noise_level(config, levels)
  truth = _truth(files, size)
  init = initial_estimate(config.init, size, truth, config.seed)
  prior = None
  if config.prior:
    prior = priors.load_prior(config.prior, image_size=size)
  options = _options(config, prior)
  gain, gain_found, gain_source = _gain(
    config,
    gain_spec,
    prior,
    [files[0].measurement] if streamed else measurements,
    sigma,
    options,
    streamed,
  )
  if gain != 1.0:  # data = gain x image: EM runs in the prior's units
    files, rescaled = _rescaled(files, measurements or [], gain)
    measurements = None if streamed else rescaled
    sigma = sigma / gain
  # Copies turned by continuous angles have no index on EM's grid to be
  # averaged at: no oracle floor.
  oracle = (
    _oracle_inputs(files, size, options.num_rotations)
    if truth is not None and not streamed and config.rotations == "discrete"
    else None
  )
  if streamed:  # last: nothing after it can fail and leave it open
    measurements = _stream(config, paths, levels, gain)
  inputs = _Inputs(
    paths,
    files,
    measurements,
    streamed,
    levels,
    sigma,
    sigma_source,
    truth,
    init,
    oracle,
    prior,
    options,
    _method(config, prior),
    gain,
    gain_found,
    gain_source,
  )
  _log_setup(config, inputs)
  return inputs


def _log_setup(config, inputs):
  options = inputs.options
  if inputs.prior is None:
    prior_note = "no prior"
  else:
    t_prior = em_options_lib.resolve_t_prior(options.t_prior, inputs.prior)
    prior_note = (
      f"prior {config.prior} (gamma {options.gamma}, t {t_prior:.3g})"
    )
  logging.info(
    "%d measurement(s), L=%d, sigma=%.3g, K=%d, method %s, M-step %s, %s",
    len(inputs.paths),
    int(config.image_size),
    inputs.sigma,
    options.num_rotations,
    inputs.method.name,
    options.m_step,
    prior_note,
  )


def _run(config, inputs):
  """EM by the config's method: (`em.EMResult`, None or (the estimate
  before the gauge, the gauge's position_sd))."""
  size = int(config.image_size)
  if inputs.method.multistart:
    # Without a given sigma EM refines the estimate from the data. Streamed
    # data: every start shares one pass over the micrographs.
    return _run_multistart(
      inputs.method,
      inputs.measurements,
      size,
      inputs.sigma,
      inputs.init,
      inputs.options,
      inputs.prior,
      estimate_sigma=inputs.sigma_source == "estimated",
      continuous=config.rotations == "continuous",
    )
  result = em.approximate_em(
    inputs.measurements,
    size,
    inputs.sigma,
    init=inputs.init,
    options=inputs.options,
    prior=inputs.prior,
    crop=config.crop,
  )
  return result, None


def _best_start(partial):
  """(estimate [L, L], iterations, log-likelihood [T], start, starts, how).

  A multistart run's partial result holds every start of the stage in
  flight: the one whose data log-likelihood at its last finished iteration
  is highest is kept (start 0 when none finished one).
  """
  estimate = np.asarray(getattr(partial, "estimate", partial))
  iterations = getattr(partial, "iterations", None)
  history = np.asarray(
    getattr(partial, "log_likelihood", np.zeros(0)), np.float64
  )
  if estimate.ndim != 3:
    return estimate, iterations, history.reshape(-1), None, None, None
  starts = len(estimate)
  history = history.reshape(-1, starts)  # [T, B]
  last = np.full(starts, -np.inf)
  for b in range(starts):
    finite = history[np.isfinite(history[:, b]), b]
    if finite.size:
      last[b] = finite[-1]
  if np.isfinite(last).any():
    start = int(np.argmax(last))
    how = "highest data log-likelihood at its last finished iteration"
  else:
    start = 0
    how = "start 0: no start had finished an iteration"
  column = history[:, start]
  if iterations is not None:
    iterations = np.asarray(iterations).reshape(-1)[start]
  return (
    estimate[start],
    iterations,
    column[np.isfinite(column)],
    start,
    starts,
    how,
  )


def _save_partial(config, inputs, err):
  """Writes the estimate an interrupted run reached, marked interrupted.

  An .npz goes to `config.out` with interrupted=True; an .npy or .mrc,
  which cannot carry the mark, to `io.interrupted_path` (config.out is
  not written). A multistart run's best start so far is written
  (`_best_start`), with its index.
  """
  partial = getattr(err, "partial_result", None)
  if partial is None:
    return
  estimate, iterations, history, start, starts, how = _best_start(partial)
  path = io.interrupted_path(config.out)
  io.save_estimate(
    path,
    estimate,
    sigma=inputs.sigma,
    pixel_size=inputs.files[0].pixel_size,
    interrupted=True,
    iterations=None if iterations is None else int(iterations),
    log_likelihood=history,
    start=start,
    starts=starts,
    start_selected_by=how,
    background=np.array([level.background for level in inputs.levels]),
    gain=inputs.gain,
  )
  which = "" if start is None else f" (start {start} of {starts}: {how})"
  logging.warning(
    "Interrupted: wrote the estimate reached so far%s to %s (marked "
    "interrupted)%s.",
    which,
    path,
    "" if path == config.out else f"; {config.out} was not written",
  )


def _summary(config, inputs, result):
  """The summary dict, with the errors where the files record the truth."""
  sigma = inputs.sigma
  sigma_from_data = None
  if inputs.sigma_source == "estimated":
    sigma_from_data = sigma
    if result.sigma is not None and result.sigma != sigma:
      sigma = float(result.sigma)
      logging.info(
        "EM's noise level: %.4g (%.4g from the data alone).",
        sigma,
        sigma_from_data,
      )
  log_likelihood = np.asarray(result.log_likelihood)
  summary = {
    "out": config.out,
    "measurements": len(inputs.paths),
    "streamed": inputs.streamed,
    "iterations": int(result.iterations),
    "seconds": float(result.seconds),
    "method": config.method,
    "sigma": float(sigma),
    "sigma_source": inputs.sigma_source,
    "sigma_from_data": sigma_from_data,
    "final_log_likelihood": (
      float(log_likelihood[-1]) if log_likelihood.size else None
    ),
    "background": [level.background for level in inputs.levels],
    # data = gain x image; sigma and the estimate are in the image's units.
    "gain": float(inputs.gain),
    "gain_found": inputs.gain_found,
    "gain_source": inputs.gain_source,
  }
  if inputs.truth is not None:
    k = inputs.options.num_rotations
    angles = (
      np.linspace(0.0, 2 * np.pi, simulation.ERROR_ANGLES, endpoint=False)
      if config.rotations == "continuous"
      else None
    )
    summary["error"] = metrics.relative_error(
      inputs.truth, result.estimate, k, angles=angles
    )
    summary["initial_error"] = metrics.relative_error(
      inputs.truth, inputs.init, k, angles=angles
    )
    if inputs.oracle is not None:
      stacked, corners, rotations = inputs.oracle
      summary["oracle_alignment_error"] = metrics.oracle_alignment_error(
        stacked, inputs.truth, corners, rotations, k
      )
  return summary


def _micrograph_sigmas(levels):
  """float [N] each micrograph's own sigma, or None where one is unknown."""
  if any(level.sigma is None for level in levels):
    return None
  return np.array([level.sigma for level in levels])


def reconstruct(config):
  """Runs one reconstruction and writes its estimate to `config.out`.

  Stages: `_prepare` (inputs, sigma, truth records, prior, options, all
  checked before EM), `_run` (the method), `_summary`, and the estimate
  saved whole (or, on an interrupt, the partial one, marked).

  Args:
    config: `ReconstructionConfig`.

  Returns:
    Summary dict: out, measurements, iterations, seconds,
    final_log_likelihood, background (the level removed from each
    micrograph, a list), gain (data = gain x estimate: what the
    measurements and sigma were divided by, 1.0 for none), gain_found
    (`units.estimate_gain`'s, or None), gain_source (`_gain`), and when
    the files record the true image: error, initial_error, and (when they
    record the copies) oracle_alignment_error.

  Raises:
    ValueError / OSError: bad config, files, prior or data, before EM.
    KeyboardInterrupt: re-raised after writing the partial estimate.
  """
  checkpointer = _checkpointer(config)  # a checkpoint refused before work
  inputs = _prepare(config)
  # TensorBoard summaries of EM's iterations, one run per problem.
  board = summaries.TensorBoard(config.logdir) if config.logdir else None
  try:
    with em_callbacks.active([checkpointer, board]):
      result, before_gauge = _run(config, inputs)
  except KeyboardInterrupt as err:
    if checkpointer is not None and checkpointer.has_progress:
      checkpointer.save()  # the last finished segment: --resume goes on
    _save_partial(config, inputs, err)
    raise
  finally:
    if inputs.streamed:
      inputs.measurements.close()
    if board is not None:
      board.close()
  summary = _summary(config, inputs, result)
  before_gauge, gauge_position_sd = before_gauge or (None, None)
  io.save_estimate(
    config.out,
    result.estimate,
    sigma=summary["sigma"],
    sigma_estimated=inputs.sigma_source == "estimated",
    sigma_from_data=summary["sigma_from_data"],
    pixel_size=inputs.files[0].pixel_size,
    log_likelihood=np.asarray(result.log_likelihood),
    iterations=result.iterations,
    error=summary.get("error"),
    background=np.array(summary["background"]),
    gain=summary["gain"],
    gain_found=summary["gain_found"],
    gain_source=summary["gain_source"],
    micrograph_sigma=_micrograph_sigmas(inputs.levels),
    interrupted=False,
    # The recommended method mixes positions or orientations the data and
    # the prior cannot tell apart; this is the sharp winner they came from.
    estimate_before_gauge=before_gauge,
    gauge_position_sd=gauge_position_sd,
  )
  if checkpointer is not None:
    checkpointer.remove()  # finished: nothing to resume
  return summary


def checkpoint_dir(config):
  """The checkpoint folder of a config: its own, or `<out>.checkpoint`."""
  return config.checkpoint_dir or f"{config.out}.checkpoint"


def _fingerprint(config, paths):
  """What a checkpoint must share with a run to be resumed by it.

  The config less what does not change the computation (where outputs go,
  progress, checkpointing), and each input file's size and modification
  time (a changed file is another input).
  """
  skip = {"out", "checkpoint_every", "checkpoint_dir", "resume", "logdir"}
  fields = {
    f.name: getattr(config, f.name)
    for f in dataclasses.fields(config)
    if f.name not in skip
  }
  fields["em"] = {
    k: v for k, v in dict(config.em).items() if k != "progress_every"
  }
  files = []
  for path in paths:
    stat = os.stat(path)
    files.append([os.path.realpath(path), stat.st_size, stat.st_mtime_ns])
  return checkpoints.fingerprint(config=fields, files=files)


def _checkpointer(config):
  """The run's `checkpoints.Checkpointer` (None with checkpoint_every 0).

  Raises:
    ReconstructionError: a checkpoint folder that is a file, a checkpoint
      of other inputs or options, resume without one, or one without
      resume.
  """
  every = int(config.checkpoint_every)
  if every == 0:
    if config.resume:
      raise ReconstructionError(
        "resume needs checkpoints: drop checkpoint_every=0."
      )
    return None
  paths = check_config(config)
  directory = checkpoint_dir(config)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ReconstructionError(
      f"The checkpoint folder {directory} is a file: give another "
      "--checkpoint_dir."
    )
  try:
    return checkpoints.Checkpointer(
      directory, _fingerprint(config, paths), every, resume=config.resume
    )
  except checkpoints.CheckpointError as err:
    raise ReconstructionError(str(err)) from None
