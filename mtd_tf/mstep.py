"""The M-step: Q(F | F_tau) of eq. (16) from the E-step's statistics, eq. (17)-(18).

Up to a constant in F,

  Q(F) = (1/sigma^2) sum_k <S1[k], R_k F> - (1/(2 sigma^2)) sum_k <V[k], (R_k F)^2>,

a concave quadratic. Its gradient comes from `tf.GradientTape`. The exact
maximiser solves (sum_k R_k^T diag(V[k]) R_k) F = sum_k R_k^T S1[k]; when
every R_k is a pixel permutation (K in 1, 2, 4) the system is diagonal and
F = sum_k R_k^T S1[k] / sum_k R_k^T V[k] elementwise. The paper's M-step is
instead a few gradient-ascent steps F <- F + mu (grad Q + gamma s(F, t)),
eq. (18), where s is a prior's score.
"""

import numpy as np
import tensorflow as tf

__all__ = ["expected_log_likelihood", "q_gradient", "closed_form_mstep",
           "gradient_mstep", "preconditioned_mstep"]

# Pixels whose expected visibility is below this fraction of the largest
# keep their previous value in the closed-form M-step: nothing was seen there.
_MIN_RELATIVE_VISIBILITY = 1e-6


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
  rotated = rotations.rotate(images)  # [B, K, L, L]
  linear = tf.reduce_sum(stats.s1 * rotated, axis=[1, 2, 3])
  quadratic = tf.reduce_sum(stats.visibility * rotated**2, axis=[1, 2, 3])
  return (linear - 0.5 * quadratic) / sigma**2


def q_gradient(images, stats, sigma, rotations):
  """grad_F Q(F | F_tau), by `tf.GradientTape`.

  Returns:
    float [B, L, L].
  """
  with tf.GradientTape() as tape:
    tape.watch(images)
    q = tf.reduce_sum(expected_log_likelihood(images, stats, sigma, rotations))
  return tape.gradient(q, images)


def closed_form_mstep(images, stats, rotations, sigma=None,
                      prior_mean=None, prior_weight=None):
  """The exact maximiser of Q, or of Q + w log N(F; mu, I) (eq. 17).

  With a Gaussian prior N(mu, I) weighted by w = gamma(tau), the objective
  stays quadratic and its maximiser solves
  (sum_k R_k^T diag(V[k]) R_k + w sigma^2 I) F = sum_k R_k^T S1[k] + w sigma^2 mu.
  Without a prior, pixels never seen (sum_k R_k^T V[k] tiny) keep their
  value from `images`.

  Args:
    images: float [B, L, L], F_tau.
    stats: `estep.Statistics`.
    rotations: the `RotationSet`.
    sigma: float [B]; needed with a prior.
    prior_mean: None or float [L, L] (or [B, L, L]), the Gaussian prior mean.
    prior_weight: None or float [B], w = gamma(tau) per problem (0: none).

  Returns:
    float [B, L, L], F_{tau+1}.
  """
  rhs = tf.reduce_sum(rotations.adjoint(stats.s1), axis=1)  # [B, L, L]
  if prior_mean is not None:
    ridge = tf.cast(prior_weight, images.dtype) * sigma**2  # [B]
    mean = tf.broadcast_to(tf.cast(prior_mean, images.dtype), tf.shape(images))
  else:
    ridge = tf.zeros_like(images[:, 0, 0])
    mean = images
  if rotations.is_permutation:
    diagonal = tf.reduce_sum(rotations.adjoint(stats.visibility),
                             axis=1) + ridge[:, None, None]  # [B, L, L]
    floor = _MIN_RELATIVE_VISIBILITY * tf.reduce_max(
        diagonal, axis=[1, 2], keepdims=True)
    seen = diagonal > floor
    numerator = rhs + ridge[:, None, None] * mean
    return tf.where(seen, numerator / tf.where(seen, diagonal, 1.0), images)
  # Interpolated rotations couple pixels: solve the normal equations, with a
  # rounding-level ridge towards the previous estimate so that unseen pixels
  # stay solvable.
  size = rotations.image_size
  normal = rotations.normal_matrix(stats.visibility)  # [B, L^2, L^2]
  tiny = 100 * np.finfo(images.dtype.as_numpy_dtype).eps * tf.reduce_max(
      tf.linalg.diag_part(normal), axis=-1)  # [B]
  eye = tf.eye(size * size, dtype=images.dtype)
  flat = lambda x: tf.reshape(x, [-1, size * size, 1])
  flat_rhs = flat(rhs) + ridge[:, None, None] * flat(mean) + tiny[
      :, None, None] * flat(images)
  solution = tf.linalg.solve(
      normal + (ridge + tiny)[:, None, None] * eye, flat_rhs)
  return tf.reshape(solution, tf.shape(images))


def gradient_mstep(images, stats, sigma, rotations, *, learning_rate,
                   num_steps, prior_score=None):
  """The paper's M-step, eq. (18): `num_steps` gradient-ascent steps.

  F_{i+1} = F_i + mu (grad Q(F_i | F_tau) + prior_score(F_i)).

  Args:
    images: float [B, L, L], F_tau (also the first iterate F_0).
    stats: `estep.Statistics` from F_tau.
    sigma: float [B].
    rotations: the `RotationSet`.
    learning_rate: mu, float scalar or [B].
    num_steps: N, a Python int.
    prior_score: None, or a callable F [B, L, L] -> gamma * s(F, t_prior)
      [B, L, L] (already weighted).

  Returns:
    float [B, L, L], F_N.
  """
  learning_rate = tf.reshape(tf.cast(learning_rate, images.dtype), [-1, 1, 1])
  current = images
  for _ in range(int(num_steps)):
    step = q_gradient(current, stats, sigma, rotations)
    if prior_score is not None:
      step += prior_score(current)
    current = current + learning_rate * step
  return current


def preconditioned_mstep(images, stats, sigma, rotations, *, num_steps,
                         prior_score=None, prior_curvature=None):
  """Gradient steps on Q + gamma log p scaled by the inverse curvature.

  F_{i+1} = F_i + (grad Q(F_i) + gamma s(F_i)) / (d + gamma c), with
  d = diag(sum_k R_k^T diag(V[k]) R_k) / sigma^2 the exact curvature of -Q
  (diagonal when the rotations are permutations) and c the curvature of
  -log p. Each step is the exact maximiser of Q plus the prior's
  second-order model around F_i, so with no prior one step is the closed
  form, with the exact Gaussian prior (c = 1) one step is its MAP M-step,
  and with a learned score the step size adapts to the SNR instead of a
  fixed mu.

  Args:
    images: float [B, L, L], F_tau.
    stats: `estep.Statistics`.
    sigma: float [B].
    rotations: the `RotationSet`.
    num_steps: inner steps per M-step.
    prior_score: None or a callable F -> gamma * s(F) [B, L, L].
    prior_curvature: None or float [B], gamma * c.

  Returns:
    float [B, L, L].
  """
  curvature = rotations.normal_diagonal(stats.visibility) / sigma[
      :, None, None]**2  # [B, L, L]
  floor = _MIN_RELATIVE_VISIBILITY * tf.reduce_max(
      curvature, axis=[1, 2], keepdims=True)
  if prior_curvature is not None:
    curvature += prior_curvature[:, None, None]
  curvature = tf.maximum(curvature, floor)
  current = images
  for _ in range(int(num_steps)):
    step = q_gradient(current, stats, sigma, rotations)
    if prior_score is not None:
      step += prior_score(current)
    current = current + step / curvature
  return current
