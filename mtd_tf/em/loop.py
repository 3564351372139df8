"""The compiled EM loop of Algorithm 1: one segment of iterations as a graph.

Each iteration is an E-step (eq. 14-16, `estep.py`), the M-steps of the
batch (eq. 17-18, `mstep.M_STEPS`) and bookkeeping (failure masks, the
log-likelihood history, progress lines). The loop is a `tf.while_loop` in
one `tf.function`, prior calls included; a `LoopSpec` fixes everything that
is static in the graph and is also the key of the cache of compiled loops
(`compiled_loop`). Tensors that change from run to run (`RunInputs`) are
passed, not captured, so one graph serves every run of a spec.
"""

import collections
import dataclasses
import threading
import time
import typing

from absl import logging
import numpy as np
import tensorflow as tf

from mtd_tf.em import estep as estep_lib
from mtd_tf.em import mstep as mstep_lib
from mtd_tf.em import registry
from mtd_tf.em.options import gamma_schedule

__all__ = [
  "LoopSpec",
  "LoopState",
  "RunInputs",
  "build_em_loop",
  "compiled_loop",
  "precomputed_data",
  "Precomputed",
  "HISTORY_FIELDS",
  "log_progress",
  "raise_pending_interrupt",
  "OK",
  "BAD_LOG_LIKELIHOOD",
  "BAD_ESTIMATE",
]

# LoopState.failure codes.
OK, BAD_LOG_LIKELIHOOD, BAD_ESTIMATE = 0, 1, 2
# What the loop records of each iteration tau, per problem: the data
# log-likelihood of F(tau) (eq. 13), ||F(tau+1) - F(tau)|| / ||F(tau)||, the
# sigma and the empty-patch probability of rho (eq. 14) its E-step used.
HISTORY_FIELDS = (
  "log_likelihood",
  "relative_change",
  "sigma",
  "empty_probability",
)
# Floor of ||F(tau)|| in the relative change (an all-zero start).
_TINY = 1e-30
# Compiled loops kept for reuse (each holds its prior and traced graphs).
_LOOP_CACHE_SIZE = 8


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static in a compiled loop; equal specs share one graph.

  Attributes:
    rotations: the `RotationSet`.
    kinds: the names of the M-steps the batch uses (a tuple); the loop's
      `RunInputs.method` indexes into it.
    prior: None or a `priors.Prior` (None when no problem uses one);
      compared by identity.
    gradient_steps: N inner steps of the gradient and preconditioned
      M-steps.
    gamma: the gamma(tau) schedule spec (`options.gamma_schedule`);
      callables compared by identity.
    num_streams: concurrent E-step chunk streams.
    statistics: "local" (the compiled E-step on data = (spectra,
      squared_norms, mask[, groups])), "precomputed" (data are a
      `Precomputed`, the E-step run outside the loop: streaming,
      distributed) or "custom" (a caller's statistics_fn, `build_em_loop`).
    estimate_shift_prior: False, True, "free" or "occupancy": rho(l) by EM
      (local or precomputed E-step).
    estimate_sigma: sigma by EM (local or precomputed E-step).
  """

  rotations: typing.Any
  kinds: typing.Tuple[str, ...]
  prior: typing.Any = None
  gradient_steps: int = 1
  gamma: typing.Any = "constant:1"
  num_streams: int = 1
  statistics: str = "local"
  estimate_shift_prior: typing.Any = False
  estimate_sigma: bool = False

  def __post_init__(self):
    if self.statistics not in ("local", "precomputed", "custom"):
      raise ValueError(f"Unknown statistics {self.statistics!r}.")
    for name in ("estimate_shift_prior", "estimate_sigma"):
      if getattr(self, name) and self.statistics == "custom":
        raise ValueError(
          f"{name} needs the local or a precomputed E-step: use "
          f"EMOptions({name}=False) with a custom E-step."
        )

  def __eq__(self, other):
    if not isinstance(other, LoopSpec):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def _key(self):
    # Identity for the prior and a callable gamma: the cache entry holds
    # both, so their ids are not reused while it lives.
    return (
      self.rotations,
      self.kinds,
      id(self.prior),
      self.gradient_steps,
      id(self.gamma) if callable(self.gamma) else self.gamma,
      self.num_streams,
      self.statistics,
      self.estimate_shift_prior,
      self.estimate_sigma,
    )


class LoopState(typing.NamedTuple):
  """The EM loop's state, carried from one compiled segment to the next.

  Attributes:
    tau: int32 [], iterations run (by the longest-running problem).
    images: float [B, L, L], the estimates of the last finished iteration.
    active: bool [B], problems still iterating.
    iterations: int32 [B], iterations each problem has run.
    failure: int32 [B], `OK`, or why a problem failed (`BAD_*`).
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


class RunInputs(typing.NamedTuple):
  """Tensors fixed for one run: passed, not captured, so one graph serves all."""

  sigma: tf.Tensor  # [B]
  method: tf.Tensor  # int32 [B], indices into LoopSpec.kinds
  prior_weight: tf.Tensor  # [B]
  total: tf.Tensor  # int32 [], T
  tolerance: tf.Tensor  # []
  learning_rate: tf.Tensor  # []
  t_prior: tf.Tensor  # float32 [T] (or [1]): the score's t per iteration
  prior_curvature: tf.Tensor  # [T] (or [1])
  progress_every: tf.Tensor  # int32 []
  started: tf.Tensor  # float64 [], time.time() at the start of the run


def log_progress(done, total, log_likelihood, change, running, batch, started):
  """The progress line (rates and ETA), also called from the compiled loop.

  A Ctrl-C that lands while this runs inside the compiled loop (a
  `tf.numpy_function` the calling thread may execute) would be swallowed by
  TensorFlow; it is kept instead, and `raise_pending_interrupt` raises it
  once the segment has returned.
  """
  try:
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
  except KeyboardInterrupt:
    _PENDING_INTERRUPT.set()
  return np.int32(0)


# A Ctrl-C caught inside the compiled loop (`log_progress`), not yet raised.
_PENDING_INTERRUPT = threading.Event()


def raise_pending_interrupt():
  """Raises the KeyboardInterrupt `log_progress` kept, if any (once)."""
  if _PENDING_INTERRUPT.is_set():
    _PENDING_INTERRUPT.clear()
    raise KeyboardInterrupt


class Precomputed(typing.NamedTuple):
  """The data of a loop whose E-step ran outside it (streaming, distributed).

  Attributes:
    s1, visibility, log_likelihood: the E-step's `estep.Statistics`.
    shift_posterior: float [B, 2L, 2L], `estep.shift_posterior` (the M-step
      of rho when `LoopSpec.estimate_shift_prior`).
    energy: float [B], sum_m ||M_m||^2 (`mstep.noise_mstep`).
    count: float [B], D, the patches summed.
  """

  s1: tf.Tensor
  visibility: tf.Tensor
  log_likelihood: tf.Tensor
  shift_posterior: tf.Tensor
  energy: tf.Tensor
  count: tf.Tensor


def precomputed_data(rotations, parts, sigma, energy, log_rho=None):
  """A `Precomputed` from `estep.PartialSums` summed over all patches.

  Args:
    rotations: the `RotationSet`.
    parts: `estep.PartialSums` over every patch (batch B).
    sigma: float [B], the sigma they were computed with.
    energy: float [B] or [], sum_m ||M_m||^2 over the same patches.
    log_rho: None or the float [B, 2L, 2L] log shift prior the sums were
      computed with (`estep.finish_statistics`).
  """
  stats = estep_lib.finish_statistics(rotations, parts, sigma, log_rho)
  energy = tf.broadcast_to(
    tf.cast(energy, parts.num_patches.dtype), tf.shape(parts.num_patches)
  )  # [B]
  return Precomputed(
    *stats, estep_lib.shift_posterior(parts), energy, parts.num_patches
  )


def _e_step(spec, statistics_fn):
  """The E-step piece: (images, log_rho, sigma, data) -> (stats, log_rho)."""
  if spec.statistics == "precomputed":

    def precomputed_e_step(images, log_rho, sigma, data):
      del images, sigma
      stats = estep_lib.Statistics(*data[:3])
      if not spec.estimate_shift_prior:
        return stats, log_rho
      new_log_rho = mstep_lib.shift_prior_mstep(
        data.shift_posterior, spec.estimate_shift_prior
      )
      return stats, tf.ensure_shape(new_log_rho, log_rho.shape)

    return precomputed_e_step
  if spec.statistics == "local":
    estep = estep_lib.make_estep(spec.rotations, num_streams=spec.num_streams)

    def statistics_fn(images, sigma, spectra, squared_norms, mask, groups=None):
      return estep(images, spectra, squared_norms, mask, sigma, groups)

  elif statistics_fn is None:
    raise ValueError("A custom LoopSpec needs a statistics_fn.")

  if not spec.estimate_shift_prior:

    def e_step(images, log_rho, sigma, data):
      return statistics_fn(images, sigma, *data), log_rho

    return e_step

  def e_step_with_rho(images, log_rho, sigma, data):
    spectra, squared_norms, mask = data[:3]
    groups = data[3] if len(data) > 3 else None
    stats, rho = estep(
      images,
      spectra,
      squared_norms,
      mask,
      sigma,
      groups,
      log_rho,
      with_shift_posterior=True,
    )
    new_log_rho = mstep_lib.shift_prior_mstep(rho, spec.estimate_shift_prior)
    return stats, tf.ensure_shape(new_log_rho, log_rho.shape)  # [B, 2L, 2L]

  return e_step_with_rho


def _m_step(spec):
  """The M-step piece: (tau, images, stats, run, sigma) -> images [B, L, L].

  Every M-step of the batch runs on every problem, and each problem keeps
  its own (`RunInputs.method`); one kind runs alone.
  """
  gamma_fn = gamma_schedule(spec.gamma)
  prior = spec.prior
  prior_mean = prior.gaussian_mean if prior is not None else None
  steps = [registry.M_STEPS[kind].function() for kind in spec.kinds]

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
      rotations=spec.rotations,
      learning_rate=run.learning_rate,
      num_steps=spec.gradient_steps,
      prior=prior,
      prior_weight=weight,
      t_prior=run.t_prior[step],
      prior_curvature=run.prior_curvature[step],
      prior_mean=prior_mean,
    )
    updated = steps[0](images, stats, inputs)
    for index, kind_step in enumerate(steps[1:], start=1):
      updated = tf.where(
        tf.equal(run.method, index)[:, None, None],
        kind_step(images, stats, inputs),
        updated,
      )
    return updated

  if prior is None:
    # Without a network call the M-step compiles too: one XLA launch
    # instead of dozens of small ops.
    return tf.function(m_step, jit_compile=True)
  return m_step


def _report(run, tau, log_likelihood, change, active):
  """The progress piece: a line every progress_every iterations and at the end."""
  report = (run.progress_every > 0) & (
    tf.equal((tau + 1) % tf.maximum(run.progress_every, 1), 0)
    | tf.equal(tau + 1, run.total)
    | ~tf.reduce_any(active)
  )
  tf.cond(
    report,
    lambda: tf.numpy_function(
      log_progress,
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


def _advance(state, updated, new_log_rho, new_sigma, log_likelihood, run):
  """The bookkeeping piece: failure masks, frozen problems, stopping.

  Returns:
    (the next `LoopState`, change [B]).
  """
  tau, images, active, iterations, failure, log_rho, sigma = state
  change = tf.ensure_shape(
    tf.sqrt(tf.reduce_sum((updated - images) ** 2, axis=[1, 2])),
    active.shape,
  )  # [B]
  # Non-finite values in the dtype we compute in end the run.
  finite_ll = tf.math.is_finite(log_likelihood)  # [B]
  finite_estimate = tf.reduce_all(
    tf.math.is_finite(updated), axis=[1, 2]
  ) & tf.math.is_finite(new_sigma)
  failure = tf.where(
    active & ~finite_ll,
    BAD_LOG_LIKELIHOOD,
    tf.where(active & ~finite_estimate, BAD_ESTIMATE, failure),
  )
  good = active & finite_ll & finite_estimate
  images = tf.where(good[:, None, None], updated, images)
  log_rho = tf.where(good[:, None, None], new_log_rho, log_rho)
  sigma = tf.where(good, new_sigma, sigma)
  iterations += tf.cast(good, tf.int32)
  active = good & (change >= run.tolerance)
  state = LoopState(
    tau + 1, images, active, iterations, failure, log_rho, sigma
  )
  return state, change


def build_em_loop(spec, statistics_fn=None):
  """Builds one compiled segment of the EM loop for a `LoopSpec`.

  Args:
    spec: the `LoopSpec`.
    statistics_fn: with spec.statistics == "custom",
      `statistics_fn(images, sigma, *data) -> estep.Statistics` (for example
      `distributed.py`'s, under a `tf.distribute.Strategy`, with data = ()).

  Returns:
    A `tf.function` ``segment(state, data, run, end) -> (state, history)``
    that runs iterations from ``state.tau`` until ``end``, convergence of
    every problem or a failure; history is float64 [iterations run, B, F],
    the `HISTORY_FIELDS` of each iteration (NaN for stopped problems).
  """
  e_step = _e_step(spec, statistics_fn)
  m_step = _m_step(spec)

  @tf.function
  def segment(state, data, run, end):
    start = state.tau
    if spec.estimate_sigma:
      # sum_m ||M_m||^2 and D do not change across iterations.
      if spec.statistics == "precomputed":
        energy, count = data.energy, data.count  # [B], [B]
      else:
        energy, count = mstep_lib.patch_energy(*data[1:])  # [B], [B]

    def body(state, history):
      stats, new_log_rho = e_step(
        state.images, state.log_rho, state.sigma, data
      )
      updated = m_step(state.tau, state.images, stats, run, state.sigma)
      # The compiled E-step is traced with a relaxed batch size: restore the
      # static shapes the loop variables entered with.
      updated = tf.ensure_shape(updated, state.images.shape)  # [B, L, L]
      new_sigma = state.sigma
      if spec.estimate_sigma:
        new_sigma = tf.ensure_shape(
          mstep_lib.noise_mstep(updated, stats, spec.rotations, energy, count),
          state.sigma.shape,
        )  # [B]
      log_likelihood = tf.ensure_shape(stats.log_likelihood, state.active.shape)
      new_state, change = _advance(
        state, updated, new_log_rho, new_sigma, log_likelihood, run
      )
      # The `HISTORY_FIELDS` of iteration tau, for the problems it ran.
      norm = tf.sqrt(tf.reduce_sum(state.images**2, axis=[1, 2]))  # [B]
      row = tf.stack(
        [
          tf.cast(log_likelihood, tf.float64),
          tf.cast(change / tf.maximum(norm, _TINY), tf.float64),
          tf.cast(state.sigma, tf.float64),
          tf.cast(mstep_lib.empty_patch_probability(state.log_rho), tf.float64),
        ],
        axis=-1,
      )  # [B, F]
      history = history.write(
        state.tau - start,
        tf.where(state.active[:, None], row, tf.constant(np.nan, tf.float64)),
      )
      _report(run, state.tau, log_likelihood, change, new_state.active)
      return new_state, history

    def running(state, history):
      del history
      return (
        (state.tau < end)
        & tf.reduce_any(state.active)
        & tf.reduce_all(tf.equal(state.failure, OK))
      )

    history = tf.TensorArray(
      tf.float64,
      size=0,
      dynamic_size=True,
      element_shape=state.active.shape.concatenate([len(HISTORY_FIELDS)]),
    )
    state, history = tf.while_loop(running, body, (state, history))
    return state, history.stack()  # [iterations run, B, F]

  return segment


_LOOPS = collections.OrderedDict()


def compiled_loop(spec):
  """`build_em_loop(spec)`, reused across runs (LRU of `_LOOP_CACHE_SIZE`).

  The entry holds the spec, hence its prior and gamma, so their ids in the
  key are not reused by other objects while it lives.
  """
  entry = _LOOPS.get(spec)
  if entry is not None:
    _LOOPS.move_to_end(spec)
    return entry[1]
  loop = build_em_loop(spec)
  _LOOPS[spec] = (spec, loop)
  while len(_LOOPS) > _LOOP_CACHE_SIZE:
    _LOOPS.popitem(last=False)
  return loop
