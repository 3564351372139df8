"""Runs a compiled EM loop (`loop.py`) in segments, with numpy results.

The compiled loop runs in segments of about `_SEGMENT_SECONDS` each, its
state carried from one call to the next, so that Ctrl-C and SIGTERM are
noticed within seconds: the `KeyboardInterrupt` then carries the last
finished iteration as ``err.partial_result``. A non-finite log-likelihood
or estimate ends the run with `EMDivergedError`, whose message names the
likely cause. The prior's diffusion time and curvature per iteration (eq.
18 with an annealed t) are resolved here, once per run.
"""

import math
import time

import numpy as np
import tensorflow as tf

from mtd_tf.em import callbacks as callbacks_lib
from mtd_tf.em import loop as loop_lib
from mtd_tf.em import registry
from mtd_tf.em.options import gamma_schedule
from mtd_tf.em.options import resolve_t_prior
from mtd_tf.em.options import t_values
from mtd_tf.em.problem import EMDivergedError
from mtd_tf.em.problem import EMResult
from mtd_tf.em.problem import too_large

__all__ = ["run_loop", "prior_schedule"]

# One compiled call runs about this many seconds once the time per iteration
# is known (Ctrl-C waits for no more), and at most _SEGMENT_ITERATIONS
# iterations; each call costs about 2 ms, so fast iterations share one.
# Segments grow at most tenfold from one call to the next, starting at one
# iteration (whose call also traces). Multi-worker runs use fixed segments
# of _FIXED_SEGMENT iterations.
_SEGMENT_SECONDS = 1.0
_SEGMENT_ITERATIONS = 1000
_FIXED_SEGMENT = 10


def prior_schedule(prior, options, total):
  """The prior's diffusion time and curvature at each iteration.

  Args:
    prior: None or a `priors.Prior`.
    options: `EMOptions` (t_prior, t_schedule, prior_curvature).
    total: T, iterations of the run.

  Returns:
    (t_prior: the final time, times: list of T (or 1) floats, curvatures:
    list of as many floats; 1.0 without a prior).
  """
  t_prior = resolve_t_prior(options.t_prior, prior)

  def curvature(t):
    if options.prior_curvature is not None:
      return options.prior_curvature
    return prior.curvature(t) if prior is not None else 1.0

  times = [t_prior]
  if options.t_schedule is not None:
    times = list(t_values(options.t_schedule, t_prior, total))
  return t_prior, times, [curvature(t) for t in times]


def _result(state, rows, seconds):
  """The `EMResult` of a loop state and the history rows of its segments."""
  iterations = state.iterations.numpy()
  history = (
    np.concatenate(rows)[..., 0]  # the log-likelihood field
    if rows
    else np.zeros((0, len(iterations)))
  )  # [T, B]
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
  what = (
    "log-likelihood"
    if failure[b] == loop_lib.BAD_LOG_LIKELIHOOD
    else "estimate"
  )
  where = f" in problem {b}" if batch.size > 1 else ""
  last = state.images.numpy()[b]
  # Numbers past the dtype's range overflow whatever sigma is: name them
  # rather than a sigma too small.
  large = too_large(options.dtype, sigma=sigma, image=last)
  small_sigma = large or (
    f"sigma={sigma:.3g} is too small for {options.dtype}: "
    + (
      "use dtype='float64' or a larger sigma."
      if options.dtype == "float32"
      else "use a larger sigma (or rescale the data)."
    )
  )
  prior_fails = False
  if prior is not None and batch.prior_weights[b] > 0:
    score = prior(
      tf.constant(last[None], tf.float32), tf.constant([t_prior], tf.float32)
    )
    prior_fails = not np.all(np.isfinite(score.numpy()))
  step_size = registry.M_STEPS[batch.m_steps[b]].step_size
  if failure[b] == loop_lib.BAD_LOG_LIKELIHOOD and done == 0:
    cause = "already at the initial estimate: " + small_sigma
  elif prior_fails:
    cause = (
      "the prior returned NaN or Inf scores at the last finite "
      "estimate: check the prior (priors.probe) or run without it."
    )
  elif step_size is not None:
    steady = [n for n, s in registry.M_STEPS.items() if s.maximises_q]
    cause = (
      f"the {batch.m_steps[b]} step diverged (largest |F| "
      f"{np.max(np.abs(last)):.3g} before it): use a smaller "
      f"{step_size} than {getattr(options, step_size):.3g}, or "
      f"m_step={steady[-1]!r}."
    )
  else:
    cause = small_sigma
  return EMDivergedError(
    f"EM diverged: the {what}{where} became NaN or Inf at iteration "
    f"{done + 1}; {cause}"
  )


def _run_inputs(batch, kinds, prior, options, total, dtype):
  """The `RunInputs` of a run, and the prior's final t (for diagnoses)."""
  t_prior, times, curvatures = prior_schedule(prior, options, total)
  run = loop_lib.RunInputs(
    sigma=tf.constant(batch.sigmas, dtype),
    method=tf.constant([kinds.index(m) for m in batch.m_steps], tf.int32),
    prior_weight=tf.constant(batch.prior_weights, dtype),
    total=tf.constant(total, tf.int32),
    tolerance=tf.constant(options.tolerance, dtype),
    learning_rate=tf.constant(options.learning_rate, dtype),
    t_prior=tf.constant(times, tf.float32),
    prior_curvature=tf.constant(curvatures, dtype),
    progress_every=tf.constant(int(options.progress_every), tf.int32),
    started=tf.constant(time.time(), tf.float64),
  )
  return run, t_prior


def _initial_state(batch, start_iteration, dtype):
  size = batch.size
  return loop_lib.LoopState(
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
  kinds=None,
):
  """Runs a compiled EM loop (`loop.build_em_loop`) in segments.

  Args:
    loop: the compiled segment.
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
    data_fn: None, or a callable `LoopState` -> the loop's data for one
      iteration from that state (a loop built with precomputed statistics,
      `loop.Precomputed`: the E-step streamed outside the compiled loop,
      from the state's images, log rho and sigma); segments are then one
      iteration each and `data` is not used.
    kinds: the loop's `LoopSpec.kinds` (default: the batch's M-steps in
      registry order, as `loop_for` builds them).

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
  if kinds is None:
    kinds = batch_kinds(batch)
  run, t_prior = _run_inputs(batch, kinds, prior, options, total, dtype)
  watched, outcome = _begin(batch, prior, options, run, start_iteration, total)
  if isinstance(outcome, EMResult):
    return outcome  # a run that had finished before (a resumed program)
  state = _initial_state(batch, start_iteration, dtype)
  # One binding, so an interrupt never sees a state without its history.
  finished = (state, [])
  earlier = 0.0  # seconds of a resumed run before this process
  if outcome is not None:
    finished = (_state_of(outcome.state, dtype), list(outcome.rows))
    earlier = float(outcome.seconds)
  length = 1 if adaptive or data_fn is not None else _FIXED_SEGMENT
  start = time.perf_counter() - earlier
  try:
    while True:
      state, rows = finished
      tau = int(state.tau)
      if tau >= total or not bool(tf.reduce_any(state.active)):
        break
      begun = time.perf_counter()
      if data_fn is not None:
        data = data_fn(state)
      new_state, history = loop(
        state, data, run, tf.constant(min(tau + length, total), tf.int32)
      )
      finished = (new_state, rows + [history.numpy()])
      loop_lib.raise_pending_interrupt()  # a Ctrl-C during the segment
      if bool(tf.reduce_any(new_state.failure != loop_lib.OK)):
        raise _diverged(new_state, batch, prior, t_prior, options)
      if watched is not None:
        callbacks_lib.segment_end(
          watched, new_state, finished[1], time.perf_counter() - start
        )
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
  if watched is not None:
    callbacks_lib.end(watched, result)
  return result


def _begin(batch, prior, options, run, start_iteration, total):
  """`callbacks.begin` of a run, with its prior's t and weight per iteration."""
  if not callbacks_lib.current():
    return None, None
  t_prior = weight = None
  if prior is not None:
    t_prior = np.resize(run.t_prior.numpy().astype(np.float64), total)  # [T]
    gamma = gamma_schedule(options.gamma)
    weight = np.array(
      [
        float(
          gamma(
            tf.constant(float(tau), tf.float64),
            tf.constant(float(total), tf.float64),
          )
        )
        for tau in range(total)
      ]
    )[:, None] * np.asarray(batch.prior_weights, np.float64)  # [T, B]
  return callbacks_lib.begin(batch, start_iteration, total, t_prior, weight)


def _state_of(arrays, dtype):
  """A `loop.LoopState` of tensors from a saved one of numpy arrays."""
  state = loop_lib.LoopState(*arrays)
  return loop_lib.LoopState(
    tau=tf.constant(int(state.tau), tf.int32),
    images=tf.constant(state.images, dtype),
    active=tf.constant(state.active, tf.bool),
    iterations=tf.constant(state.iterations, tf.int32),
    failure=tf.constant(state.failure, tf.int32),
    log_rho=tf.constant(state.log_rho, dtype),
    sigma=tf.constant(state.sigma, dtype),
  )


def batch_kinds(batch):
  """The M-steps a batch uses, in registry order: a `LoopSpec.kinds`."""
  return tuple(k for k in registry.M_STEPS if k in batch.m_steps)
