"""Errors: rotation-aligned (section IV) and rotation-and-shift aligned."""

import numpy as np
import pytest

from mtd_tf.model import datasets
from mtd_tf.model import metrics


def test_relative_error_is_rotation_invariant(rng):
  image = rng.uniform(0, 1, (8, 8))
  for k in range(4):
    assert metrics.relative_error(image, np.rot90(image, k)) == pytest.approx(0)
  noisy = image + 0.1 * rng.standard_normal(image.shape)
  expected = np.linalg.norm(noisy - image) / np.linalg.norm(image)
  assert metrics.relative_error(image, np.rot90(noisy, 3)) == pytest.approx(
    expected
  )


def test_shift_aligned_error_sees_through_translations():
  image = np.zeros((12, 12))
  image[3:8, 4:7] = 1.0
  moved = np.rot90(np.roll(image, (2, -1), axis=(0, 1)), 1)
  assert metrics.relative_error(image, moved) > 0.5
  assert metrics.shift_aligned_error(image, moved) == pytest.approx(0)
  assert metrics.shift_aligned_error(image, moved, max_shift=1) > 0.5


def test_shift_aligned_error_at_any_angle_sees_through_turns_and_shifts():
  from mtd_tf.model import datasets  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  digit = datasets.shipped_digits()["targets"][4]
  angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
  moved = simulation.rotate_continuous(
    np.roll(digit, (2, -1), axis=(0, 1)), -angles[7]
  )
  turned_back = metrics.relative_error(digit, moved, angles=angles)
  aligned = metrics.shift_aligned_error(digit, moved, angles=angles)
  # Only the interpolation of two turns is left once turn and shift are
  # undone; without the angles, or without the shifts, it is far off.
  assert aligned < 0.1
  assert turned_back > 0.5
  assert metrics.shift_aligned_error(digit, moved) > 0.5
  # Never above the error over the same angles (shift 0 is among the shifts).
  noisy = moved + 0.2 * np.random.default_rng(3).standard_normal(digit.shape)
  assert metrics.shift_aligned_error(
    digit, noisy, angles=angles
  ) <= metrics.relative_error(digit, noisy, angles=angles)


def test_oracle_alignment_estimate_averages_copies(rng):
  image = rng.uniform(0, 1, (4, 4))
  measurement = np.zeros((16, 16))
  measurement[0:4, 0:4] = image
  measurement[8:12, 10:14] = np.rot90(image, 2)
  got = metrics.oracle_alignment_estimate(
    measurement, 4, [[0, 0], [8, 10]], [0, 2]
  )
  np.testing.assert_allclose(got, image)


def test_oracle_alignment_error_is_zero_without_noise(rng):
  image = rng.uniform(0, 1, (4, 4))
  measurement = np.zeros((16, 16))
  measurement[4:8, 8:12] = np.rot90(image, 1)
  assert metrics.oracle_alignment_error(
    measurement, image, [[4, 8]], [1]
  ) == pytest.approx(0, abs=1e-12)


def test_psnr_of_a_constant_offset():
  reference = np.zeros((8, 8))
  # MSE 0.01 over a unit range: 20 dB.
  assert metrics.psnr(reference, reference + 0.1) == pytest.approx(20.0)


def test_align_returns_the_best_rotation(rng):
  image = rng.uniform(0, 1, (5, 5))
  np.testing.assert_allclose(metrics.align(image, np.rot90(image, 3)), image)


def test_relative_error_over_an_angle_grid():
  from mtd_tf.model import datasets
  from mtd_tf.model import simulation

  digit = datasets.shipped_digits()["targets"][2]
  turned = simulation.rotate_continuous(digit, -0.5)
  coarse = metrics.relative_error(digit, turned)
  fine = metrics.relative_error(
    digit, turned, angles=np.linspace(0, 2 * np.pi, 72, endpoint=False)
  )
  exact = metrics.relative_error(digit, turned, angles=[0.5])
  assert exact < 0.2 < coarse
  assert fine <= exact + 0.1


def test_shift_aligned_error_equals_the_brute_force_search():
  # Every translation's residual at once (FFT correlation) against moving
  # each turned candidate by each translation and measuring it.
  rng = np.random.default_rng(4)
  digits = datasets.shipped_digits()["targets"]
  angles = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
  for i in range(4):
    truth = digits[i]
    moved = np.roll(np.rot90(digits[i + 1 - i % 2], i), (i - 2, 3 - i), (0, 1))
    estimate = moved + 0.2 * rng.normal(size=moved.shape)
    for max_shift, turns in ((7, None), (3, angles)):
      candidates = metrics._candidates(estimate, 4, turns)  # [C, L, L]
      brute = min(
        np.linalg.norm(
          metrics._shifted_all(candidates, r, c) - truth, axis=(1, 2)
        ).min()
        for r in range(-max_shift, max_shift + 1)
        for c in range(-max_shift, max_shift + 1)
      ) / np.linalg.norm(truth)
      got = metrics.shift_aligned_error(
        truth, estimate, max_shift=max_shift, angles=turns
      )
      assert got == pytest.approx(brute, rel=1e-12, abs=1e-14)
