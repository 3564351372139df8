"""The simulator follows CONVENTIONS: separation, copy count, SNR."""

import numpy as np
import pytest

from mtd_tf import simulate


@pytest.mark.parametrize("size,seed", [(5, 0), (28, 1), (8, 2)])
def test_separation_count_and_snr(size, seed, rng):
  image = rng.uniform(0, 1, (size, size))
  sim = simulate.simulate_measurement(image, snr=3.0, seed=seed)
  n = 11 * size
  assert sim.measurement.shape == (n, n)
  assert sim.measurement.dtype == np.float32
  assert len(sim.corners) == sim.requested_copies == round(0.1 * n * n / size**2)
  assert np.all(sim.corners >= 0) and np.all(sim.corners <= n - size)
  for i in range(len(sim.corners)):
    for j in range(i):
      assert np.max(np.abs(sim.corners[i] - sim.corners[j])) >= 2 * size
  assert sim.sigma == pytest.approx(
      np.linalg.norm(image) / (size * np.sqrt(3.0)))
  assert sim.snr == pytest.approx(3.0)
  assert set(sim.rotations) <= {0, 1, 2, 3}


def test_copies_sit_at_corners_with_their_rotation(rng):
  image = rng.uniform(0, 1, (6, 6))
  sim = simulate.simulate_measurement(image, sigma=1e-6, seed=3)
  for (row, col), k in zip(sim.corners, sim.rotations):
    np.testing.assert_allclose(sim.measurement[row:row + 6, col:col + 6],
                               np.rot90(image, k), atol=1e-4)
  covered = np.zeros(sim.measurement.shape, bool)
  for row, col in sim.corners:
    covered[row:row + 6, col:col + 6] = True
  assert np.abs(sim.measurement[~covered]).max() < 1e-4


def test_noise_has_the_requested_sigma(rng):
  image = rng.uniform(0, 1, (10, 10))
  sim = simulate.simulate_measurement(image, sigma=2.0, seed=4,
                                      size_factor=40)
  covered = np.zeros(sim.measurement.shape, bool)
  for row, col in sim.corners:
    covered[row:row + 10, col:col + 10] = True
  assert np.std(sim.measurement[~covered]) == pytest.approx(2.0, rel=0.02)


def test_same_seed_same_measurement(rng):
  image = rng.uniform(0, 1, (5, 5))
  a = simulate.simulate_measurement(image, snr=1.0, seed=7)
  b = simulate.simulate_measurement(image, snr=1.0, seed=7)
  c = simulate.simulate_measurement(image, snr=1.0, seed=8)
  np.testing.assert_array_equal(a.measurement, b.measurement)
  np.testing.assert_array_equal(a.corners, b.corners)
  assert not np.array_equal(a.measurement, c.measurement)


def test_rectangular_measurement(rng):
  image = rng.uniform(0, 1, (5, 5))
  sim = simulate.simulate_measurement(image, snr=1.0, seed=1,
                                      measurement_shape=(50, 80))
  assert sim.measurement.shape == (50, 80)
  assert len(sim.corners) == round(0.1 * 50 * 80 / 25)


def test_reports_fewer_copies_when_crowded(rng):
  image = rng.uniform(0, 1, (5, 5))
  sim = simulate.simulate_measurement(image, snr=1.0, seed=1, density=0.9,
                                      size_factor=4)
  assert len(sim.corners) < sim.requested_copies


@pytest.mark.parametrize("kwargs,match", [
    (dict(snr=1.0, sigma=1.0), "exactly one"),
    (dict(), "exactly one"),
    (dict(sigma=0.0), "positive"),
    (dict(snr=-1.0), "positive"),
    (dict(sigma=float("nan")), "positive"),
    (dict(snr=1.0, num_rotations=0), "num_rotations"),
])
def test_bad_arguments(kwargs, match, rng):
  with pytest.raises(ValueError, match=match):
    simulate.simulate_measurement(rng.uniform(0, 1, (5, 5)), **kwargs)


def test_bad_image():
  with pytest.raises(ValueError, match="square"):
    simulate.simulate_measurement(np.ones((5, 6)), snr=1.0)
  with pytest.raises(ValueError, match="NaN"):
    simulate.simulate_measurement(np.full((5, 5), np.nan), snr=1.0)
