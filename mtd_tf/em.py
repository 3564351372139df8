"""Approximate EM for MTD, with or without a score prior: Algorithm 1.

Each iteration runs the XLA-compiled E-step (`estep.py`, eq. 14-16) and an
M-step from `mstep.M_STEPS` (eq. 17-18): the exact maximiser of Q, the
paper's gradient ascent F <- F + mu (grad Q + gamma(tau) s(F, t_prior)), or
its preconditioned form. The loop is a `tf.while_loop` in one `tf.function`,
prior calls included, and runs a batch of B independent problems at once,
each with its own sigma, M-step, prior weight and stopping point: it stops
when ||F(tau+1) - F(tau)||_F < tolerance, after which its estimate is frozen.

The compiled loop runs in segments of about `_SEGMENT_SECONDS` each, its
state carried from one call to the next, so that Ctrl-C and SIGTERM are
noticed within seconds:
the `KeyboardInterrupt` then carries the last finished iteration as
``err.partial_result``. A non-finite log-likelihood or estimate ends the run
with `EMDivergedError`, whose message names the likely cause.
"""

import collections
import dataclasses
import math
import os
import time
import typing

from absl import logging
import numpy as np
import tensorflow as tf

from mtd_tf import estep as estep_lib
from mtd_tf import mstep as mstep_lib
from mtd_tf import patches as patches_lib
from mtd_tf import priors as priors_lib
from mtd_tf import rotations as rotations_lib
from mtd_tf import table1
from mtd_tf import validation
from mtd_tf.em_options import EMOptions
from mtd_tf.em_options import constant_gamma
from mtd_tf.em_options import gamma_schedule
from mtd_tf.em_options import t_values

__all__ = [
  "EMOptions",
  "EMResult",
  "EMDivergedError",
  "ProblemBatch",
  "gamma_schedule",
  "approximate_em",
  "batched_em",
  "run_prepared",
  "run_streaming",
  "run_loop",
  "build_em_loop",
  "collect_patches",
  "resolved_streams",
  "uses_acceleration",
  "auto_accelerator",
  "M_STEPS",
]

# The names of the registered M-steps (`mstep.M_STEPS`), in index order.
M_STEPS = tuple(mstep_lib.M_STEPS)

# One compiled call runs about this many seconds once the time per iteration
# is known (Ctrl-C waits for no more), and at most _SEGMENT_ITERATIONS
# iterations; each call costs about 2 ms, so fast iterations share one.
# Segments grow at most tenfold from one call to the next, starting at one
# iteration (whose call also traces). Multi-worker runs use fixed segments
# of _FIXED_SEGMENT iterations.
_SEGMENT_SECONDS = 1.0
_SEGMENT_ITERATIONS = 1000
_FIXED_SEGMENT = 10
# Floor of the estimated shift prior rho(l): log rho stays finite.
_RHO_FLOOR = 1e-20
# Compiled loops kept for reuse (each holds its prior and traced graphs).
_LOOP_CACHE_SIZE = 8

# LoopState.failure codes.
_OK, _BAD_LOG_LIKELIHOOD, _BAD_ESTIMATE = 0, 1, 2


class EMDivergedError(ValueError):
  """A run whose log-likelihood or estimate became NaN or Inf."""


class EMResult(typing.NamedTuple):
  """What EM returns.

  Attributes:
    estimate: float numpy [L, L] (or [B, L, L] from `batched_em`).
    iterations: EM iterations run (int, or int [B]).
    log_likelihood: float64 numpy [iterations] (or [T, B], NaN after a
      problem stopped): the data log-likelihood of F(tau), tau = 0, 1, ...
    seconds: wall time of the compiled loop (tracing included on first use).
    sigma: float64 numpy [] (or [B]), the noise level of the last iteration:
      the given one, or with `EMOptions.estimate_sigma` EM's estimate
      (`mstep.noise_mstep`); None where the runner does not track it.
  """

  estimate: np.ndarray
  iterations: typing.Any
  log_likelihood: np.ndarray
  seconds: float
  sigma: typing.Any = None


@dataclasses.dataclass(frozen=True)
class ProblemBatch:
  """B independent EM problems that share the image size L (validated).

  Attributes:
    sigmas: float64 [B], noise standard deviations.
    inits: float64 [B, L, L], the initial estimates F(0).
    m_steps: B names from `M_STEPS`.
    prior_weights: float64 [B], factors on gamma(tau) (0: no prior).
  """

  sigmas: typing.Any
  inits: typing.Any
  m_steps: typing.Any
  prior_weights: typing.Any

  def __post_init__(self):
    sigmas = np.array(
      [validation.positive_finite(s, "sigma") for s in np.ravel(self.sigmas)],
      np.float64,
    )
    batch = len(sigmas)
    inits = np.asarray(self.inits, np.float64)
    if (
      inits.ndim != 3
      or inits.shape[0] != batch
      or (inits.shape[1] != inits.shape[2])
    ):
      raise ValueError(
        f"inits must have shape [B, L, L] with B = {batch}, got {inits.shape}."
      )
    if not np.all(np.isfinite(inits)):
      raise ValueError("inits contain NaN or Inf values.")
    m_steps = tuple(self.m_steps)
    if len(m_steps) != batch or any(m not in M_STEPS for m in m_steps):
      raise ValueError(
        f"m_steps must be {batch} values from {M_STEPS}, got {list(m_steps)}."
      )
    weights = np.asarray(self.prior_weights, np.float64)
    if (
      weights.shape != (batch,)
      or not np.all(np.isfinite(weights))
      or (not np.all(weights >= 0))
    ):
      raise ValueError("prior_weights must be B finite non-negative numbers.")
    object.__setattr__(self, "sigmas", sigmas)
    object.__setattr__(self, "inits", inits)
    object.__setattr__(self, "m_steps", m_steps)
    object.__setattr__(self, "prior_weights", weights)

  @property
  def size(self):
    """B."""
    return len(self.sigmas)

  @property
  def image_size(self):
    """L."""
    return self.inits.shape[1]


class LoopState(typing.NamedTuple):
  """The EM loop's state, carried from one compiled segment to the next.

  Attributes:
    tau: int32 [], iterations run (by the longest-running problem).
    images: float [B, L, L], the estimates of the last finished iteration.
    active: bool [B], problems still iterating.
    iterations: int32 [B], iterations each problem has run.
    failure: int32 [B], 0, or why a problem failed (`_BAD_*`).
    log_rho: float [B, 2L, 2L], log of the shift prior rho(l) (uniform
      unless `EMOptions.estimate_shift_prior`).
    sigma: float [B], the noise level of the next E-step (the given one
      unless `EMOptions.estimate_sigma`).
  """

  tau: tf.Tensor
  images: tf.Tensor
  active: tf.Tensor
  iterations: tf.Tensor
  failure: tf.Tensor
  log_rho: tf.Tensor
  sigma: tf.Tensor


class _RunInputs(typing.NamedTuple):
  """Tensors fixed for one run: passed, not captured, so one graph serves all."""

  sigma: tf.Tensor  # [B]
  method: tf.Tensor  # int32 [B], indices into M_STEPS
  prior_weight: tf.Tensor  # [B]
  total: tf.Tensor  # int32 [], T
  tolerance: tf.Tensor  # []
  learning_rate: tf.Tensor  # []
  t_prior: tf.Tensor  # float32 [T] (or [1]): the score's t per iteration
  prior_curvature: tf.Tensor  # [T] (or [1])
  progress_every: tf.Tensor  # int32 []
  started: tf.Tensor  # float64 [], time.time() at the start of the run


def resolved_streams(options):
  """The number of E-step streams: options.num_streams, or one per core."""
  if options.num_streams is not None:
    return int(options.num_streams)
  return max(1, min(os.cpu_count() or 1, 8))


def _log_progress(done, total, log_likelihood, change, running, batch, started):
  """The progress line, called from inside the compiled loop."""
  seconds = (time.time() - float(started)) / max(int(done), 1)
  logging.info(
    "EM iteration %d / %d | log-likelihood %.3g | change %.3g | running "
    "%d / %d | %.3g s/it | ETA %.3g s",
    int(done),
    int(total),
    float(log_likelihood),
    float(change),
    int(running),
    int(batch),
    seconds,
    seconds * max(int(total) - int(done), 0),
  )
  return np.int32(0)


def build_em_loop(
  rotations,
  kinds,
  prior,
  gradient_steps,
  gamma,
  num_streams=1,
  statistics_fn=None,
  estimate_shift_prior=False,
  estimate_sigma=False,
):
  """Builds one compiled segment of the EM loop for a static configuration.

  Args:
    rotations: the `RotationSet`.
    kinds: the names of the M-steps the batch uses (a tuple).
    prior: None or a `priors.Prior` (None when no problem uses one).
    gradient_steps: N inner steps of the gradient and preconditioned M-steps.
    gamma: the gamma(tau) schedule spec (`gamma_schedule`).
    num_streams: concurrent E-step chunk streams.
    statistics_fn: `statistics_fn(images, sigma, *data) -> estep.Statistics`
      computes the E-step; by default the local compiled E-step on data =
      (spectra, squared_norms, mask) or (spectra, squared_norms, mask,
      groups) when problems share measurements (`batched_em`'s groups).
      `distributed.py` passes one that runs under a `tf.distribute.Strategy`
      (and data = ()).
    estimate_shift_prior: estimate the shift prior rho(l) with EM (the
      local E-step only): the E-step uses state.log_rho, and rho is updated
      after each E-step to (1 / D) sum_{m,k} w[m, l, k].
    estimate_sigma: estimate the noise level with EM (the local E-step
      only): after each M-step sigma becomes `mstep.noise_mstep` at the new
      F, and the next E-step uses it.

  Returns:
    A `tf.function` ``segment(state, data, run, end) -> (state, history)``
    that runs iterations from ``state.tau`` until ``end``, convergence of
    every problem or a failure; history is float64 [iterations run, B], the
    log-likelihood of each F(tau) (NaN for stopped problems).
  """
  for name, value in (
    ("estimate_shift_prior", estimate_shift_prior),
    ("estimate_sigma", estimate_sigma),
  ):
    if value and statistics_fn is not None:
      raise ValueError(
        f"{name} needs the local E-step: use EMOptions({name}=False) with a "
        "custom statistics_fn."
      )
  if statistics_fn is None:
    estep = estep_lib.make_estep(rotations, num_streams=num_streams)

    def statistics_fn(images, sigma, spectra, squared_norms, mask, groups=None):
      return estep(images, spectra, squared_norms, mask, sigma, groups)

  def shift_statistics_fn(
    images, log_rho, sigma, spectra, squared_norms, mask, groups=None
  ):
    return estep(
      images,
      spectra,
      squared_norms,
      mask,
      sigma,
      groups,
      log_rho,
      with_shift_posterior=True,
    )

  gamma_fn = gamma_schedule(gamma)
  prior_mean = prior.gaussian_mean if prior is not None else None

  def m_step(tau, images, stats, run, sigma):
    dtype = images.dtype
    weight = None
    if prior is not None:
      weight = (
        tf.cast(gamma_fn(tf.cast(tau, dtype), tf.cast(run.total, dtype)), dtype)
        * run.prior_weight
      )  # [B]
    # The prior's time and curvature of this iteration (`t_values`).
    step = tf.minimum(tau, tf.shape(run.t_prior)[0] - 1)
    inputs = mstep_lib.MStepInputs(
      sigma=sigma,
      rotations=rotations,
      learning_rate=run.learning_rate,
      num_steps=gradient_steps,
      prior=prior,
      prior_weight=weight,
      t_prior=run.t_prior[step],
      prior_curvature=run.prior_curvature[step],
      prior_mean=prior_mean,
    )
    updated = mstep_lib.M_STEPS[kinds[0]](images, stats, inputs)
    for kind in kinds[1:]:
      updated = tf.where(
        tf.equal(run.method, M_STEPS.index(kind))[:, None, None],
        mstep_lib.M_STEPS[kind](images, stats, inputs),
        updated,
      )
    return updated

  if prior is None:
    # Without a network call the M-step compiles too: one XLA launch
    # instead of dozens of small ops.
    m_step = tf.function(m_step, jit_compile=True)

  @tf.function
  def segment(state, data, run, end):
    start = state.tau
    if estimate_sigma:
      # sum_m ||M_m||^2 and D do not change across iterations.
      energy, count = _patch_energy(*data[1:])  # [B], [B]

    def body(state, history):
      tau, images, active, iterations, failure, log_rho, sigma = state
      if estimate_shift_prior:
        stats, rho = shift_statistics_fn(images, log_rho, sigma, *data)
        if estimate_shift_prior == "occupancy":
          rho = occupancy_shift_prior(rho)
        # The floor keeps log rho finite where no patch sits.
        new_log_rho = tf.ensure_shape(
          tf.math.log(tf.maximum(rho, _RHO_FLOOR)), log_rho.shape
        )  # [B, 2L, 2L]
      else:
        stats = statistics_fn(images, sigma, *data)
        new_log_rho = log_rho
      updated = m_step(tau, images, stats, run, sigma)
      # The compiled E-step is traced with a relaxed batch size: restore the
      # static shapes the loop variables entered with.
      updated = tf.ensure_shape(updated, images.shape)  # [B, L, L]
      new_sigma = sigma
      if estimate_sigma:
        new_sigma = tf.ensure_shape(
          mstep_lib.noise_mstep(updated, stats, rotations, energy, count),
          sigma.shape,
        )  # [B]
      change = tf.ensure_shape(
        tf.sqrt(tf.reduce_sum((updated - images) ** 2, axis=[1, 2])),
        active.shape,
      )  # [B]
      log_likelihood = tf.ensure_shape(stats.log_likelihood, active.shape)
      history = history.write(
        tau - start,
        tf.where(
          active,
          tf.cast(log_likelihood, tf.float64),
          tf.constant(np.nan, tf.float64),
        ),
      )
      # Non-finite values in the dtype we compute in end the run.
      finite_ll = tf.math.is_finite(log_likelihood)  # [B]
      finite_estimate = tf.reduce_all(
        tf.math.is_finite(updated), axis=[1, 2]
      ) & tf.math.is_finite(new_sigma)
      failure = tf.where(
        active & ~finite_ll,
        _BAD_LOG_LIKELIHOOD,
        tf.where(active & ~finite_estimate, _BAD_ESTIMATE, failure),
      )
      good = active & finite_ll & finite_estimate
      images = tf.where(good[:, None, None], updated, images)
      log_rho = tf.where(good[:, None, None], new_log_rho, log_rho)
      sigma = tf.where(good, new_sigma, sigma)
      iterations += tf.cast(good, tf.int32)
      active = good & (change >= run.tolerance)
      # Every progress_every iterations, and at the last one.
      report = (run.progress_every > 0) & (
        tf.equal((tau + 1) % tf.maximum(run.progress_every, 1), 0)
        | tf.equal(tau + 1, run.total)
        | ~tf.reduce_any(active)
      )
      tf.cond(
        report,
        lambda: tf.numpy_function(
          _log_progress,
          [
            tau + 1,
            run.total,
            tf.cast(log_likelihood[0], tf.float64),
            tf.cast(tf.reduce_max(change), tf.float64),
            tf.reduce_sum(tf.cast(active, tf.int32)),
            tf.size(active),
            run.started,
          ],
          tf.int32,
          stateful=True,
        ),
        lambda: tf.constant(0, tf.int32),
      )
      return (
        LoopState(tau + 1, images, active, iterations, failure, log_rho, sigma),
        history,
      )

    def running(state, history):
      del history
      return (
        (state.tau < end)
        & tf.reduce_any(state.active)
        & tf.reduce_all(tf.equal(state.failure, _OK))
      )

    history = tf.TensorArray(
      tf.float64, size=0, dynamic_size=True, element_shape=state.active.shape
    )
    state, history = tf.while_loop(running, body, (state, history))
    return state, history.stack()  # [iterations run, B]

  return segment


_LOOPS = collections.OrderedDict()


def _patch_energy(squared_norms, mask, groups=None):
  """sum_m ||M_m||^2 and D of every problem's patches: float [B], [B]."""
  if groups is not None:
    squared_norms = tf.gather(squared_norms, groups)  # [B, C, S]
    mask = tf.gather(mask, groups)  # [B, C, S]
  return (
    tf.reduce_sum(mask * squared_norms, axis=[1, 2]),
    tf.reduce_sum(mask, axis=[1, 2]),
  )


def _precomputed_statistics(images, sigma, s1, visibility, log_likelihood):
  """The statistics_fn of a loop whose E-step ran outside it (streaming)."""
  del images, sigma
  return estep_lib.Statistics(s1, visibility, log_likelihood)


def occupancy_shift_prior(rho):
  """Projects a shift prior onto the occupancy family: the M-step of rho.

  The family has one parameter, the probability epsilon of an empty patch
  (the shifts with lx == L or ly == L, docs/conventions.md); the other
  shifts share 1 - epsilon equally, as copies placed uniformly at random
  do. Its EM update is the free update summed over each tied set, so
  epsilon is the mean posterior mass of the empty shifts: one number
  estimated from all D patches instead of (2L)^2.

  Args:
    rho: float [B, 2L, 2L], the free update (1 / D) sum_{m,k} w[m, l, k].

  Returns:
    float [B, 2L, 2L], rho(l) in the occupancy family.
  """
  two_l = rho.shape[-1]
  index = tf.range(two_l)
  empty_row = tf.equal(index, two_l // 2)
  empty = tf.cast(
    tf.logical_or(empty_row[:, None], empty_row[None, :]), rho.dtype
  )  # [2L, 2L]
  num_empty = 2 * two_l - 1
  epsilon = tf.reduce_sum(rho * empty, axis=[1, 2])  # [B]
  full = (1.0 - epsilon) / (two_l * two_l - num_empty)
  return (
    empty * (epsilon / num_empty)[:, None, None]
    + (1.0 - empty) * full[:, None, None]
  )  # [B, 2L, 2L]


def _cached_loop(
  rotations,
  kinds,
  prior,
  gradient_steps,
  gamma,
  num_streams,
  precomputed=False,
  estimate_shift_prior=False,
  estimate_sigma=False,
):
  """`build_em_loop`, reused across runs (LRU of `_LOOP_CACHE_SIZE`).

  An entry holds its prior and gamma, so their ids in the key cannot be
  reused by other objects while the entry lives. With `precomputed`, the
  loop's data are the E-step's `Statistics` (computed by the caller).
  """
  key = (
    rotations,
    kinds,
    id(prior),
    gradient_steps,
    id(gamma) if callable(gamma) else gamma,
    num_streams,
    precomputed,
    estimate_shift_prior,
    estimate_sigma,
  )
  entry = _LOOPS.get(key)
  if entry is not None and entry[0] is prior:
    _LOOPS.move_to_end(key)
    return entry[2]
  loop = build_em_loop(
    rotations,
    kinds,
    prior,
    gradient_steps,
    gamma,
    num_streams,
    statistics_fn=_precomputed_statistics if precomputed else None,
    estimate_shift_prior=estimate_shift_prior,
    estimate_sigma=estimate_sigma,
  )
  _LOOPS[key] = (prior, gamma, loop)
  while len(_LOOPS) > _LOOP_CACHE_SIZE:
    _LOOPS.popitem(last=False)
  return loop


def collect_patches(measurements, image_size, crop, grids_per_axis=1):
  """Patches of one measurement or of several sharing one image.

  With grids_per_axis > 1, those of every offset grid of each measurement
  (`patches.offset_grid_patches`).
  """
  if not isinstance(measurements, (list, tuple)):
    measurements = [measurements]
  if not measurements:
    raise ValueError("Got an empty list of measurements.")
  return np.concatenate(
    [
      patches_lib.offset_grid_patches(m, image_size, grids_per_axis, crop)
      for m in measurements
    ]
  )


def batched_em(
  measurements,
  image_size,
  sigmas,
  *,
  inits,
  m_steps,
  prior=None,
  prior_weights=None,
  options=EMOptions(),
  crop=False,
  groups=None,
):
  """Runs B independent EM problems as one compiled graph execution.

  Args:
    measurements: list of B items (G with groups), each an array [H, W] or
      a list of such arrays (micrographs sharing one image).
    image_size: L.
    sigmas: B noise standard deviations.
    inits: array [B, L, L], the initial estimates F(0).
    m_steps: B names from `M_STEPS` (options.m_step is not used).
    prior: None, a `priors.Prior` (`priors.load_prior`,
      `priors.GaussianPrior`, ...) or a bare score callable (wrapped in
      `priors.ScorePrior`).
    prior_weights: B non-negative factors on gamma(tau) (0 = no prior for
      that problem); default 1 where a prior is given.
    options: `EMOptions`.
    crop: crop measurement sides to multiples of L.
    groups: None, or B indices into measurements: problem b is EM on
      measurements[groups[b]] (several starts of one problem share its
      patch spectra; the results equal those of B separate copies).

  Returns:
    `EMResult` with estimate [B, L, L], iterations [B], log_likelihood
    [T', B] (T' the iterations of the longest run).

  Raises:
    ValueError: on bad measurements, sigmas, inits, m_steps, prior or
      options.
    EMDivergedError: the log-likelihood or an estimate became NaN or Inf.
    KeyboardInterrupt: with ``partial_result``, an `EMResult` of the last
      finished iteration.
  """
  size = int(image_size)
  if len(measurements) == 0:
    raise ValueError("batched_em needs at least one measurement.")
  if groups is not None:
    groups = np.asarray(groups)
    if (
      groups.ndim != 1
      or not np.issubdtype(groups.dtype, np.integer)
      or len(groups) == 0
      or groups.min() < 0
      or groups.max() >= len(measurements)
    ):
      raise ValueError(
        f"groups must be B integers in [0, "
        f"{len(measurements)}), got {groups.tolist()}."
      )
  batch = len(measurements) if groups is None else len(groups)
  patch_sets = [collect_patches(m, size, crop) for m in measurements]
  if np.size(sigmas) != batch:
    raise ValueError(f"Got {np.size(sigmas)} sigmas for {batch} measurements.")
  if np.shape(inits) != (batch, size, size):
    raise ValueError(
      f"inits must have shape {(batch, size, size)}, got {np.shape(inits)}."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, size)
  if prior is None or prior_weights is None:
    prior_weights = [0.0 if prior is None else 1.0] * batch
  problems = ProblemBatch(sigmas, inits, m_steps, prior_weights)
  if (
    prior is not None
    and prior.gaussian_mean is None
    and any(
      m == "closed_form" and w > 0
      for m, w in zip(problems.m_steps, problems.prior_weights)
    )
  ):
    raise ValueError(
      "A learned score prior has no closed-form M-step: use "
      "m_step='gradient' or 'preconditioned' (only a prior with an exact "
      "Gaussian score has one)."
    )

  dtype = tf.float32 if options.dtype == "float32" else tf.float64
  # A chunk holds about chunk_size patches in all: the batch shares it.
  chunk = patches_lib.balanced_chunk_size(
    max(len(p) for p in patch_sets),
    max(1, -(-int(options.chunk_size) // batch)),
    resolved_streams(options),
  )
  data = patches_lib.patch_spectra(patch_sets, chunk, dtype)
  return run_prepared(data, problems, prior, options, groups=groups)


def _loop_for(dtype, image_size, batch, prior, options, streams, **kwargs):
  """(prior used or None, `RotationSet`, cached compiled loop) of a batch.

  Args:
    dtype: the dtype of the data (must be options.dtype).
    image_size: L.
    batch: the `ProblemBatch`.
    prior: None, a `priors.Prior` or a bare score callable.
    options: `EMOptions`.
    streams: E-step streams of the loop.
    **kwargs: passed to `_cached_loop`.
  """
  if tf.as_dtype(dtype).name != options.dtype:
    raise ValueError(
      f"The data are {tf.as_dtype(dtype).name} but options.dtype is "
      f"{options.dtype}: compute them in options.dtype."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, image_size)
  used = prior if batch.prior_weights.any() else None
  rotations = rotations_lib.rotation_set(image_size, options.num_rotations)
  kinds = tuple(k for k in M_STEPS if k in batch.m_steps)
  loop = _cached_loop(
    rotations,
    kinds,
    used,
    int(options.gradient_steps),
    options.gamma,
    streams,
    **kwargs,
  )
  return used, rotations, loop


def run_prepared(
  data,
  batch,
  prior,
  options,
  max_iterations=None,
  *,
  groups=None,
  start_iteration=0,
):
  """Runs the compiled EM loop on precomputed patch spectra.

  `batched_em` validates its input, computes the spectra once and calls
  this; benchmarks call it repeatedly on the same `patches.PatchSpectra`.

  Args:
    data: `patches.PatchSpectra` of B problems, in options.dtype.
    batch: the `ProblemBatch`.
    prior: None or a `priors.Prior` (or a bare score callable).
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.
    groups: None (data holds B problems), or int [B] indices into the G
      problems of data.
    start_iteration: tau of the first iteration (gamma(tau) of eq. 18
      continues from there: a run resumed after pruning).

  Returns:
    `EMResult`.
  """
  used, _, loop = _loop_for(
    data.squared_norms.dtype,
    data.image_size,
    batch,
    prior,
    options,
    resolved_streams(options),
    estimate_shift_prior=options.estimate_shift_prior,
    estimate_sigma=options.estimate_sigma,
  )
  _check_resolution(data, batch, options, groups)
  arrays = (data.spectra, data.squared_norms, data.mask)
  if groups is not None:
    arrays += (tf.constant(np.asarray(groups), tf.int32),)
  if start_iteration == 0 and uses_acceleration(options, batch, used):
    counts = np.asarray(data.num_patches)
    return _accelerated(
      lambda problems, plain: run_loop(loop, arrays, problems, used, plain, 1),
      batch,
      options,
      max_iterations,
      num_patches=int(np.min(counts if groups is None else counts[groups])),
    )
  return run_loop(
    loop,
    arrays,
    batch,
    used,
    options,
    max_iterations,
    start_iteration=start_iteration,
  )


# Rounding error of a float32 logit, in nats, above which the posterior
# weights (eq. 15) are noise: logits of size ||M_m||^2 / (2 sigma^2) carry
# errors of that size times 2^-24, and XLA may recompute them in a fused
# exp (overflowing to Inf).
_MAX_LOGIT_ROUNDING = 1.0


def _check_resolution(data, batch, options, groups=None):
  """Refuses, before EM, a sigma too small for the dtype to resolve.

  Raises:
    EMDivergedError: float32 logits whose rounding exceeds
      `_MAX_LOGIT_ROUNDING` nats for some problem.
  """
  if options.dtype != "float32":
    return
  largest = np.max(
    np.asarray(data.squared_norms, np.float64).reshape(
      len(data.squared_norms), -1
    ),
    axis=1,
  )  # [G]
  if groups is not None:
    largest = largest[np.asarray(groups)]
  sigmas = np.asarray(batch.sigmas, np.float64).reshape(-1)
  rounding = largest / (2 * sigmas**2) * 2.0**-24  # [B]
  bad = np.flatnonzero(rounding > _MAX_LOGIT_ROUNDING)
  if len(bad):
    sigma = sigmas[bad[0]]
    raise EMDivergedError(
      f"sigma={sigma:.3g} is too small for float32 (the E-step's logits "
      f"would carry rounding errors of {rounding[bad[0]]:.3g} nats): use "
      "dtype='float64' or a larger sigma."
    )


def run_streaming(data, batch, prior, options, max_iterations=None):
  """Runs EM on micrographs streamed from disk (`streaming.StreamingData`).

  Every iteration streams all micrographs through the compiled E-step
  (`StreamingData.statistics`, peak memory bounded by its budget) and then
  runs the compiled loop's M-step and bookkeeping for one iteration on those
  statistics; the statistics add over micrographs exactly as in memory, so
  the result equals `run_prepared` on the same patches up to rounding.

  Args:
    data: `streaming.StreamingData` in options.dtype, shared by the B
      problems of `batch`.
    batch: the `ProblemBatch`.
    prior: None or a `priors.Prior` (or a bare score callable).
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.

  Returns:
    `EMResult`.
  """
  for name in ("estimate_shift_prior", "estimate_sigma"):
    if getattr(options, name):
      # rho(l) and sigma live in the compiled loop's state, which a streamed
      # E-step bypasses: refuse rather than silently keep them fixed.
      raise ValueError(
        f"{name} is not supported on streamed micrographs: hold them in "
        "memory (a larger memory budget) or leave it off."
      )
  used, rotations, loop = _loop_for(
    data.dtype, data.image_size, batch, prior, options, 1, precomputed=True
  )
  sigma = tf.constant(batch.sigmas, tf.as_dtype(options.dtype))

  def statistics(images):
    return tuple(data.statistics(images, sigma, rotations))

  if uses_acceleration(options, batch, used):
    return _accelerated(
      lambda problems, plain: run_loop(
        loop, (), problems, used, plain, 1, data_fn=statistics
      ),
      batch,
      options,
      max_iterations,
      num_patches=int(data.num_patches),
    )
  return run_loop(
    loop, (), batch, used, options, max_iterations, data_fn=statistics
  )


def uses_acceleration(options, batch, prior):
  """Whether an accelerator runs: options.acceleration, "auto" resolved.

  "auto" accelerates (with `auto_accelerator`'s choice) closed-form and
  preconditioned M-steps (which maximise Q, or nearly) when the objective
  does not change with tau: no prior, or a constant gamma. The gradient
  M-step of eq. (18) takes small steps that extrapolation gains little
  from.

  Raises:
    ValueError: an explicit accelerator with a prior weighted
      by a gamma that changes with tau (extrapolation needs one fixed
      objective).
  """
  if (
    options.acceleration == "none"
    or options.estimate_shift_prior
    or options.estimate_sigma
  ):
    # (The accelerators' one-iteration runs would restart rho and sigma.)
    return False
  # An annealed prior (t_schedule) changes the objective with tau too.
  time_dependent = prior is not None and (
    not constant_gamma(options.gamma) or options.t_schedule is not None
  )
  if options.acceleration != "auto":
    if time_dependent:
      raise ValueError(
        f"acceleration={options.acceleration!r} needs a constant gamma and "
        f"no t_schedule, got gamma={options.gamma!r}, "
        f"t_schedule={options.t_schedule!r}: use gamma='constant:V' or "
        "acceleration='none'."
      )
    return True
  return not time_dependent and all(
    m in ("closed_form", "preconditioned") for m in batch.m_steps
  )


# "auto" takes the secant method from this many patches per image pixel
# (D >= 4 L^2): with that much data EM is near linear soon and its
# Jacobian near diagonal in pixels. Measured (EM-map evaluations to plain
# EM's 100-iteration log-likelihood, MNIST digits): 4088^2 (27 patches per
# pixel) secant 13, Anderson 22, SQUAREM 25; 2044^2 (6.8) 20-23 against
# 22-27; 1036^2 (1.7) 41-51 against SQUAREM's 30-36 (docs/scaling.md).
AUTO_SECANT_PATCHES_PER_PIXEL = 4


def auto_accelerator(num_patches, image_size):
  """The accelerator "auto" runs for D patches of an L x L image."""
  enough = num_patches >= AUTO_SECANT_PATCHES_PER_PIXEL * image_size**2
  return "secant" if enough else "squarem"


def _accelerated(one_iteration, batch, options, max_iterations, num_patches):
  """The accelerator over one-iteration runs of the loop.

  options.acceleration "anderson", "secant" or "squarem" runs that
  function of `acceleration`; "auto" `auto_accelerator`'s choice for the
  fewest patches of any problem (docs/scaling.md compares them).

  Args:
    one_iteration: (ProblemBatch, EMOptions) -> `EMResult` of one plain
      EM iteration from the batch's inits.
    batch: the `ProblemBatch`.
    options: `EMOptions` (max_iterations counts EM-map evaluations).
    max_iterations: overrides options.max_iterations.
    num_patches: the fewest patches D of any problem (int).

  Returns:
    `EMResult`: iterations are EM-map evaluations (each one E-step and one
    M-step), log_likelihood has one row per step (a SQUAREM cycle, an
    Anderson iteration; at its start, non-decreasing) and a last row at the
    returned estimate.
  """
  from mtd_tf import acceleration  # pylint: disable=g-import-not-at-top

  total = int(
    options.max_iterations if max_iterations is None else max_iterations
  )
  plain = dataclasses.replace(options, progress_every=0, tolerance=0.0)
  last = {}
  start = time.perf_counter()
  started = time.time()

  def em_map(images):
    problems = dataclasses.replace(batch, inits=np.asarray(images, np.float64))
    result = one_iteration(problems, plain)
    last["result"] = result
    last["count"] = last.get("count", 0) + 1
    every = int(options.progress_every)
    if every and last["count"] % every == 0:
      _log_progress(
        last["count"],
        total,
        result.log_likelihood[0, 0],
        np.nan,
        batch.size,
        batch.size,
        started,
      )
    return result.estimate, result.log_likelihood[0]

  if total == 0:
    return EMResult(
      batch.inits.copy(),
      np.zeros(batch.size, int),
      np.zeros((0, batch.size)),
      0.0,
      batch.sigmas.copy(),
    )
  try:
    name = options.acceleration
    if name == "auto":
      name = auto_accelerator(num_patches, batch.inits.shape[-1])
    accelerator = getattr(acceleration, name)
    result = accelerator(
      em_map,
      batch.inits,
      max_evaluations=total,
      tolerance=float(options.tolerance),
    )
  except KeyboardInterrupt as err:
    done = last.get("result")
    if done is not None:
      err.partial_result = EMResult(
        done.estimate,
        np.full(batch.size, last["count"]),
        done.log_likelihood,
        time.perf_counter() - start,
        batch.sigmas.copy(),
      )
    raise
  return EMResult(
    result.estimate,
    np.full(batch.size, result.evaluations),
    result.log_likelihood,
    result.seconds,
    batch.sigmas.copy(),
  )


def _result(state, rows, seconds):
  """The `EMResult` of a loop state and the history rows of its segments."""
  iterations = state.iterations.numpy()
  history = np.concatenate(rows) if rows else np.zeros((0, len(iterations)))
  return EMResult(
    state.images.numpy(),
    iterations,
    history[: int(iterations.max()) if len(iterations) else 0],
    seconds,
    state.sigma.numpy().astype(np.float64),
  )


def _diverged(state, batch, prior, t_prior, options):
  """The `EMDivergedError` of a failed loop state, naming the likely cause."""
  failure = state.failure.numpy()
  b = int(np.flatnonzero(failure)[0])
  done = int(state.iterations.numpy()[b])
  sigma = batch.sigmas[b]
  what = "log-likelihood" if failure[b] == _BAD_LOG_LIKELIHOOD else "estimate"
  where = f" in problem {b}" if batch.size > 1 else ""
  last = state.images.numpy()[b]
  small_sigma = f"sigma={sigma:.3g} is too small for {options.dtype}: " + (
    "use dtype='float64' or a larger sigma."
    if options.dtype == "float32"
    else "use a larger sigma (or rescale the data)."
  )
  prior_fails = False
  if prior is not None and batch.prior_weights[b] > 0:
    score = prior(
      tf.constant(last[None], tf.float32), tf.constant([t_prior], tf.float32)
    )
    prior_fails = not np.all(np.isfinite(score.numpy()))
  if failure[b] == _BAD_LOG_LIKELIHOOD and done == 0:
    cause = "already at the initial estimate: " + small_sigma
  elif prior_fails:
    cause = (
      "the prior returned NaN or Inf scores at the last finite "
      "estimate: check the prior (priors.probe) or run without it."
    )
  elif batch.m_steps[b] == "gradient":
    cause = (
      f"the gradient step diverged (largest |F| "
      f"{np.max(np.abs(last)):.3g} before it): use a smaller "
      f"learning_rate than {options.learning_rate:.3g}, or "
      "m_step='preconditioned'."
    )
  else:
    cause = small_sigma
  return EMDivergedError(
    f"EM diverged: the {what}{where} became NaN or Inf at iteration "
    f"{done + 1}; {cause}"
  )


def run_loop(
  loop,
  data,
  batch,
  prior,
  options,
  max_iterations=None,
  adaptive=True,
  start_iteration=0,
  data_fn=None,
):
  """Runs a compiled EM loop (`build_em_loop`) in segments; numpy results.

  Args:
    loop: the compiled segment from `build_em_loop`.
    data: the data arguments of its statistics_fn.
    batch: the `ProblemBatch`.
    prior: None or the `priors.Prior` the loop was built with.
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.
    adaptive: size segments by their measured time; False: always
      `_FIXED_SEGMENT` iterations, the same on every worker of a
      multi-worker run.
    start_iteration: tau at the start (iterations before it count as run:
      the loop stops at max_iterations in all).
    data_fn: None, or a callable images [B, L, L] -> the loop's data for
      one iteration from those images (a loop built with precomputed
      statistics: the E-step streamed outside the compiled loop); segments
      are then one iteration each and `data` is not used.

  Returns:
    `EMResult` (iterations and log_likelihood count only the iterations
    run here).

  Raises:
    EMDivergedError: a non-finite log-likelihood or estimate.
    KeyboardInterrupt: re-raised with ``partial_result``, the `EMResult` of
      the last finished segment (the work of the segment in flight, about
      `_SEGMENT_SECONDS`, is lost).
  """
  dtype = tf.as_dtype(options.dtype)
  total = int(
    options.max_iterations if max_iterations is None else max_iterations
  )
  t_prior = (
    options.t_prior
    if options.t_prior is not None
    else prior.t_prior
    if prior is not None
    else table1.T_PRIOR
  )
  curvature = (
    options.prior_curvature
    if options.prior_curvature is not None
    else prior.curvature(t_prior)
    if prior is not None
    else 1.0
  )
  times = [t_prior]
  curvatures = [curvature]
  if options.t_schedule is not None:
    times = list(t_values(options.t_schedule, t_prior, total))
    curvatures = [
      options.prior_curvature
      if options.prior_curvature is not None
      else prior.curvature(t)
      if prior is not None
      else 1.0
      for t in times
    ]
  run = _RunInputs(
    sigma=tf.constant(batch.sigmas, dtype),
    method=tf.constant([M_STEPS.index(m) for m in batch.m_steps], tf.int32),
    prior_weight=tf.constant(batch.prior_weights, dtype),
    total=tf.constant(total, tf.int32),
    tolerance=tf.constant(options.tolerance, dtype),
    learning_rate=tf.constant(options.learning_rate, dtype),
    t_prior=tf.constant(times, tf.float32),
    prior_curvature=tf.constant(curvatures, dtype),
    progress_every=tf.constant(int(options.progress_every), tf.int32),
    started=tf.constant(time.time(), tf.float64),
  )
  size = batch.size
  state = LoopState(
    tau=tf.constant(int(start_iteration), tf.int32),
    images=tf.constant(batch.inits, dtype),
    active=tf.ones([size], tf.bool),
    iterations=tf.zeros([size], tf.int32),
    failure=tf.zeros([size], tf.int32),
    # rho starts uniform over the (2L)^2 shifts.
    log_rho=tf.fill(
      [size, 2 * batch.image_size, 2 * batch.image_size],
      tf.constant(-math.log(4 * batch.image_size**2), dtype),
    ),
    sigma=tf.constant(batch.sigmas, dtype),
  )
  # One binding, so an interrupt never sees a state without its history.
  finished = (state, [])
  length = 1 if adaptive or data_fn is not None else _FIXED_SEGMENT
  start = time.perf_counter()
  try:
    while True:
      state, rows = finished
      tau = int(state.tau)
      if tau >= total or not bool(tf.reduce_any(state.active)):
        break
      begun = time.perf_counter()
      if data_fn is not None:
        data = data_fn(state.images)
      new_state, history = loop(
        state, data, run, tf.constant(min(tau + length, total), tf.int32)
      )
      finished = (new_state, rows + [history.numpy()])
      if bool(tf.reduce_any(new_state.failure != _OK)):
        raise _diverged(new_state, batch, prior, t_prior, options)
      if adaptive and data_fn is None:
        ran = max(int(new_state.tau) - tau, 1)
        seconds = max(time.perf_counter() - begun, 1e-9) / ran
        length = int(
          min(max(_SEGMENT_SECONDS / seconds, 1), _SEGMENT_ITERATIONS, 10 * ran)
        )
  except KeyboardInterrupt as err:
    state, rows = finished
    err.partial_result = _result(state, rows, time.perf_counter() - start)
    raise
  state, rows = finished
  result = _result(state, rows, time.perf_counter() - start)
  if not options.estimate_sigma:
    # The given sigma, not its rounding to the loop's dtype.
    result = result._replace(sigma=batch.sigmas.copy())
  return result


def _first(result):
  """The single-problem form of a batch-of-one `EMResult`."""
  return EMResult(
    result.estimate[0],
    int(result.iterations[0]),
    result.log_likelihood[:, 0],
    result.seconds,
    None if result.sigma is None else float(result.sigma[0]),
  )


def _is_streaming(measurements):
  from mtd_tf import streaming  # pylint: disable=g-import-not-at-top

  return isinstance(measurements, streaming.StreamingData)


def _streaming_em(data, image_size, sigma, init, options, prior):
  """`approximate_em` on a `streaming.StreamingData`: checks, then streams."""
  if data.image_size != int(image_size):
    raise ValueError(
      f"The streamed data have L = {data.image_size}, not "
      f"image_size = {image_size}."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, int(image_size))
  if (
    prior is not None
    and prior.gaussian_mean is None
    and options.m_step == "closed_form"
  ):
    raise ValueError(
      "A learned score prior has no closed-form M-step: use "
      "m_step='gradient' or 'preconditioned' (only a prior with an exact "
      "Gaussian score has one)."
    )
  problems = ProblemBatch(
    [sigma], init[None], [options.m_step], [0.0 if prior is None else 1.0]
  )
  return run_streaming(data, problems, prior, options)


def approximate_em(
  measurements,
  image_size,
  sigma,
  *,
  init,
  options=EMOptions(),
  prior=None,
  crop=False,
):
  """Approximate EM for one image (Algorithm 1; no prior by default).

  Args:
    measurements: array [H, W] (sides multiples of L), a list of such
      micrographs that share one image and one sigma, or a
      `streaming.StreamingData` (micrographs streamed from disk every
      iteration in bounded memory: `run_streaming`).
    image_size: L.
    sigma: noise standard deviation.
    init: array [L, L], F(0).
    options: `EMOptions`; options.m_step picks the M-step: "closed_form"
      (exact maximiser of Q, or the MAP with an exact Gaussian prior),
      "gradient" (eq. 18, the paper's fixed step mu) or "preconditioned"
      (steps scaled by the curvature of Q and the prior's).
    prior: None, a `priors.Prior`, or a bare score callable.
    crop: crop sides to multiples of L instead of raising.

  Returns:
    `EMResult` with estimate [L, L], iterations (int) and log_likelihood
    [iterations].

  Raises:
    ValueError: on bad input, with a message that says what to change.
    EMDivergedError: the log-likelihood or the estimate became NaN or Inf.
    KeyboardInterrupt: with ``partial_result`` (the last finished
      iteration, in this single-problem form).
  """
  init = validation.image_array(init, "init")
  if init.shape[0] != int(image_size):
    raise ValueError(
      f"init must be {image_size} x {image_size}, got {init.shape}."
    )
  try:
    if _is_streaming(measurements):
      result = _streaming_em(
        measurements, image_size, sigma, init, options, prior
      )
    else:
      result = batched_em(
        [measurements],
        image_size,
        [sigma],
        inits=init[None],
        m_steps=[options.m_step],
        prior=prior,
        options=options,
        crop=crop,
      )
  except KeyboardInterrupt as err:
    partial = getattr(err, "partial_result", None)
    if partial is not None:
      err.partial_result = _first(partial)
    raise
  return _first(result)
