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
