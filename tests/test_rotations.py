"""Rotation operators R_k and their adjoints (eq. 11)."""

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf.model import rotations


@pytest.mark.parametrize("num_rotations", [1, 2, 4])
def test_permutation_rotations_are_rot90(num_rotations, rng):
  image = rng.standard_normal((7, 7))
  rot = rotations.rotation_set(7, num_rotations)
  assert rot.is_permutation
  got = rot.rotate(tf.constant(image[None])).numpy()[0]
  for k in range(num_rotations):
    np.testing.assert_array_equal(
      got[k], np.rot90(image, 4 * k // num_rotations)
    )
  mats = rotations.rotation_matrices(7, num_rotations)
  for k in range(num_rotations):
    np.testing.assert_array_equal(
      (mats[k] @ image.reshape(-1)).reshape(7, 7),
      np.rot90(image, 4 * k // num_rotations),
    )


@pytest.mark.parametrize("num_rotations", [3, 4, 6, 8])
def test_adjoint_is_exact(num_rotations, rng):
  rot = rotations.rotation_set(6, num_rotations)
  x = tf.constant(rng.standard_normal((2, 6, 6)))
  y = tf.constant(rng.standard_normal((2, num_rotations, 6, 6)))
  lhs = tf.reduce_sum(rot.rotate(x) * y, axis=[2, 3])
  rhs = tf.reduce_sum(x[:, None] * rot.adjoint(y), axis=[2, 3])
  np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_rotations,k", [(8, 2), (8, 4), (8, 6), (12, 3)])
def test_interpolated_set_equals_rot90_at_quarter_turns(num_rotations, k, rng):
  image = rng.standard_normal((9, 9))
  got = (
    rotations.rotation_set(9, num_rotations)
    .rotate(tf.constant(image[None]))
    .numpy()[0, k]
  )
  np.testing.assert_allclose(
    got, np.rot90(image, 4 * k // num_rotations), atol=1e-12
  )


def test_interpolated_rotation_turns_counter_clockwise():
  image = np.zeros((9, 9))
  image[4, 8] = 1.0  # right of centre
  got = rotations.rotation_set(9, 8).rotate(tf.constant(image[None])).numpy()
  # One eighth of a turn counter-clockwise moves it up and to the right.
  row, col = np.unravel_index(np.argmax(got[0, 1]), (9, 9))
  assert row < 4 and col > 4


def test_bad_num_rotations():
  with pytest.raises(ValueError, match="must be >= 1"):
    rotations.rotation_set(5, 0)


def _dense_keys_operator(size, angle):
  """R for one angle, built pixel by pixel from Keys' kernel (the oracle)."""

  def kernel(t):
    t = abs(t)
    if t <= 1:
      return 1.5 * t**3 - 2.5 * t**2 + 1
    if t < 2:
      return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0

  centre = (size - 1) / 2
  matrix = np.zeros((size * size, size * size))
  for r in range(size):
    for c in range(size):
      y, x = r - centre, c - centre
      sr = centre + np.cos(angle) * y + np.sin(angle) * x
      sc = centre - np.sin(angle) * y + np.cos(angle) * x
      for rr in range(size):
        for cc in range(size):
          matrix[r * size + c, rr * size + cc] = kernel(sr - rr) * kernel(
            sc - cc
          )
  return matrix


@pytest.mark.parametrize("num_rotations", [3, 8, 12])
def test_taps_equal_a_dense_oracle(num_rotations, rng):
  size = 7
  rot = rotations.rotation_set(size, num_rotations)
  assert not rot.is_permutation
  dense = np.stack(
    [
      _dense_keys_operator(size, 2 * np.pi * k / num_rotations)
      for k in range(num_rotations)
    ]
  )  # [K, L^2, L^2]
  np.testing.assert_allclose(
    rotations.rotation_matrices(size, num_rotations), dense, atol=1e-12
  )
  images = rng.standard_normal((2, size, size))
  rotated = rng.standard_normal((2, num_rotations, size, size))
  weights = rng.uniform(0, 1, (2, num_rotations, size, size))
  flat = images.reshape(2, -1)
  np.testing.assert_allclose(
    rot.rotate(tf.constant(images)).numpy().reshape(2, num_rotations, -1),
    np.einsum("kpq,bq->bkp", dense, flat),
    atol=1e-12,
  )
  np.testing.assert_allclose(
    rot.adjoint(tf.constant(rotated)).numpy().reshape(2, num_rotations, -1),
    np.einsum("kpq,bkp->bkq", dense, rotated.reshape(2, num_rotations, -1)),
    atol=1e-12,
  )
  v = weights.reshape(2, num_rotations, -1)
  np.testing.assert_allclose(
    rot.normal_matrix(tf.constant(weights)).numpy(),
    np.einsum("kpq,bkp,kpr->bqr", dense, v, dense),
    atol=1e-11,
  )
  np.testing.assert_allclose(
    rot.normal_diagonal(tf.constant(weights)).numpy().reshape(2, -1),
    np.einsum("kpq,bkp->bq", dense**2, v),
    atol=1e-12,
  )


def test_operators_hold_taps_not_dense_matrices():
  """K = 128 at L = 28: 128 x 784 x 16 taps (19 MB), not 38 GB of matrices."""
  rot = rotations.rotation_set(28, 128)
  index, weights = rotations.rotation_taps(28, 128)
  assert index.shape == weights.shape == (128, 28 * 28, rotations.TAPS)
  assert rotations.operator_bytes(28, 128) < 25 * 2**20
  image = np.zeros((28, 28))
  image[8:20, 12:16] = 1.0
  got = rot.rotate(tf.constant(image[None])).numpy()[0]
  assert got.shape == (128, 28, 28)
  np.testing.assert_allclose(got[32], np.rot90(image), atol=1e-12)


def test_cubic_rotation_of_a_smooth_image_is_accurate():
  """A band-limited blob turned by 30 degrees: within 2 % of the exact one."""
  size = 21
  centre = (size - 1) / 2
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")

  def blob(angle):
    y, x = rows - centre, cols - centre
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    return np.exp(-((u - 3) ** 2) / 8 - (v**2) / 3)

  got = rotations.rotation_set(size, 12).rotate(tf.constant(blob(0)[None]))
  exact = blob(-2 * np.pi / 12)  # counter-clockwise on screen
  error = np.linalg.norm(got.numpy()[0, 1] - exact) / np.linalg.norm(exact)
  assert error < 0.02, error


@pytest.mark.parametrize("num_rotations", [4, 7])
def test_numpy_rotations_equal_the_operators(num_rotations, rng):
  images = rng.standard_normal((3, 6, 6))
  mats = rotations.rotation_matrices(6, num_rotations)
  got = rotations.rotate_all(images, num_rotations)  # [3, K, 6, 6]
  want = np.einsum("kpq,bq->bkp", mats, images.reshape(3, -1))
  np.testing.assert_allclose(
    got.reshape(3, num_rotations, -1), want, atol=1e-12
  )
  for k in range(num_rotations):
    np.testing.assert_allclose(
      rotations.unrotate(images[0], k, num_rotations).reshape(-1),
      mats[k].T @ images[0].reshape(-1),
      atol=1e-12,
    )
