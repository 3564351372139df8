"""The variance-preserving SDE of score priors, eq. (5)-(8) of the paper.

Zabatani, Kreymer and Bendory, "Score-based diffusion priors for multi-target
detection", section II, with the conventions of ``docs/conventions.md``. The
one home of the VP-SDE's formulas; everything else (the networks, the losses,
the sampler, the M-step's prior weight) asks a `VPSDE`:

* eq. (6), the forward SDE  dx = f(x, t) dt + g(t) dw  with
  f(x, t) = -beta(t)/2 x and g(t) = sqrt(beta(t)), and the linear schedule
  beta(t) = beta_min + (beta_max - beta_min) t on [0, 1] (Table I:
  `table1.BETA_MIN`, `table1.BETA_MAX`) (`VPSDE.drift_and_diffusion`).
* B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2.
* eq. (8), the perturbation kernel p(x_t | x_0) = N(alpha(t) x_0, sigma_t^2 I)
  with alpha(t) = exp(-B(t)/2) and sigma_t^2 = 1 - exp(-B(t))
  (`VPSDE.marginal`, a `tfd.Independent(tfd.Normal)`); at t = 1 it is close
  to N(0, I), the sampler's start (`VPSDE.prior_distribution`).
* eq. (7), denoising score matching with lambda(t) = sigma_t^2 and
  t ~ U[eps, 1], x_t drawn from the kernel (`denoising_score_matching_loss`).
* eq. (5), implicit score matching (Hyvarinen) with the exact trace of the
  Jacobian (`implicit_score_matching_loss`).
* The probability-flow ODE of Song et al. (2021),
  dx/dt = f(x, t) - g(t)^2 / 2 s(x, t) = -beta(t)/2 (x + s(x, t))
  (`VPSDE.probability_flow_drift`), integrated from t = 1 down to t = eps
  with `tfp.math.ode.DormandPrince` (`probability_flow_sample`). TFP solvers
  only integrate forward in time, so the ODE is written in a forward
  variable. The plain choice s = 1 - t has a trap: DormandPrince steps past
  its last solution time and interpolates back, so it evaluates the score at
  t < 0, where sigma_t is undefined and a network that divides by sigma_t
  returns NaN (clipping t there instead bends the ODE and biased the samples
  by 5 % in our Gaussian test). We therefore use log-time u in [0, 1],
  t = eps**u, which is also forward and keeps t > 0 for any overshoot:
  dx/du = dx/dt * dt/du with dt/du = t log(eps).

A score function here is any callable ``score_fn(x, t) -> score`` with
``x`` float32 [B, ...] and ``t`` float32 [B], returning the shape of ``x``.
"""

from collections.abc import Callable
import dataclasses
import math

import tensorflow as tf
import tensorflow_probability as tfp

from mtd_tf.base import table1

tfd = tfp.distributions

ScoreFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Smallest diffusion time of the training loss, eq. (7).
DEFAULT_EPS = 1e-5
# Final diffusion time of the probability-flow sampler.
DEFAULT_SAMPLER_EPS = 1e-3


def _expand_to(t, x):
  """Reshapes t [B] to [B, 1, ..., 1] so that it broadcasts against x."""
  rank = tf.rank(x)
  shape = tf.concat([tf.shape(t), tf.ones([rank - 1], tf.int32)], axis=0)
  return tf.reshape(t, shape)


def _independent(distribution, rank):
  """Reinterprets all but the first of `rank` batch dimensions as the event."""
  return tfd.Independent(distribution, reinterpreted_batch_ndims=rank - 1)


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """The variance-preserving SDE of eq. (6) with a linear beta schedule.

  Every time argument is a float tensor (or number) of any shape; results
  have that shape (float32 unless t is float64).

  Attributes:
    beta_min: beta(0) (Table I: 0.1).
    beta_max: beta(1) (Table I: 20).
  """

  beta_min: float = table1.BETA_MIN
  beta_max: float = table1.BETA_MAX

  def beta(self, t):
    """beta(t) = beta_min + (beta_max - beta_min) t of eq. (6)."""
    t = tf.convert_to_tensor(t, dtype_hint=tf.float32)
    return self.beta_min + (self.beta_max - self.beta_min) * t

  def integrated_beta(self, t):
    """B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2."""
    t = tf.convert_to_tensor(t, dtype_hint=tf.float32)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

  def alpha(self, t):
    """Mean factor alpha(t) = exp(-B(t)/2) of the kernel, eq. (8)."""
    return tf.exp(-0.5 * self.integrated_beta(t))

  def variance(self, t):
    """sigma_t^2 = 1 - exp(-B(t)) of eq. (8); also lambda(t) of eq. (7)."""
    return -tf.math.expm1(-self.integrated_beta(t))

  def std(self, t):
    """Standard deviation sigma_t = sqrt(1 - exp(-B(t))) of eq. (8)."""
    return tf.sqrt(self.variance(t))

  # The paper's name for the kernel's standard deviation.
  sigma = std

  def marginal(self, x0, t):
    """The perturbation kernel p(x_t | x_0) = N(alpha(t) x0, sigma_t^2 I), eq. (8).

    Args:
      x0: float [B, ...] clean data.
      t: float [B] diffusion times in (0, 1].

    Returns:
      `tfd.Independent(tfd.Normal(alpha(t) x0, sigma_t))` with batch shape
      [B] and event shape x0.shape[1:].
    """
    with tf.name_scope("vpsde_marginal"):
      x0 = tf.convert_to_tensor(x0, dtype_hint=tf.float32)
      t = tf.convert_to_tensor(t, dtype=x0.dtype)
      loc = _expand_to(self.alpha(t), x0) * x0  # [B, ...]
      scale = _expand_to(self.std(t), x0) * tf.ones_like(x0)  # [B, ...]
      return _independent(tfd.Normal(loc, scale), len(x0.shape))

  def prior_distribution(self, shape, dtype=tf.float32):
    """The distribution at t = 1 that sampling starts from: N(0, I).

    alpha(1)^2 = exp(-B(1)) ~ 4.5e-5, so p(x_1 | x_0) is N(0, I) up to that.

    Args:
      shape: [B, ...] (a list of ints): B draws of shape [...].
      dtype: float dtype.

    Returns:
      A standard normal `tfd.Independent` with batch shape [B] and event
      shape [...].
    """
    with tf.name_scope("vpsde_prior_distribution"):
      zeros = tf.zeros(shape, dtype)  # [B, ...]
      return _independent(tfd.Normal(zeros, tf.ones_like(zeros)), len(shape))

  def drift_and_diffusion(self, x, t):
    """The forward SDE's coefficients of eq. (6).

    Args:
      x: float [B, ...] states.
      t: float [B] times.

    Returns:
      (f(x, t) = -beta(t)/2 x of shape [B, ...], g(t) = sqrt(beta(t)) [B]).
    """
    with tf.name_scope("vpsde_drift_and_diffusion"):
      x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
      beta = self.beta(tf.convert_to_tensor(t, x.dtype))  # [B]
      return -0.5 * _expand_to(beta, x) * x, tf.sqrt(beta)

  def probability_flow_drift(self, score_fn: ScoreFn, x, t):
    """dx/dt = f(x, t) - g(t)^2 / 2 s(x, t) of the probability-flow ODE.

    Args:
      score_fn: callable (x [B, ...], t [B]) -> [B, ...].
      x: float [B, ...] states.
      t: float [B] times in (0, 1].

    Returns:
      float [B, ...].
    """
    with tf.name_scope("vpsde_probability_flow_drift"):
      drift, diffusion = self.drift_and_diffusion(x, t)
      return drift - 0.5 * _expand_to(tf.square(diffusion), x) * score_fn(x, t)


def denoising_score_matching_loss(
  score_fn: ScoreFn,
  x0,
  sde: VPSDE = VPSDE(),
  eps: float = DEFAULT_EPS,
  seed=None,
):
  """Denoising score-matching loss of eq. (7) with lambda(t) = sigma_t^2.

  Draws t ~ U[eps, 1] per example and x_t from the kernel p(x_t | x0)
  (`VPSDE.marginal`, eq. 8), whose score is
  grad log p(x_t | x0) = -(x_t - mean) / stddev^2, and returns the batch mean
  of sigma_t^2 || s(x_t, t) - grad log p(x_t | x0) ||^2 (squared norm summed
  over all pixels), written as || sigma_t s(x_t, t) + z ||^2 with
  z = (x_t - mean) / stddev.

  Args:
    score_fn: callable (x [B, ...], t [B]) -> [B, ...].
    x0: float32 [B, ...] clean data.
    sde: the VPSDE.
    eps: smallest diffusion time.
    seed: optional stateless seed (shape [2] int) for t and x_t.

  Returns:
    float32 scalar, the Monte-Carlo estimate of eq. (7).
  """
  with tf.name_scope("denoising_score_matching_loss"):
    x0 = tf.convert_to_tensor(x0, dtype_hint=tf.float32)
    batch = tf.shape(x0)[0]
    if seed is None:
      t = tf.random.uniform([batch], eps, 1.0, dtype=x0.dtype)  # [B]
      kernel = sde.marginal(x0, t)
      xt = kernel.sample()  # [B, ...]
    else:
      seeds = tf.random.experimental.stateless_split(seed, 2)
      t = tf.random.stateless_uniform(
        [batch], seeds[0], eps, 1.0, dtype=x0.dtype
      )  # [B]
      kernel = sde.marginal(x0, t)
      xt = kernel.sample(seed=seeds[1])  # [B, ...]
    stddev = kernel.stddev()  # [B, ...]
    z = (xt - kernel.mean()) / stddev  # [B, ...]
    residual = stddev * score_fn(xt, t) + z
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
  with tf.name_scope("implicit_score_matching_loss"):
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
    return tf.reduce_mean(0.5 * tf.reduce_sum(tf.square(score), axis=1) + trace)


def probability_flow_sample(
  score_fn: ScoreFn,
  shape,
  sde: VPSDE = VPSDE(),
  eps: float = DEFAULT_SAMPLER_EPS,
  rtol: float = 1e-4,
  atol: float = 1e-4,
  seed=None,
  initial=None,
  max_num_steps: int = 5000,
):
  """Samples by the probability-flow ODE, from t = 1 down to t = eps.

  Starts from a draw of `VPSDE.prior_distribution` and integrates
  dx/dt = `VPSDE.probability_flow_drift` forward in the log-time
  u = log(t) / log(eps) from u = 0 (t = 1) to u = 1 (t = eps):
  dx/du = dx/dt * t log(eps) with t = eps**u, by
  `tfp.math.ode.DormandPrince` (see the module docstring for why not
  s = 1 - t). The score is only ever asked for t in (0, 1].

  Args:
    score_fn: callable (x [B, ...], t [B]) -> [B, ...].
    shape: the sample shape [B, ...] (a list of ints).
    sde: the VPSDE.
    eps: final diffusion time, in (0, 1).
    rtol, atol: DormandPrince tolerances.
    seed: optional int seed for the initial draw.
    initial: optional float32 [B, ...] initial state at t = 1 (overrides the
      draw).
    max_num_steps: the solver stops with an error after this many steps
      (instead of looping forever on a NaN score).

  Returns:
    (samples float32 [B, ...] at t = eps, number of score evaluations int32).

  Raises:
    ValueError: eps outside (0, 1).
  """
  with tf.name_scope("probability_flow_sample"):
    if not 0.0 < eps < 1.0:
      raise ValueError(f"eps must be in (0, 1), got {eps}.")
    if initial is None:
      initial = sde.prior_distribution(shape).sample(
        seed=[0 if seed is None else int(seed), 7]
      )  # [B, ...]
    initial = tf.convert_to_tensor(initial, dtype=tf.float32)
    batch = tf.shape(initial)[0]
    log_eps = math.log(eps)

    def ode_fn(u, x):
      t_now = tf.exp(u * log_eps)  # t = eps**u > 0 even past u = 1
      t = t_now * tf.ones([batch], x.dtype)  # [B]
      return sde.probability_flow_drift(score_fn, x, t) * (t_now * log_eps)

    solver = tfp.math.ode.DormandPrince(
      rtol=rtol, atol=atol, max_num_steps=max_num_steps
    )
    results = solver.solve(
      ode_fn, initial_time=0.0, initial_state=initial, solution_times=[1.0]
    )
    return results.states[-1], results.diagnostics.num_ode_fn_evaluations
