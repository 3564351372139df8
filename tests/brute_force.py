"""A plain-loop float64 oracle of the approximate-EM patch model, eq. (9)-(16).

Loops over patches, shifts and rotations exactly as the equations read, with
no FFT and no statistics: slow, obviously right, and independent of the
library except for the rotation matrices (tested on their own against
np.rot90).
"""

import numpy as np
from scipy.special import logsumexp

from mtd_tf.model import rotations as rotations_lib


def patches(measurement, size):
  rows, cols = measurement.shape[0] // size, measurement.shape[1] // size
  return [
    measurement[i * size : (i + 1) * size, j * size : (j + 1) * size]
    for i in range(rows)
    for j in range(cols)
  ]


def patch_operator(size, lx, ly, rotation):
  """The matrix A with A vec(F) = vec(C T_l Z R_k F)."""
  out = np.zeros((size * size, size * size))
  for i in range(size):
    for j in range(size):
      a, b = (i + lx) % (2 * size), (j + ly) % (2 * size)
      if a < size and b < size:
        out[i * size + j] = rotation[a * size + b]
  return out


def operators(size, num_rotations):
  mats = rotations_lib.rotation_matrices(size, num_rotations)
  return {
    (lx, ly, k): patch_operator(size, lx, ly, mats[k])
    for lx in range(2 * size)
    for ly in range(2 * size)
    for k in range(num_rotations)
  }


def log_likelihoods(measurement, image, sigma, num_rotations, ops=None):
  """log p(M_m | l, k, F) of eq. (15) with its constant: [D, 2L, 2L, K]."""
  size = image.shape[0]
  ops = ops or operators(size, num_rotations)
  f = image.reshape(-1).astype(np.float64)
  out = []
  for patch in patches(np.asarray(measurement, np.float64), size):
    m = patch.reshape(-1)
    values = np.zeros((2 * size, 2 * size, num_rotations))
    for (lx, ly, k), op in ops.items():
      values[lx, ly, k] = -np.sum((m - op @ f) ** 2) / (
        2 * sigma**2
      ) - 0.5 * size * size * np.log(2 * np.pi * sigma**2)
    out.append(values)
  return np.array(out)


def weights(measurement, image, sigma, num_rotations, ops=None):
  ll = log_likelihoods(measurement, image, sigma, num_rotations, ops)
  flat = ll.reshape(len(ll), -1)
  return np.exp(flat - logsumexp(flat, axis=1, keepdims=True)).reshape(ll.shape)


def data_log_likelihood(measurement, image, sigma, num_rotations, ops=None):
  """sum_m log sum_{l,k} p(l, k) p(M_m | l, k, F), uniform p(l, k)."""
  ll = log_likelihoods(measurement, image, sigma, num_rotations, ops)
  cells = ll.shape[1] * ll.shape[2] * ll.shape[3]
  return float(
    np.sum(logsumexp(ll.reshape(len(ll), -1), axis=1)) - len(ll) * np.log(cells)
  )


def grad_q(measurement, image_tau, image, sigma, num_rotations, ops=None):
  """grad_F Q(F | F_tau) of eq. (16) by direct summation."""
  size = image.shape[0]
  ops = ops or operators(size, num_rotations)
  w = weights(measurement, image_tau, sigma, num_rotations, ops)
  f = image.reshape(-1).astype(np.float64)
  grad = np.zeros(size * size)
  for m, patch in enumerate(patches(np.asarray(measurement, np.float64), size)):
    vec = patch.reshape(-1)
    for (lx, ly, k), op in ops.items():
      if w[m, lx, ly, k] > 0:
        grad += w[m, lx, ly, k] * op.T @ (vec - op @ f) / sigma**2
  return grad.reshape(size, size)
