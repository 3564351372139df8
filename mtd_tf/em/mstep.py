"""The M-step: Q(F | F_tau) of eq. (16) from the E-step's statistics, eq. (17)-(18).

Up to a constant in F,

  Q(F) = (1/sigma^2) sum_k <S1[k], R_k F> - (1/(2 sigma^2)) sum_k <V[k], (R_k F)^2>,

a concave quadratic. Its gradient comes from `tf.GradientTape`. The M-step
maximises Q(F) + gamma(tau) log p(F), eq. (17); the paper does it with a
few gradient-ascent steps F <- F + mu (grad Q + gamma s(F, t)), eq. (18),
where s is a prior's score (`prior_term`).

Each M-step is one function `m_step(images, stats, inputs) -> images` named
in the registry `registry.M_STEPS` with its properties: a new M-step is a
function (here, or anywhere) and one `registry.register_m_step` call; the
EM loop, its checks, the accelerators and the tools' flags read it there.
"""

import typing

import numpy as np
import tensorflow as tf

__all__ = [
  "MStepInputs",
  "expected_log_likelihood",
  "q_gradient",
  "prior_term",
  "closed_form_mstep",
  "gradient_mstep",
  "preconditioned_mstep",
  "noise_mstep",
  "patch_energy",
  "empty_patch_probability",
  "occupancy_shift_prior",
  "shift_prior_mstep",
]

# Pixels whose expected visibility is below this fraction of the largest
# keep their previous value in the closed-form M-step: nothing was seen there.
_MIN_RELATIVE_VISIBILITY = 1e-6


class MStepInputs(typing.NamedTuple):
  """What every M-step takes besides F_tau and the E-step's statistics.

  Attributes:
    sigma: float [B], the noise levels.
    rotations: the `RotationSet`.
    learning_rate: mu of eq. (18), float scalar or [B] (gradient M-step).
    num_steps: N inner steps (a Python int; gradient and preconditioned).
    prior: None, or a score s(F [P, L, L] float32, t [P] float32) in image
      units (a `priors.Prior`).
    prior_weight: float [B], gamma(tau) times each problem's weight (0: no
      prior for that problem); needed with a prior.
    t_prior: float32 scalar, the diffusion time of the score.
    prior_curvature: float scalar c, the curvature of -log p
      (preconditioned M-step).
    prior_mean: None, or float [L, L] mu when the prior's score is exactly
      -(F - mu) (closed-form M-step with a prior).
  """

  sigma: tf.Tensor
  rotations: typing.Any
  learning_rate: typing.Any = None
  num_steps: int = 1
  prior: typing.Any = None
  prior_weight: typing.Any = None
  t_prior: typing.Any = None
  prior_curvature: typing.Any = None
  prior_mean: typing.Any = None


def expected_log_likelihood(images, stats, sigma, rotations):
  """Q(F | F_tau) of eq. (16), up to a constant in F.

  Args:
    images: float [B, L, L], F.
    stats: `estep.Statistics` with s1 and visibility [B, K, L, L].
    sigma: float [B].
    rotations: the `RotationSet`.

  Returns:
    float [B].
  """
  linear, quadratic = _expected_terms(images, stats, rotations)
  return (linear - 0.5 * quadratic) / sigma**2


def _expected_terms(images, stats, rotations):
  """sum_k <S1[k], R_k F> and sum_k <V[k], (R_k F)^2>: float [B], [B]."""
  rotated = rotations.rotate(images)  # [B, K, L, L]
  linear = tf.reduce_sum(stats.s1 * rotated, axis=[1, 2, 3])
  quadratic = tf.reduce_sum(stats.visibility * rotated**2, axis=[1, 2, 3])
  return linear, quadratic


def noise_mstep(images, stats, rotations, energy, num_patches):
  """The M-step of the noise level: the expected residual per pixel.

  Maximising eq. (16) over sigma as well (refining an estimate from the
  data alone, `noise.estimate_sigma`):

    sigma^2 = (1 / (D L^2)) sum_{m,l,k} w[m,l,k] ||M_m - C T_l Z R_k F||^2
            = (sum_m ||M_m||^2 - 2 sum_k <S1[k], R_k F>
               + sum_k <V[k], (R_k F)^2>) / (D L^2),

  from the statistics the image M-step uses, at the new F (an ECM step: the
  likelihood does not decrease). Every pixel enters, the copies' too, so
  it is tighter than an estimate from the empty pixels alone.

  Args:
    images: float [B, L, L], F (the M-step's new estimate).
    stats: `estep.Statistics` with s1 and visibility [B, K, L, L].
    rotations: the `RotationSet`.
    energy: float [B], sum_m ||M_m||^2 over the E-step's patches.
    num_patches: float [B], D.

  Returns:
    float [B], sigma.
  """
  linear, quadratic = _expected_terms(images, stats, rotations)
  pixels = num_patches * float(rotations.image_size) ** 2
  # The expected residual is a sum of squares; rounding can only take it
  # below zero when the fit is exact.
  residual = tf.maximum(energy - 2.0 * linear + quadratic, 0.0)
  return tf.sqrt(residual / tf.maximum(pixels, 1.0))


def patch_energy(squared_norms, mask, groups=None):
  """sum_m ||M_m||^2 and D of every problem's patches: float [B], [B].

  The two numbers `noise_mstep` needs besides the statistics; they do not
  change across iterations. Arguments as the E-step's data: squared_norms
  and mask [G, C, S], groups None or int [B] indices into G.
  """
  if groups is not None:
    squared_norms = tf.gather(squared_norms, groups)  # [B, C, S]
    mask = tf.gather(mask, groups)  # [B, C, S]
  return (
    tf.reduce_sum(mask * squared_norms, axis=[1, 2]),
    tf.reduce_sum(mask, axis=[1, 2]),
  )


def _empty_shifts(two_l, dtype):
  """1 on the shifts that leave a patch empty (lx == L or ly == L), [2L, 2L]."""
  empty_row = tf.equal(tf.range(two_l), two_l // 2)
  return tf.cast(
    tf.logical_or(empty_row[:, None], empty_row[None, :]), dtype
  )  # [2L, 2L]


def empty_patch_probability(log_rho):
  """epsilon, the shift prior's mass on empty patches: float [B].

  Args:
    log_rho: float [B, 2L, 2L], log rho(l) of eq. (14).
  """
  empty = _empty_shifts(log_rho.shape[-1], log_rho.dtype)  # [2L, 2L]
  return tf.reduce_sum(tf.exp(log_rho) * empty, axis=[1, 2])  # [B]


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
  empty = _empty_shifts(two_l, rho.dtype)  # [2L, 2L]
  num_empty = 2 * two_l - 1
  epsilon = tf.reduce_sum(rho * empty, axis=[1, 2])  # [B]
  full = (1.0 - epsilon) / (two_l * two_l - num_empty)
  return (
    empty * (epsilon / num_empty)[:, None, None]
    + (1.0 - empty) * full[:, None, None]
  )  # [B, 2L, 2L]


# Floor of the estimated shift prior rho(l): log rho stays finite.
RHO_FLOOR = 1e-20


def shift_prior_mstep(rho, family):
  """The M-step of the shift prior rho(l) of eq. (14), as log rho.

  Args:
    rho: float [B, 2L, 2L], the free update (1 / D) sum_{m,k} w[m, l, k]
      (the E-step's shift posterior mass).
    family: True or "free" ((2L)^2 numbers) or "occupancy" (one number,
      `occupancy_shift_prior`).

  Returns:
    float [B, 2L, 2L], log rho, floored at `RHO_FLOOR` where no patch sits.
  """
  if family == "occupancy":
    rho = occupancy_shift_prior(rho)
  return tf.math.log(tf.maximum(rho, RHO_FLOOR))


def q_gradient(images, stats, sigma, rotations):
  """grad_F Q(F | F_tau) of eq. (16), by `tf.GradientTape`.

  Returns:
    float [B, L, L].
  """
  with tf.GradientTape() as tape:
    tape.watch(images)
    q = tf.reduce_sum(expected_log_likelihood(images, stats, sigma, rotations))
  return tape.gradient(q, images)


def prior_term(prior, images, t, weight):
  """The weighted prior score gamma s(F, t) of eq. (18), per problem.

  The score network is called only on the problems with weight > 0, and
  not at all when there are none (gamma(0) = 0 under the linear schedule).

  Args:
    prior: a score s(x [P, L, L] float32, t [P] float32) -> [P, L, L].
    images: float [B, L, L], F.
    t: float scalar, the diffusion time.
    weight: float [B], gamma(tau) times each problem's weight.

  Returns:
    float [B, L, L] (images.dtype), weight * s(F, t); zero where weight is 0.
  """
  dtype = images.dtype
  users = tf.where(weight > 0)  # [P, 1]

  def network():
    chosen = tf.cast(tf.gather_nd(images, users), tf.float32)  # [P, L, L]
    times = tf.fill(tf.shape(chosen)[:1], tf.cast(t, tf.float32))  # [P]
    score = tf.cast(prior(chosen, times), dtype)  # [P, L, L]
    return tf.scatter_nd(
      users, score, tf.shape(images, out_type=tf.int64)
    )  # [B, L, L]

  score = tf.cond(tf.size(users) > 0, network, lambda: tf.zeros_like(images))
  return weight[:, None, None] * score


def closed_form_mstep(images, stats, inputs):
  """The exact maximiser of Q, or of Q + w log N(F; mu, I): eq. (17) solved.

  With a Gaussian prior N(mu, I) weighted by w = gamma(tau) (inputs.prior_mean
  and inputs.prior_weight), the objective stays quadratic and its maximiser
  solves (sum_k R_k^T diag(V[k]) R_k + w sigma^2 I) F = sum_k R_k^T S1[k] +
  w sigma^2 mu. When every R_k is a pixel permutation (K in 1, 2, 4) the
  system is diagonal. Without a prior, pixels never seen (sum_k R_k^T V[k]
  tiny) keep their value from `images`.

  Args:
    images: float [B, L, L], F_tau.
    stats: `estep.Statistics`.
    inputs: `MStepInputs` (sigma, rotations; prior_mean and prior_weight).

  Returns:
    float [B, L, L], F_{tau+1}.
  """
  rotations, sigma = inputs.rotations, inputs.sigma
  rhs = tf.reduce_sum(rotations.adjoint(stats.s1), axis=1)  # [B, L, L]
  if inputs.prior_mean is not None:
    ridge = tf.cast(inputs.prior_weight, images.dtype) * sigma**2  # [B]
    mean = tf.broadcast_to(
      tf.cast(inputs.prior_mean, images.dtype), tf.shape(images)
    )  # [B, L, L]
  else:
    ridge = tf.zeros_like(images[:, 0, 0])  # [B]
    mean = images
  if rotations.is_permutation:
    diagonal = (
      tf.reduce_sum(rotations.adjoint(stats.visibility), axis=1)
      + ridge[:, None, None]
    )  # [B, L, L]
    floor = _MIN_RELATIVE_VISIBILITY * tf.reduce_max(
      diagonal, axis=[1, 2], keepdims=True
    )
    seen = diagonal > floor
    numerator = rhs + ridge[:, None, None] * mean
    return tf.where(seen, numerator / tf.where(seen, diagonal, 1.0), images)
  # Interpolated rotations couple pixels: solve the normal equations, with a
  # rounding-level ridge towards the previous estimate so that unseen pixels
  # stay solvable.
  size = rotations.image_size
  normal = rotations.normal_matrix(stats.visibility)  # [B, L^2, L^2]
  tiny = (
    100
    * np.finfo(images.dtype.as_numpy_dtype).eps
    * tf.reduce_max(tf.linalg.diag_part(normal), axis=-1)
  )  # [B]
  eye = tf.eye(size * size, dtype=images.dtype)
  flat = lambda x: tf.reshape(x, [-1, size * size, 1])
  flat_rhs = (
    flat(rhs)
    + ridge[:, None, None] * flat(mean)
    + tiny[:, None, None] * flat(images)
  )
  solution = tf.linalg.solve(
    normal + (ridge + tiny)[:, None, None] * eye, flat_rhs
  )  # [B, L^2, 1]
  return tf.reshape(solution, tf.shape(images))


def _ascent(images, stats, inputs, scaled):
  """N steps F_{i+1} = F_i + scaled(grad Q(F_i) + gamma s(F_i, t)), eq. (18).

  The step loop shared by the gradient and preconditioned M-steps; `scaled`
  maps the ascent direction [B, L, L] to the step taken.
  """
  current = images
  for _ in range(int(inputs.num_steps)):
    step = q_gradient(current, stats, inputs.sigma, inputs.rotations)
    if inputs.prior is not None:
      step += prior_term(
        inputs.prior, current, inputs.t_prior, inputs.prior_weight
      )
    current = current + scaled(step)
  return current


def gradient_mstep(images, stats, inputs):
  """The paper's M-step, eq. (18): N gradient-ascent steps of size mu.

  F_{i+1} = F_i + mu (grad Q(F_i | F_tau) + gamma s(F_i, t_prior)).

  Args:
    images: float [B, L, L], F_tau (also the first iterate F_0).
    stats: `estep.Statistics` from F_tau.
    inputs: `MStepInputs` (learning_rate mu, num_steps N; the prior).

  Returns:
    float [B, L, L], F_N.
  """
  learning_rate = tf.reshape(
    tf.cast(inputs.learning_rate, images.dtype), [-1, 1, 1]
  )
  return _ascent(images, stats, inputs, lambda step: learning_rate * step)


def preconditioned_mstep(images, stats, inputs):
  """Steps on Q + gamma log p of eq. (17) scaled by the inverse curvature.

  F_{i+1} = F_i + (grad Q(F_i) + gamma s(F_i)) / (d + gamma c), with
  d = diag(sum_k R_k^T diag(V[k]) R_k) / sigma^2 the exact curvature of -Q
  (diagonal when the rotations are permutations) and c the curvature of
  -log p (`priors.Prior.curvature`). Each step is the exact maximiser of Q
  plus the prior's second-order model around F_i, so with no prior one step
  is the closed form, with the exact Gaussian prior (c = 1) one step is its
  MAP M-step, and with a learned score the step size adapts to the SNR
  instead of a fixed mu.

  Args:
    images: float [B, L, L], F_tau.
    stats: `estep.Statistics`.
    inputs: `MStepInputs` (num_steps; the prior and prior_curvature c).

  Returns:
    float [B, L, L].
  """
  sigma = inputs.sigma
  curvature = (
    inputs.rotations.normal_diagonal(stats.visibility)
    / sigma[:, None, None] ** 2
  )  # [B, L, L]
  floor = _MIN_RELATIVE_VISIBILITY * tf.reduce_max(
    curvature, axis=[1, 2], keepdims=True
  )
  if inputs.prior is not None:
    curvature += (
      tf.cast(inputs.prior_weight, images.dtype)
      * tf.cast(inputs.prior_curvature, images.dtype)
    )[:, None, None]
  curvature = tf.maximum(curvature, floor)
  return _ascent(images, stats, inputs, lambda step: step / curvature)
