"""The variance-preserving SDE of score priors, eq. (5)-(8) of the paper.

Zabatani, Kreymer and Bendory, "Score-based diffusion priors for multi-target
detection", section II, with the conventions of ``CONVENTIONS.md``:

* eq. (6), the forward SDE  dx = -beta(t)/2 x dt + sqrt(beta(t)) dw,  with
  the linear schedule beta(t) = beta_min + (beta_max - beta_min) t on [0, 1]
  (beta_min = 0.1, beta_max = 20).
* B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2.
* eq. (8), the perturbation kernel p(x_t | x_0) = N(alpha(t) x_0, sigma_t^2 I)
  with alpha(t) = exp(-B(t)/2) and sigma_t^2 = 1 - exp(-B(t))
  (`VPSDE.marginal`, a `tfd.Independent(tfd.Normal)`).
* eq. (7), denoising score matching with lambda(t) = sigma_t^2 and
  t ~ U[eps, 1] (`denoising_score_matching_loss`).
* eq. (5), implicit score matching (Hyvarinen) with the exact trace of the
  Jacobian (`implicit_score_matching_loss`).
* The probability-flow ODE of Song et al. (2021),
  dx/dt = -beta(t)/2 (x + s(x, t)), integrated from t = 1 down to t = eps with
  `tfp.math.ode.DormandPrince` (`probability_flow_sample`). TFP solvers only
  integrate forward in time, so the ODE is written in a forward variable.
  The plain choice s = 1 - t, dx/ds = beta(1 - s)/2 (x + s(x, 1 - s)), has a
  trap: DormandPrince steps past its last solution time and interpolates
  back, so it evaluates the score at t < 0, where sigma_t is undefined and a
  network that divides by sigma_t returns NaN (clipping t there instead bends
  the ODE and biased the samples by 5 % in our Gaussian test). We therefore
  use log-time u in [0, 1], t = eps**u, which is also forward and keeps t > 0
  for any overshoot:  dx/du = beta(t) t |log eps| / 2 (x + s(x, t)).

A score function here is any callable ``score_fn(x, t) -> score`` with
``x`` float32 [B, ...] and ``t`` float32 [B], returning the shape of ``x``.
"""

import dataclasses
import math
from typing import Callable

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

ScoreFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

DEFAULT_EPS = 1e-5


def _expand_to(t, x):
  """Reshapes t [B] to [B, 1, ..., 1] so that it broadcasts against x."""
  rank = tf.rank(x)
  shape = tf.concat([tf.shape(t), tf.ones([rank - 1], tf.int32)], axis=0)
  return tf.reshape(t, shape)


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """The variance-preserving SDE of eq. (6) with a linear beta schedule.

  Attributes:
    beta_min: beta(0). Default 0.1 (Table I).
    beta_max: beta(1). Default 20.0 (Table I).
  """
  beta_min: float = 0.1
  beta_max: float = 20.0

  def beta(self, t):
    """beta(t) = beta_min + (beta_max - beta_min) t, eq. (6); t: float [...]."""
    t = tf.convert_to_tensor(t, dtype_hint=tf.float32)
    return self.beta_min + (self.beta_max - self.beta_min) * t

  def integrated_beta(self, t):
    """B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2."""
    t = tf.convert_to_tensor(t, dtype_hint=tf.float32)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

  def alpha(self, t):
    """Mean factor alpha(t) = exp(-B(t)/2) of eq. (8); same shape as t."""
    return tf.exp(-0.5 * self.integrated_beta(t))

  def sigma(self, t):
    """Standard deviation sigma_t = sqrt(1 - exp(-B(t))) of eq. (8)."""
    return tf.sqrt(-tf.math.expm1(-self.integrated_beta(t)))

  def variance(self, t):
    """sigma_t^2 = 1 - exp(-B(t)) of eq. (8); also lambda(t) of eq. (7)."""
    return -tf.math.expm1(-self.integrated_beta(t))

  def marginal(self, x0, t):
    """The perturbation kernel p(x_t | x_0) of eq. (8).

    Args:
      x0: float [B, ...] clean data.
      t: float [B] diffusion times in [0, 1].

    Returns:
      `tfd.Independent(tfd.Normal(alpha(t) x0, sigma_t))` with batch shape
      [B] and event shape x0.shape[1:].
    """
    with tf.name_scope('vpsde_marginal'):
      x0 = tf.convert_to_tensor(x0, dtype_hint=tf.float32)
      t = tf.convert_to_tensor(t, dtype=x0.dtype)
      loc = _expand_to(self.alpha(t), x0) * x0
      scale = _expand_to(self.sigma(t), x0) * tf.ones_like(x0)
      return tfd.Independent(tfd.Normal(loc, scale),
                             reinterpreted_batch_ndims=len(x0.shape) - 1)

  def drift_and_diffusion(self, x, t):
    """f(x, t) = -beta(t)/2 x and g(t) = sqrt(beta(t)) of eq. (6)."""
    beta = _expand_to(self.beta(t), x)
    return -0.5 * beta * x, tf.sqrt(self.beta(t))


def denoising_score_matching_loss(score_fn: ScoreFn, x0, sde: VPSDE = VPSDE(),
                                  eps: float = DEFAULT_EPS, seed=None):
  """Denoising score-matching loss of eq. (7) with lambda(t) = sigma_t^2.

  Draws t ~ U[eps, 1] and z ~ N(0, I) per example, forms
  x_t = alpha(t) x0 + sigma_t z (eq. 8), whose kernel score is
  grad log p(x_t | x0) = -z / sigma_t, and returns the batch mean of
  sigma_t^2 || s(x_t, t) + z / sigma_t ||^2 = || sigma_t s(x_t, t) + z ||^2
  (squared norm summed over all pixels).

  Args:
    score_fn: callable (x [B, ...], t [B]) -> [B, ...].
    x0: float32 [B, ...] clean data.
    sde: the VPSDE.
    eps: smallest diffusion time.
    seed: optional stateless seed (shape [2] int) for t and z.

  Returns:
    float32 scalar, the Monte-Carlo estimate of eq. (7).
  """
  with tf.name_scope('denoising_score_matching_loss'):
    x0 = tf.convert_to_tensor(x0, dtype_hint=tf.float32)
    batch = tf.shape(x0)[0]
    if seed is None:
      t = tf.random.uniform([batch], eps, 1.0, dtype=x0.dtype)
      z = tf.random.normal(tf.shape(x0), dtype=x0.dtype)
    else:
      seeds = tf.random.experimental.stateless_split(seed, 2)
      t = tf.random.stateless_uniform([batch], seeds[0], eps, 1.0,
                                      dtype=x0.dtype)
      z = tf.random.stateless_normal(tf.shape(x0), seeds[1], dtype=x0.dtype)
    alpha = _expand_to(sde.alpha(t), x0)
    sigma = _expand_to(sde.sigma(t), x0)
    xt = alpha * x0 + sigma * z
    score = score_fn(xt, t)
    residual = sigma * score + z
    axes = tf.range(1, tf.rank(x0))
    return tf.reduce_mean(tf.reduce_sum(tf.square(residual), axis=axes))


def implicit_score_matching_loss(score_fn: ScoreFn, x, t=None):
  """Implicit score-matching loss of eq. (5) with the exact Jacobian trace.

  Returns the batch mean of 1/2 ||s(x)||^2 + tr(grad_x s(x)). The Jacobian
  is computed exactly with `tf.GradientTape.batch_jacobian` on the flattened
  input, so this is meant for small inputs (the 5 x 5 Gaussian prior: 25
  dimensions).

  Args:
    score_fn: callable (x [B, ...], t [B]) -> [B, ...].
    x: float [B, ...] data samples.
    t: optional float [B] times passed to score_fn (default zeros).

  Returns:
    float scalar, the Monte-Carlo estimate of eq. (5).
  """
  with tf.name_scope('implicit_score_matching_loss'):
    x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
    batch = tf.shape(x)[0]
    if t is None:
      t = tf.zeros([batch], x.dtype)
    shape = tf.shape(x)
    flat = tf.reshape(x, [batch, -1])  # [B, D]
    with tf.GradientTape() as tape:
      tape.watch(flat)
      score = tf.reshape(score_fn(tf.reshape(flat, shape), t), [batch, -1])
    jacobian = tape.batch_jacobian(score, flat)  # [B, D, D]
    trace = tf.linalg.trace(jacobian)  # [B]
    return tf.reduce_mean(0.5 * tf.reduce_sum(tf.square(score), axis=1)
                          + trace)


def probability_flow_sample(score_fn: ScoreFn, shape, sde: VPSDE = VPSDE(),
                            eps: float = 1e-3, rtol: float = 1e-4,
                            atol: float = 1e-4, seed=None, initial=None,
                            max_num_steps: int = 5000):
  """Samples by the probability-flow ODE, from t = 1 down to t = eps.

  The ODE dx/dt = -beta(t)/2 (x + s(x, t)) is integrated forward in the
  log-time u = log(t) / log(eps) from u = 0 (t = 1) to u = 1 (t = eps):
  dx/du = beta(t) t |log eps| / 2 (x + s(x, t)) with t = eps**u, by
  `tfp.math.ode.DormandPrince` (see the module docstring for why not
  s = 1 - t). The score is only ever asked for t in (0, 1].

  Args:
    score_fn: callable (x [B, ...], t [B]) -> [B, ...].
    shape: the sample shape [B, ...] (a list of ints).
    sde: the VPSDE.
    eps: final diffusion time, in (0, 1).
    rtol, atol: DormandPrince tolerances.
    max_num_steps: the solver stops with an error after this many steps
      (instead of looping forever on a NaN score).
    seed: optional int seed for the initial draw from N(0, I).
    initial: optional float32 [B, ...] initial state at t = 1 (overrides the
      draw).

  Returns:
    (samples float32 [B, ...] at t = eps, number of score evaluations int32).
  """
  with tf.name_scope('probability_flow_sample'):
    if not 0.0 < eps < 1.0:
      raise ValueError(f'eps must be in (0, 1), got {eps}.')
    if initial is None:
      initial = tf.random.stateless_normal(
          shape, seed=[0 if seed is None else int(seed), 7])
    initial = tf.convert_to_tensor(initial, dtype=tf.float32)
    batch = tf.shape(initial)[0]
    log_eps = math.log(eps)

    def ode_fn(u, x):
      t_now = tf.exp(u * log_eps)  # t = eps**u > 0 even past u = 1
      t = t_now * tf.ones([batch], x.dtype)
      rate = 0.5 * sde.beta(t_now) * t_now * (-log_eps)
      return rate * (x + score_fn(x, t))

    solver = tfp.math.ode.DormandPrince(rtol=rtol, atol=atol,
                                        max_num_steps=max_num_steps)
    results = solver.solve(ode_fn, initial_time=0.0, initial_state=initial,
                           solution_times=[1.0])
    return results.states[-1], results.diagnostics.num_ode_fn_evaluations
