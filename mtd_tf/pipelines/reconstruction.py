"""Reconstruction from measurement files: Algorithm 1 end to end.

`reconstruct(ReconstructionConfig(...))` reads one or more measurements
(.npz, .npy, .mrc; micrographs that share one image and one sigma), checks
everything it can before EM starts (the output path, the initial estimate,
the prior, the recorded ground truth), runs approximate EM with or without a
score prior (`em.approximate_em`), writes the estimate and returns a summary
with the error against the recorded true image and the oracle-alignment
floor (`metrics.oracle_alignment_error`) when the files record the copies.

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

On Ctrl-C (or SIGTERM through `mtd_tf.cli`) during EM, the estimate reached
so far is written, marked `interrupted=True`, and the interrupt re-raised.
"""

import dataclasses
import math
import typing

from absl import logging
import numpy as np

from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.base import validation
from mtd_tf.model import io

__all__ = [
  "ReconstructionConfig",
  "ReconstructionError",
  "reconstruct",
  "check_config",
  "initial_estimate",
  "uses_streaming",
  "INIT_SPECS",
  "STREAM_MODES",
]

INIT_SPECS = ("auto", "mnist_mean", "uniform", "truth+R", "<file>.npy")
# When micrographs are streamed from disk: "auto" (their spectra exceed the
# memory budget), "always", "never".
STREAM_MODES = ("auto", "always", "never")


# "recommended": several starts, pruning, selection, gauge; "paper":
# Algorithm 1 from one start.
METHODS = ("recommended", "paper")


class ReconstructionError(ValueError):
  """A reconstruction request that cannot run, with what to change."""


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
  """One reconstruction (defaults: Table I).

  Attributes:
    measurements: measurement files or glob patterns (several micrographs
      share one image and one sigma).
    image_size: L.
    out: output .npz (estimate and metadata), .npy or .mrc.
    sigma: noise standard deviation (None: the first file's, or when it
      records none, `noise.estimate_sigma` of the data).
    method: "recommended" (`recovery.multistart_em`: several starts,
      pruning, selection, the prior's gauge; docs/recommended.md) or
      "paper" (Algorithm 1 from the one start, Table I).
    init: F(0): "auto" (mnist_mean for L = 28, else uniform), "mnist_mean"
      (Table I), "uniform" (U[0, 1] with `seed`), "truth+R" (the recorded
      true image plus R relative noise) or a .npy file.
    seed: seed of random initialisations.
    m_step: "closed_form", "gradient" or "preconditioned" (None:
      gradient with a prior, else closed_form).
    max_iterations: T (None: 100, Table I, for "paper";
      `recovery.RECOMMENDED_ITERATIONS` for "recommended").
    tolerance: stop when ||F(tau+1) - F(tau)||_F < tolerance.
    learning_rate: mu of eq. (18).
    gradient_steps: gradient steps per M-step.
    num_rotations: K.
    prior: a shipped prior's name ("mnist_unet", "gaussian_fc") or a
      SavedModel folder; None: no prior.
    gamma: prior weight schedule (None: Table I's for the prior's kind).
    t_prior: diffusion time of the prior's score (None: the prior's own).
    chunk_size: patches per E-step chunk.
    dtype: "float32" or "float64".
    crop: crop measurement sides to multiples of L.
    progress_every: log progress every this many iterations (0: never).
    memory_budget_mb: MiB of patch spectra held at once (None: the
      library's `streaming.DEFAULT_MEMORY_BUDGET_BYTES`).
    stream: "auto" (stream from disk when the spectra of all files exceed
      the budget), "always" or "never".
    acceleration: "auto", "anderson", "secant", "squarem" or "none"
      (`em.EMOptions`).
  """

  measurements: typing.Tuple[str, ...]
  image_size: int
  out: str = "estimate.npz"
  sigma: typing.Optional[float] = None
  method: str = "recommended"
  init: str = "auto"
  seed: int = 0
  m_step: typing.Optional[str] = None
  max_iterations: typing.Optional[int] = None
  tolerance: float = table1.TOLERANCE
  learning_rate: float = table1.LEARNING_RATE
  gradient_steps: int = table1.GRADIENT_STEPS
  num_rotations: int = table1.NUM_ROTATIONS
  prior: typing.Optional[str] = None
  gamma: typing.Optional[str] = None
  t_prior: typing.Optional[float] = None
  chunk_size: int = 64
  dtype: str = "float32"
  crop: bool = False
  progress_every: int = 10
  memory_budget_mb: typing.Optional[float] = None
  stream: str = "auto"
  acceleration: str = "auto"


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


def _options(config, prior=None):
  """`em.EMOptions` of a config (gamma from Table I for the prior's kind)."""
  from mtd_tf import em  # pylint: disable=g-import-not-at-top

  gamma = config.gamma
  if gamma is None:
    gamma = table1.gamma_for(prior.kind) if prior is not None else "constant:1"
  recommended = config.method == "recommended"
  m_step = config.m_step or (
    "closed_form"
    if prior is None
    else "preconditioned"
    if recommended
    else "gradient"
  )
  from mtd_tf import recovery  # pylint: disable=g-import-not-at-top

  max_iterations = config.max_iterations
  if max_iterations is None:
    max_iterations = (
      recovery.RECOMMENDED_ITERATIONS if recommended else table1.MAX_ITERATIONS
    )
  return em.EMOptions(
    num_rotations=config.num_rotations,
    max_iterations=max_iterations,
    tolerance=config.tolerance,
    learning_rate=config.learning_rate,
    gradient_steps=config.gradient_steps,
    t_prior=config.t_prior,
    gamma=gamma,
    chunk_size=config.chunk_size,
    dtype=config.dtype,
    progress_every=config.progress_every,
    m_step=m_step,
    acceleration=config.acceleration,
  ).validate()


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
  if config.method not in METHODS:
    raise ReconstructionError(
      f"method must be one of {METHODS}, got {config.method!r}."
    )
  if int(config.progress_every) < 0:
    raise ReconstructionError(
      f"progress_every must be >= 0, got {config.progress_every}."
    )
  _options(config)
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
    from mtd_tf.model import datasets  # pylint: disable=g-import-not-at-top

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


def _recommended(
  measurements, size, sigma, init, options, prior, estimate_sigma=False
):
  """`recovery.multistart_em` on one problem.

  With estimate_sigma, sigma is the start of EM's own estimate
  (`em.EMOptions.estimate_sigma`).

  Returns:
    (`em.EMResult` of the winner in the prior's gauge, its sigma the
    winner's, float [L, L] the winner before the gauge). The
    log-likelihood history is not kept across the starts: it holds the
    winner's final value only.
  """
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf import recovery  # pylint: disable=g-import-not-at-top

  em_options, recovery_options = recovery.recommended_options(options, size)
  # The user's T and M-step (flags) stand; the rest is the recommended set.
  em_options = dataclasses.replace(
    em_options,
    max_iterations=options.max_iterations,
    m_step=options.m_step,
    estimate_sigma=bool(estimate_sigma),
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
    "recommended: %d starts, start %d won, %d problem-iterations",
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
  ), found.raw_estimate[0]


def _budget_bytes(config):
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

  if config.memory_budget_mb is None:
    return streaming.DEFAULT_MEMORY_BUDGET_BYTES
  return int(config.memory_budget_mb * 2**20)


def uses_streaming(config, paths):
  """Whether `reconstruct` streams `paths` from disk (see `stream`).

  "auto" streams when the patch spectra of all files (`streaming.
  spectra_bytes`, counted from the file headers without reading pixels)
  exceed the memory budget.
  """
  if config.stream != "auto":
    return config.stream == "always"
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

  try:
    data = streaming.StreamingData(
      paths,
      config.image_size,
      chunk_size=config.chunk_size,
      dtype=config.dtype,
      crop=config.crop,
    )
  except ValueError:
    return False  # The in-memory path reports the bad file in full.
  return streaming.spectra_bytes(
    data.num_patches, config.image_size, config.dtype
  ) > _budget_bytes(config)


def reconstruct(config):
  """Runs one reconstruction and writes its estimate to `config.out`.

  Args:
    config: `ReconstructionConfig`.

  Returns:
    Summary dict: out, measurements, iterations, seconds,
    final_log_likelihood, and when the files record the true image: error,
    initial_error, and (when they record the copies) oracle_alignment_error.

  Raises:
    ValueError / OSError: bad config, files, prior or data, before EM.
    KeyboardInterrupt: re-raised after writing the partial estimate.
  """
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top

  paths = check_config(config)
  size = int(config.image_size)
  streamed = uses_streaming(config, paths)
  if streamed:
    from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

    # Only the first file is read whole here (its sigma and truth).
    files = [io.load_measurement(paths[0])]
    measurements = streaming.StreamingData(
      paths,
      size,
      chunk_size=config.chunk_size,
      dtype=config.dtype,
      memory_budget_bytes=_budget_bytes(config),
      crop=config.crop,
      num_streams=em.resolved_streams(em.EMOptions()),
    )
    logging.info(
      "Streaming %d micrographs from disk (%d patches, budget %.3g MB).",
      len(paths),
      measurements.num_patches,
      _budget_bytes(config) / 1e6,
    )
  else:
    files = [io.load_measurement(p) for p in paths]
    measurements = [
      validation.measurement_array(
        f.measurement, size, crop=config.crop, name=f"measurement {f.path}"
      )
      for f in files
    ]
  first = files[0]
  sigma = config.sigma if config.sigma is not None else first.sigma
  sigma_source = (
    "given"
    if config.sigma is not None
    else "file"
    if sigma is not None
    else "estimated"
  )
  if sigma is None:
    from mtd_tf.model import noise  # pylint: disable=g-import-not-at-top

    # A streamed run estimates sigma from its first micrograph.
    sigma = noise.estimate_sigma(
      first.measurement if streamed else measurements, size
    )
    logging.info(
      "%s records no sigma: estimated %.3g from the data "
      "(noise.estimate_sigma).",
      first.path,
      sigma,
    )
  sigma = validation.positive_finite(sigma, "sigma")
  truth = _truth(files, size)
  init = initial_estimate(config.init, size, truth, config.seed)
  oracle = (
    _oracle_inputs(files, size, int(config.num_rotations))
    if truth is not None and not streamed
    else None
  )
  prior = None
  if config.prior:
    from mtd_tf import priors  # pylint: disable=g-import-not-at-top

    prior = priors.load_prior(config.prior, image_size=size)
  options = _options(config, prior)
  if prior is None:
    prior_note = "no prior"
  else:
    t_prior = options.t_prior if options.t_prior is not None else prior.t_prior
    prior_note = (
      f"prior {config.prior} (gamma {options.gamma}, t {t_prior:.3g})"
    )
  logging.info(
    "%d measurement(s), L=%d, sigma=%.3g, K=%d, M-step %s, %s",
    len(paths),
    size,
    sigma,
    options.num_rotations,
    options.m_step,
    prior_note,
  )
  try:
    if config.method == "recommended" and streamed:
      # The starts of the recommended method share in-memory spectra.
      logging.warning(
        "Streamed data: running one start (the recommended "
        "method's several starts need the data in memory; "
        "raise --memory_budget to use them)."
      )
    before_gauge = None
    if config.method == "recommended" and not streamed:
      # Without a given sigma EM refines the estimate from the data.
      result, before_gauge = _recommended(
        measurements,
        size,
        sigma,
        init,
        options,
        prior,
        estimate_sigma=sigma_source == "estimated",
      )
    else:
      result = em.approximate_em(
        measurements,
        size,
        sigma,
        init=init,
        options=options,
        prior=prior,
        crop=config.crop,
      )
  except KeyboardInterrupt as err:
    if streamed:
      measurements.close()
    partial = getattr(err, "partial_result", None)
    if partial is not None:
      estimate = getattr(partial, "estimate", partial)
      if np.ndim(estimate) == 3:  # the starts of `_recommended`: the first
        estimate = estimate[0]
      io.save_estimate(
        config.out,
        estimate,
        sigma=sigma,
        pixel_size=first.pixel_size,
        interrupted=True,
        iterations=getattr(partial, "iterations", None),
      )
      logging.warning(
        "Interrupted: wrote the estimate reached so far to %s "
        "(marked interrupted).",
        config.out,
      )
    raise
  if streamed:
    measurements.close()
  sigma_from_data = None
  if sigma_source == "estimated":
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
    "measurements": len(paths),
    "streamed": streamed,
    "iterations": int(result.iterations),
    "seconds": float(result.seconds),
    "method": config.method,
    "sigma": float(sigma),
    "sigma_source": sigma_source,
    "sigma_from_data": sigma_from_data,
    "final_log_likelihood": (
      float(log_likelihood[-1]) if log_likelihood.size else None
    ),
  }
  if truth is not None:
    summary["error"] = metrics.relative_error(
      truth, result.estimate, options.num_rotations
    )
    summary["initial_error"] = metrics.relative_error(
      truth, init, options.num_rotations
    )
    if oracle is not None:
      stacked, corners, rotations = oracle
      summary["oracle_alignment_error"] = metrics.oracle_alignment_error(
        stacked, truth, corners, rotations, options.num_rotations
      )
  io.save_estimate(
    config.out,
    result.estimate,
    sigma=sigma,
    sigma_estimated=sigma_source == "estimated",
    sigma_from_data=sigma_from_data,
    pixel_size=first.pixel_size,
    log_likelihood=log_likelihood,
    iterations=result.iterations,
    error=summary.get("error"),
    interrupted=False,
    # The recommended method mixes positions or orientations the data and
    # the prior cannot tell apart; this is the sharp winner they came from.
    estimate_before_gauge=before_gauge,
  )
  return summary
