"""Approximate EM for MTD, with or without a score prior: Algorithm 1.

Each iteration runs the XLA-compiled E-step (`estep.py`, eq. 14-16) and an
M-step (`mstep.py`): the exact maximiser of Q, or the paper's gradient
ascent F <- F + mu (grad Q + gamma(tau) s(F, t_prior)) of eq. (18). The whole
loop is one `tf.while_loop` in one `tf.function`, prior calls included, and
runs a batch of B independent problems at once, each with its own sigma,
M-step, prior weight and stopping point: it stops when
||F(tau+1) - F(tau)||_F < tolerance, after which its estimate is frozen.
"""

import dataclasses
import math
import os
import sys
import time
import typing

import numpy as np
import tensorflow as tf

from mtd_tf import estep as estep_lib
from mtd_tf import mstep as mstep_lib
from mtd_tf import patches as patches_lib
from mtd_tf import rotations as rotations_lib
from mtd_tf import validation

__all__ = ["EMOptions", "EMResult", "gamma_schedule", "approximate_em",
           "batched_em", "run_prepared", "run_loop", "collect_patches",
           "M_STEPS"]

M_STEPS = ("closed_form", "gradient", "preconditioned")


@dataclasses.dataclass(frozen=True)
class EMOptions:
  """Options of Algorithm 1 (defaults: Table I where it applies).

  Attributes:
    num_rotations: K, rotations in Phi (eq. 11).
    max_iterations: T, EM iterations at most.
    tolerance: stop when ||F(tau+1) - F(tau)||_F falls below it.
    learning_rate: mu of eq. (18), gradient M-step only.
    gradient_steps: N gradient steps per M-step.
    t_prior: diffusion time at which the prior's score is evaluated.
    gamma: prior weight schedule: "linear" (tau / T), "constant:V", or a
      callable (tau, T) -> scalar tensor, both float tensors.
    chunk_size: patches per E-step chunk (bounds memory).
    dtype: "float32" or "float64".
    progress_every: print a progress line (log-likelihood, change, seconds
      per iteration, ETA) every this many iterations; 0 prints nothing.
    prior_curvature: c, the curvature of -log p used by the preconditioned
      M-step; None: 1 for Gaussian priors N(mu, I), exact or learned, and
      1 / sigma_t^2 at t_prior for a learned diffusion score (the largest
      curvature a diffused density has).
  """
  num_rotations: int = 4
  max_iterations: int = 100
  tolerance: float = 1e-5
  learning_rate: float = 1e-3
  gradient_steps: int = 1
  t_prior: float = 0.01
  gamma: typing.Any = "constant:1"
  chunk_size: int = 64
  dtype: str = "float32"
  progress_every: int = 0
  prior_curvature: typing.Optional[float] = None
  num_streams: typing.Optional[int] = None

  def validate(self):
    if int(self.num_rotations) < 1:
      raise ValueError(
          f"num_rotations (K) must be >= 1, got {self.num_rotations}.")
    if int(self.max_iterations) < 0:
      raise ValueError(
          f"max_iterations must be >= 0, got {self.max_iterations}.")
    if int(self.gradient_steps) < 1:
      raise ValueError(
          f"gradient_steps must be >= 1, got {self.gradient_steps}.")
    if not self.tolerance >= 0:
      raise ValueError(f"tolerance must be >= 0, got {self.tolerance}.")
    validation.positive_finite(self.learning_rate, "learning_rate")
    validation.positive_finite(self.t_prior, "t_prior")
    if self.num_streams is not None and int(self.num_streams) < 1:
      raise ValueError(f"num_streams must be >= 1, got {self.num_streams}.")
    if self.prior_curvature is not None:
      validation.positive_finite(self.prior_curvature, "prior_curvature")
    if self.dtype not in ("float32", "float64"):
      raise ValueError(f"dtype must be float32 or float64, got {self.dtype}.")
    gamma_schedule(self.gamma)
    return self


class EMResult(typing.NamedTuple):
  """What EM returns.

  Attributes:
    estimate: float numpy [L, L] (or [B, L, L] from `batched_em`).
    iterations: EM iterations run (int, or int [B]).
    log_likelihood: float64 numpy [iterations] (or [T, B], NaN after a
      problem stopped): the data log-likelihood of F(tau), tau = 0, 1, ...
    seconds: wall time of the compiled loop (tracing included on first use).
  """
  estimate: np.ndarray
  iterations: typing.Any
  log_likelihood: np.ndarray
  seconds: float


def gamma_schedule(spec):
  """Parses a prior-weight schedule gamma(tau).

  Args:
    spec: "linear" (tau / T, Table I for MNIST), "linear:V" (V tau / T),
      "constant:V" (V; Table I for Gaussian is constant:1), a number, or a
      callable (tau, T) -> scalar tensor.

  Returns:
    A callable (tau, T) -> scalar, on float tensors.

  Raises:
    ValueError: on an unknown spec.
  """
  if callable(spec):
    return spec
  if isinstance(spec, (int, float)):
    value = float(spec)
    return lambda tau, total: tf.cast(value, tau.dtype)
  text = str(spec).strip().lower()
  kind, _, arg = text.partition(":")
  try:
    scale = float(arg) if arg else 1.0
  except ValueError:
    raise ValueError(
        f"Malformed gamma schedule {spec!r}: use 'linear', 'linear:V' or "
        "'constant:V' with V a number.") from None
  if not math.isfinite(scale) or scale < 0:
    raise ValueError(f"gamma scale must be finite and >= 0, got {scale}.")
  if kind == "linear":
    return lambda tau, total: scale * tau / tf.maximum(total, 1.0)
  if kind == "constant":
    return lambda tau, total: tf.cast(scale, tau.dtype)
  raise ValueError(
      f"Unknown gamma schedule {spec!r}: use 'linear', 'linear:V' or "
      "'constant:V'.")


_LOOPS = {}


def _make_em_loop(rotations, kinds, prior, gradient_steps, gamma,
                  progress_every=0, num_streams=1):
  """The compiled EM loop for one static configuration (cached)."""
  key = (rotations, kinds, id(prior), gradient_steps,
         gamma if not callable(gamma) else id(gamma), progress_every,
         num_streams)
  cached = _LOOPS.get(key)
  if cached is not None and cached[0] is prior:
    return cached[1]
  loop = _build_em_loop(rotations, kinds, prior, gradient_steps, gamma,
                        progress_every, num_streams)
  _LOOPS[key] = (prior, loop)
  return loop


def resolved_streams(options):
  """The number of E-step streams: options.num_streams, or one per core."""
  if options.num_streams is not None:
    return int(options.num_streams)
  return max(1, min(os.cpu_count() or 1, 8))


def prior_curvature(prior, options):
  """c of the preconditioned M-step (see `EMOptions.prior_curvature`)."""
  if options.prior_curvature is not None:
    return float(options.prior_curvature)
  if prior is None or getattr(prior, "metadata", {}).get("kind") == "gaussian":
    return 1.0  # N(mu, I), exact or learned, diffused or not: curvature 1.
  sde = getattr(prior, "sde", None)
  if sde is None:
    from mtd_tf import sde as sde_lib  # pylint: disable=g-import-not-at-top
    sde = sde_lib.VPSDE()
  return float(1.0 / sde.variance(tf.constant(options.t_prior, tf.float64)))


def exact_gaussian_mean(prior):
  """mu when `prior` is the exact N(mu, I) prior (closed-form MAP M-step)."""
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  if isinstance(prior, priors.GaussianPrior) and not prior.diffused:
    return prior.mu
  return None


def _build_em_loop(rotations, kinds, prior, gradient_steps, gamma,
                   progress_every, num_streams, statistics_fn=None):
  """Builds the compiled EM loop for one static configuration.

  `statistics_fn(images, sigma, *data) -> estep.Statistics` computes the
  E-step; by default the local compiled E-step on data = (spectra,
  squared_norms, mask). `distributed.py` passes one that runs under a
  `tf.distribute.Strategy`.
  """
  if statistics_fn is None:
    estep = estep_lib.make_estep(rotations, num_streams=num_streams)

    def statistics_fn(images, sigma, spectra, squared_norms, mask):
      return estep(images, spectra, squared_norms, mask, sigma)

  gamma_fn = gamma_schedule(gamma)
  prior_mean = exact_gaussian_mean(prior)

  @tf.function
  def loop(init, data, sigma, method, prior_weight, max_iterations,
           tolerance, learning_rate, t_prior, prior_curvature):
    dtype = init.dtype
    batch = tf.shape(init)[0]
    total = tf.cast(max_iterations, dtype)
    started = tf.timestamp()

    def report(tau, loglik, change, active):
      done = tf.cast(tau + 1, tf.float64)
      per_iteration = (tf.timestamp() - started) / done
      tf.print("EM iteration", tau + 1, "/", max_iterations,
               "| log-likelihood", loglik[0], "| change", tf.reduce_max(change),
               "| running", tf.reduce_sum(tf.cast(active, tf.int32)), "/",
               batch, "|", per_iteration, "s/it | ETA",
               per_iteration * (tf.cast(max_iterations, tf.float64) - done),
               "s", output_stream=sys.stderr)
      return tf.constant(0)

    def prior_term(tau):
      if prior is None:
        return None
      gamma = gamma_fn(tf.cast(tau, dtype), total)
      weight = tf.cast(gamma, dtype) * prior_weight  # [B]
      # Evaluate the network only for the problems that use the prior.
      users = tf.where(weight > 0)  # [P, 1]

      def weighted_score(images):
        def network():
          chosen = tf.cast(tf.gather_nd(images, users), tf.float32)  # [P, L, L]
          times = tf.fill(tf.shape(chosen)[:1], tf.cast(t_prior, tf.float32))
          score = tf.cast(prior(chosen, times), dtype)  # [P, L, L]
          return tf.scatter_nd(users, score, tf.shape(
              images, out_type=tf.int64))  # [B, L, L]
        # gamma(0) = 0 under the linear schedule: no network call at all.
        score = tf.cond(tf.size(users) > 0, network,
                        lambda: tf.zeros_like(images))
        return weight[:, None, None] * score
      return weighted_score

    def m_step(tau, images, stats, sigma, method, prior_weight,
               learning_rate, prior_curvature):
      candidates = {}
      if "gradient" in kinds:
        candidates["gradient"] = mstep_lib.gradient_mstep(
            images, stats, sigma, rotations, learning_rate=learning_rate,
            num_steps=gradient_steps, prior_score=prior_term(tau))
      if "preconditioned" in kinds:
        curvature = None
        if prior is not None:
          curvature = tf.cast(gamma_fn(tf.cast(tau, dtype), total),
                              dtype) * prior_weight * prior_curvature
        candidates["preconditioned"] = mstep_lib.preconditioned_mstep(
            images, stats, sigma, rotations, num_steps=gradient_steps,
            prior_score=prior_term(tau), prior_curvature=curvature)
      if "closed_form" in kinds:
        if prior_mean is not None:
          weight = tf.cast(gamma_fn(tf.cast(tau, dtype), total),
                           dtype) * prior_weight  # [B]
          candidates["closed_form"] = mstep_lib.closed_form_mstep(
              images, stats, rotations, sigma, prior_mean, weight)
        else:
          candidates["closed_form"] = mstep_lib.closed_form_mstep(
              images, stats, rotations)
      updated = candidates[kinds[0]]
      for kind in kinds[1:]:
        updated = tf.where(
            tf.equal(method, M_STEPS.index(kind))[:, None, None],
            candidates[kind], updated)
      return updated

    if prior is None:
      # Without a network call the M-step compiles too: one XLA launch
      # instead of dozens of small ops.
      m_step = tf.function(m_step, jit_compile=True)

    def body(tau, images, active, iterations, history):
      stats = statistics_fn(images, sigma, *data)
      updated = m_step(tau, images, stats, sigma, method, prior_weight,
                       learning_rate, prior_curvature)
      change = tf.sqrt(tf.reduce_sum((updated - images)**2, axis=[1, 2]))  # [B]
      history = history.write(tau, tf.ensure_shape(tf.where(
          active, tf.cast(stats.log_likelihood, tf.float64),
          tf.constant(np.nan, tf.float64)), active.shape))
      # The compiled E-step is traced with a relaxed batch size: restore the
      # static shapes the loop variables entered with.
      updated = tf.ensure_shape(updated, images.shape)
      change = tf.ensure_shape(change, active.shape)
      images = tf.where(active[:, None, None], updated, images)
      iterations += tf.cast(active, tf.int32)
      active = tf.logical_and(active, change >= tolerance)
      if progress_every:
        tf.cond(tf.logical_or(tf.equal((tau + 1) % progress_every, 0),
                              tf.logical_not(tf.reduce_any(active))),
                lambda: report(tau, stats.log_likelihood, change, active),
                lambda: tf.constant(0))
      return tau + 1, images, active, iterations, history

    history = tf.TensorArray(tf.float64, size=max_iterations,
                             element_shape=tf.TensorShape([None]))
    _, images, _, iterations, history = tf.while_loop(
        lambda tau, images, active, *_: tf.logical_and(
            tau < max_iterations, tf.reduce_any(active)),
        body,
        (tf.constant(0), init, tf.ones_like(sigma, tf.bool),
         tf.zeros_like(sigma, tf.int32), history))
    return images, iterations, history.stack()

  return loop


def collect_patches(measurements, image_size, crop):
  """Patches of one measurement or of several sharing one image."""
  if isinstance(measurements, (list, tuple)):
    if not measurements:
      raise ValueError("Got an empty list of measurements.")
    return np.concatenate([patches_lib.extract_patches(m, image_size, crop)
                           for m in measurements])
  return patches_lib.extract_patches(measurements, image_size, crop)


def batched_em(measurements, image_size, sigmas, *, inits, m_steps,
               prior=None, prior_weights=None, options=EMOptions(),
               crop=False):
  """Runs B independent EM problems as one compiled graph execution.

  Args:
    measurements: list of B items, each an array [H, W] or a list of such
      arrays (micrographs sharing one image).
    image_size: L.
    sigmas: B noise standard deviations.
    inits: array [B, L, L], the initial estimates F(0).
    m_steps: B strings from `M_STEPS`.
    prior: None or a callable score(x [B, L, L] float32, t [B] float32) ->
      [B, L, L] (a loaded SavedModel prior, the exact Gaussian prior...).
    prior_weights: B non-negative factors on gamma(tau) (0 = no prior for
      that problem); default 1 where a prior is given.
    options: `EMOptions`.
    crop: crop measurement sides to multiples of L.

  Returns:
    `EMResult` with estimate [B, L, L], iterations [B], log_likelihood
    [T', B] (T' the iterations of the longest run).

  Raises:
    ValueError: on bad measurements, sigmas, inits, m_steps or options.
  """
  options.validate()
  size = int(image_size)
  batch = len(measurements)
  if batch == 0:
    raise ValueError("batched_em needs at least one measurement.")
  patch_sets = [collect_patches(m, size, crop) for m in measurements]
  sigmas = [validation.positive_finite(s, "sigma") for s in np.ravel(sigmas)]
  if len(sigmas) != batch:
    raise ValueError(f"Got {len(sigmas)} sigmas for {batch} measurements.")
  inits = np.asarray(inits, np.float64)
  if inits.shape != (batch, size, size):
    raise ValueError(
        f"inits must have shape {(batch, size, size)}, got {inits.shape}.")
  if not np.all(np.isfinite(inits)):
    raise ValueError("inits contain NaN or Inf values.")
  m_steps = list(m_steps)
  if len(m_steps) != batch or any(m not in M_STEPS for m in m_steps):
    raise ValueError(f"m_steps must be {batch} values from {M_STEPS}, got "
                     f"{m_steps}.")
  if prior_weights is None:
    prior_weights = [1.0 if prior is not None else 0.0] * batch
  prior_weights = np.asarray(prior_weights, np.float64)
  if prior_weights.shape != (batch,) or not np.all(prior_weights >= 0):
    raise ValueError("prior_weights must be B non-negative numbers.")
  if prior is not None:
    prior_size = getattr(prior, "image_size", None)
    if prior_size is not None:
      validation.check_image_size(size, prior_size)
  else:
    prior_weights = np.zeros(batch)
  if (prior is not None and exact_gaussian_mean(prior) is None
      and any(m == "closed_form" and w > 0
              for m, w in zip(m_steps, prior_weights))):
    raise ValueError(
        "A learned score prior has no closed-form M-step: use "
        "m_step='gradient' (only the exact Gaussian prior has one).")

  dtype = tf.float32 if options.dtype == "float32" else tf.float64
  # A chunk holds about chunk_size patches in all: the batch shares it.
  chunk = patches_lib.balanced_chunk_size(
      max(len(p) for p in patch_sets),
      max(1, -(-int(options.chunk_size) // batch)), resolved_streams(options))
  data = patches_lib.patch_spectra(patch_sets, chunk, dtype)
  return run_prepared(data, sigmas, inits, m_steps, prior, prior_weights,
                      options)


def run_prepared(data, sigmas, inits, m_steps, prior, prior_weights, options,
                 max_iterations=None):
  """Runs the compiled EM loop on precomputed patch spectra.

  `batched_em` validates its input, computes the spectra once and calls
  this; benchmarks call it repeatedly on the same `patches.PatchSpectra`.

  Args:
    data: `patches.PatchSpectra` of B problems.
    sigmas: B noise levels.
    inits: [B, L, L].
    m_steps: B names from `M_STEPS`.
    prior: None or a prior callable.
    prior_weights: B weights (0: no prior).
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.

  Returns:
    `EMResult`.
  """
  rotations = rotations_lib.rotation_set(data.image_size,
                                         options.num_rotations)
  kinds = tuple(k for k in M_STEPS if k in m_steps)
  loop = _make_em_loop(
      rotations, kinds,
      prior if np.asarray(prior_weights).any() else None,
      int(options.gradient_steps), options.gamma,
      int(options.progress_every), resolved_streams(options))
  return run_loop(loop, (data.spectra, data.squared_norms, data.mask), sigmas,
                  inits, m_steps, prior, prior_weights, options,
                  data.squared_norms.dtype, max_iterations)


def run_loop(loop, data, sigmas, inits, m_steps, prior, prior_weights,
             options, dtype, max_iterations=None):
  """Calls a compiled EM loop and converts its results to numpy."""
  batch = len(sigmas)
  method = np.array([M_STEPS.index(m) for m in m_steps], np.int32)
  total = int(options.max_iterations if max_iterations is None
              else max_iterations)
  start = time.perf_counter()
  images, iterations, history = loop(
      tf.constant(np.asarray(inits), dtype), data,
      tf.constant(np.asarray(sigmas), dtype), tf.constant(method),
      tf.constant(np.asarray(prior_weights, np.float64), dtype),
      tf.constant(total), tf.constant(options.tolerance, dtype),
      tf.constant(options.learning_rate, dtype),
      tf.constant(options.t_prior, tf.float32),
      tf.constant(prior_curvature(prior, options), dtype))
  images = images.numpy()
  seconds = time.perf_counter() - start
  iterations = iterations.numpy()
  history = history.numpy()[:int(iterations.max()) if batch else 0]
  return EMResult(images, iterations, history, seconds)


def approximate_em(measurement, image_size, sigma, *, init,
                   num_rotations=4, max_iterations=100, tolerance=1e-5,
                   m_step="closed_form", learning_rate=1e-3,
                   gradient_steps=1, prior=None, gamma="constant:1",
                   t_prior=0.01, chunk_size=64, dtype="float32", crop=False,
                   progress_every=0, prior_curvature=None, num_streams=None):
  """Approximate EM for one image (Algorithm 1; no prior by default).

  Args:
    measurement: array [H, W] (sides multiples of L), or a list of such
      micrographs that share one image and one sigma.
    image_size: L.
    sigma: noise standard deviation.
    init: array [L, L], F(0).
    num_rotations: K.
    max_iterations: T.
    tolerance: stop when ||F(tau+1) - F(tau)||_F < tolerance.
    m_step: "closed_form" (exact maximiser of Q), "gradient" (eq. 18, the
      paper's fixed step mu) or "preconditioned" (steps scaled by the exact
      curvature of Q and the prior's; see `mstep.preconditioned_mstep`).
    learning_rate: mu (gradient M-step).
    gradient_steps: N (gradient M-step).
    prior: None or a prior callable score(x, t); with m_step="closed_form"
      only the exact `priors.GaussianPrior` (the M-step is then the exact
      MAP of the quadratic Q + gamma log N(F; mu, I)).
    gamma: prior weight schedule, see `gamma_schedule`.
    t_prior: diffusion time of the prior's score.
    chunk_size: patches per E-step chunk.
    dtype: "float32" or "float64".
    crop: crop sides to multiples of L instead of raising.
    progress_every: print a progress line every this many iterations.
    prior_curvature: c of the preconditioned M-step (None: automatic).
    num_streams: concurrent E-step chunk streams (None: one per core).

  Returns:
    `EMResult` with estimate [L, L], iterations (int) and log_likelihood
    [iterations].

  Raises:
    ValueError: on bad input, with a message that says what to change.
  """
  if m_step not in M_STEPS:
    raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}.")
  init = validation.image_array(init, "init")
  if init.shape[0] != int(image_size):
    raise ValueError(f"init must be {image_size} x {image_size}, got "
                     f"{init.shape}.")
  options = EMOptions(
      num_rotations=num_rotations, max_iterations=max_iterations,
      tolerance=tolerance, learning_rate=learning_rate,
      gradient_steps=gradient_steps, t_prior=t_prior, gamma=gamma,
      chunk_size=chunk_size, dtype=dtype, progress_every=progress_every,
      prior_curvature=prior_curvature, num_streams=num_streams)
  result = batched_em([measurement], image_size, [sigma], inits=init[None],
                      m_steps=[m_step], prior=prior, options=options,
                      crop=crop)
  return EMResult(result.estimate[0], int(result.iterations[0]),
                  result.log_likelihood[:, 0], result.seconds)
