"""The simulator follows docs/conventions.md: separation, copy count, SNR."""

import itertools

import numpy as np
import pytest

from mtd_tf.model import simulation


@pytest.mark.parametrize("size,seed", [(5, 0), (28, 1), (8, 2)])
def test_separation_count_and_snr(size, seed, rng):
  image = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(image, snr=3.0, seed=seed)
  n = 11 * size
  assert sim.measurement.shape == (n, n)
  assert sim.measurement.dtype == np.float32
  assert (
    len(sim.corners) == sim.requested_copies == round(0.1 * n * n / size**2)
  )
  assert np.all(sim.corners >= 0) and np.all(sim.corners <= n - size)
  for i in range(len(sim.corners)):
    for j in range(i):
      assert np.max(np.abs(sim.corners[i] - sim.corners[j])) >= 2 * size
  assert sim.sigma == pytest.approx(
    np.linalg.norm(image) / (size * np.sqrt(3.0))
  )
  assert simulation.snr_from_sigma(image, sim.sigma) == pytest.approx(3.0)
  assert set(sim.rotations) <= {0, 1, 2, 3}


def test_copies_sit_at_corners_with_their_rotation(rng):
  image = rng.uniform(0, 1, (6, 6))
  sim = simulation.simulate_measurement(image, sigma=1e-6, seed=3)
  for (row, col), k in zip(sim.corners, sim.rotations):
    np.testing.assert_allclose(
      sim.measurement[row : row + 6, col : col + 6],
      np.rot90(image, k),
      atol=1e-4,
    )
  covered = np.zeros(sim.measurement.shape, bool)
  for row, col in sim.corners:
    covered[row : row + 6, col : col + 6] = True
  assert np.abs(sim.measurement[~covered]).max() < 1e-4


def test_noise_has_the_requested_sigma(rng):
  image = rng.uniform(0, 1, (10, 10))
  sim = simulation.simulate_measurement(
    image, sigma=2.0, seed=4, size_factor=40
  )
  covered = np.zeros(sim.measurement.shape, bool)
  for row, col in sim.corners:
    covered[row : row + 10, col : col + 10] = True
  assert np.std(sim.measurement[~covered]) == pytest.approx(2.0, rel=0.02)


def test_same_seed_same_measurement(rng):
  image = rng.uniform(0, 1, (5, 5))
  a = simulation.simulate_measurement(image, snr=1.0, seed=7)
  b = simulation.simulate_measurement(image, snr=1.0, seed=7)
  c = simulation.simulate_measurement(image, snr=1.0, seed=8)
  np.testing.assert_array_equal(a.measurement, b.measurement)
  np.testing.assert_array_equal(a.corners, b.corners)
  assert not np.array_equal(a.measurement, c.measurement)


def test_rectangular_measurement(rng):
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(
    image, snr=1.0, seed=1, measurement_shape=(50, 80)
  )
  assert sim.measurement.shape == (50, 80)
  assert len(sim.corners) == round(0.1 * 50 * 80 / 25)


def test_reports_fewer_copies_when_crowded(rng):
  # 4 copies fit 10 pixels apart in 20 x 20 (corners in 16 x 16) only when
  # they sit near the four corners: random placement usually finds fewer.
  image = rng.uniform(0, 1, (5, 5))
  short = [
    simulation.simulate_measurement(
      image, snr=1.0, seed=s, density=0.25, size_factor=4
    )
    for s in range(5)
  ]
  assert all(sim.requested_copies == 4 for sim in short)
  assert any(len(sim.corners) < sim.requested_copies for sim in short)


def _brute_max_copies(shape, size):
  """Largest set of corners pairwise >= 2L apart (Chebyshev), by search."""
  points = list(
    itertools.product(range(shape[0] - size + 1), range(shape[1] - size + 1))
  )
  best = 0

  def grow(chosen, start):
    nonlocal best
    best = max(best, len(chosen))
    for i in range(start, len(points)):
      if len(chosen) + (len(points) - i) <= best:
        return
      p = points[i]
      if all(
        max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= 2 * size for q in chosen
      ):
        grow(chosen + [p], i + 1)

  grow([], 0)
  return best


@pytest.mark.parametrize(
  "shape,size",
  [((4, 4), 1), ((5, 3), 1), ((6, 7), 2), ((9, 6), 2), ((7, 7), 3)],
)
def test_max_copies_matches_exhaustive_search(shape, size):
  assert simulation.max_copies(shape, size) == _brute_max_copies(shape, size)


def test_density_that_cannot_fit_is_refused_with_the_number(rng):
  image = rng.uniform(0, 1, (5, 5))
  with pytest.raises(
    simulation.SimulationError, match=r"asks for 14 copies but at most 4 fit"
  ):
    simulation.simulate_measurement(image, snr=1.0, density=0.9, size_factor=4)


def test_measurement_too_large_for_memory_is_refused():
  needed = simulation.memory_bytes((1100, 1100))
  assert needed == 28 * 1100 * 1100
  with pytest.raises(simulation.SimulationError, match="GiB"):
    simulation.check_parameters(
      10, (1100, 1100), 0.1, 1.0, available_bytes=needed - 1
    )
  assert (
    simulation.check_parameters(
      10, (1100, 1100), 0.1, 1.0, available_bytes=needed
    )
    == 1210
  )


def test_sigma_that_overflows_float32_is_refused(rng):
  image = rng.uniform(0, 1, (5, 5))
  limit = simulation.max_sigma(5)
  # The patch energy (10 sigma L)^2 at the limit is float32's largest value.
  assert (10 * limit * 5) ** 2 == pytest.approx(np.finfo(np.float32).max)
  with pytest.raises(simulation.SimulationError, match="overflows float32"):
    simulation.simulate_measurement(image, snr=1e-60)
  sim = simulation.simulate_measurement(image, sigma=limit / 2, seed=0)
  assert np.all(np.isfinite(sim.measurement))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(snr=1.0, sigma=1.0), "exactly one"),
    (dict(), "exactly one"),
    (dict(sigma=0.0), "positive"),
    (dict(snr=-1.0), "positive"),
    (dict(sigma=float("nan")), "positive"),
    (dict(snr=1.0, num_rotations=0), "num_rotations"),
  ],
)
def test_bad_arguments(kwargs, match, rng):
  with pytest.raises(ValueError, match=match):
    simulation.simulate_measurement(rng.uniform(0, 1, (5, 5)), **kwargs)


def test_bad_image():
  with pytest.raises(ValueError, match="square"):
    simulation.simulate_measurement(np.ones((5, 6)), snr=1.0)
  with pytest.raises(ValueError, match="NaN"):
    simulation.simulate_measurement(np.full((5, 5), np.nan), snr=1.0)


def test_continuous_rotations_place_rotated_copies():
  rng = np.random.default_rng(3)
  image = np.zeros((9, 9))
  image[2:7, 3:6] = rng.uniform(0.5, 1.0, (5, 3))
  sim = simulation.simulate_measurement(
    image, sigma=1e-9, seed=4, continuous_rotations=True
  )
  angles = np.asarray(sim.rotations)
  assert angles.dtype == np.float64 and sim.num_rotations == 0
  assert np.all((angles >= 0) & (angles < 2 * np.pi))
  # Not only quarter turns.
  assert np.any(np.abs(np.sin(2 * angles)) > 0.1)
  for (row, col), angle in zip(sim.corners, angles):
    window = sim.measurement[row : row + 9, col : col + 9]
    np.testing.assert_allclose(
      window, simulation.rotate_continuous(image, angle), atol=1e-5
    )
  # A quarter turn is the exact one.
  np.testing.assert_allclose(
    simulation.rotate_continuous(image, np.pi / 2), np.rot90(image), atol=1e-9
  )


def _pairwise_chebyshev(corners):
  """Every pair's Chebyshev distance, by brute force over pairs."""
  return [
    max(abs(int(a[0]) - int(b[0])), abs(int(a[1]) - int(b[1])))
    for a, b in itertools.combinations(corners, 2)
  ]


@pytest.mark.parametrize(
  "separation,density",
  [(1, 0.3), (3, 0.3), (5, 0.3), (7, 0.15), (10, 0.1), (13, 0.05)],
)
def test_min_separation_keeps_every_pair_apart(separation, density, rng):
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(
    image, snr=1.0, seed=separation, density=density, min_separation=separation
  )
  assert len(sim.corners) == sim.requested_copies == round(density * 121)
  distances = _pairwise_chebyshev(sim.corners)
  assert min(distances) >= separation
  if separation < 10:
    # Closer than the paper's 2L: the rule is s, not 2L.
    assert min(distances) < 10


def test_default_separation_is_the_papers_bit_for_bit():
  # Pinned before min_separation existed: corners, rotations and the
  # measurement of seed 11 (numpy's generators keep their streams).
  image = np.arange(25.0).reshape(5, 5) / 25
  sim = simulation.simulate_measurement(image, snr=2.0, seed=11)
  assert sim.corners.tolist() == [
    [6, 6], [40, 25], [30, 30], [36, 1], [24, 7], [20, 47],
    [38, 48], [7, 26], [50, 14], [48, 41], [36, 12], [22, 17],
  ]  # fmt: skip
  assert sim.rotations.tolist() == [2, 1, 1, 3, 2, 2, 2, 1, 3, 0, 1, 0]
  np.testing.assert_allclose(
    sim.measurement.astype(np.float64).sum(), 166.086777598377, rtol=1e-12
  )
  explicit = simulation.simulate_measurement(
    image, snr=2.0, seed=11, min_separation=10
  )
  np.testing.assert_array_equal(explicit.measurement, sim.measurement)
  np.testing.assert_array_equal(explicit.corners, sim.corners)


def test_touching_copies_fit_where_2l_spacing_cannot(rng):
  # Density 0.3 in 55 x 55 asks for 36 copies of 5 x 5: exactly the 6 x 6
  # lattice of spacing 2L, which random placement does not find; touching
  # copies (s = L) leave room for them all.
  image = rng.uniform(0.5, 1, (5, 5))
  paper = simulation.simulate_measurement(image, snr=1.0, seed=0, density=0.3)
  assert paper.requested_copies == 36 and len(paper.corners) < 36
  touching = simulation.simulate_measurement(
    image, sigma=1e-9, seed=0, density=0.3, min_separation=5
  )
  assert len(touching.corners) == 36
  assert min(_pairwise_chebyshev(touching.corners)) >= 5
  for (row, col), k in zip(touching.corners, touching.rotations):
    np.testing.assert_allclose(
      touching.measurement[row : row + 5, col : col + 5],
      np.rot90(image, k),
      atol=1e-5,
    )
  with pytest.raises(simulation.SimulationError, match="min_separation"):
    simulation.check_parameters(5, (55, 55), 0.5, 1.0)
  assert simulation.check_parameters(5, (55, 55), 0.5, 1.0, min_separation=5)


def test_overlapping_copies_add_where_they_overlap(rng):
  image = rng.uniform(0.5, 1, (5, 5))
  sim = simulation.simulate_measurement(
    image, sigma=1e-9, seed=2, density=0.5, size_factor=4, min_separation=2
  )
  assert min(_pairwise_chebyshev(sim.corners)) >= 2
  assert min(_pairwise_chebyshev(sim.corners)) < 5  # some overlap
  clean = np.zeros(sim.measurement.shape)
  for (row, col), k in zip(sim.corners, sim.rotations):
    clean[row : row + 5, col : col + 5] += np.rot90(image, k)
  np.testing.assert_allclose(sim.measurement, clean, atol=1e-5)


@pytest.mark.parametrize(
  "shape,size,separation",
  [((6, 7), 2, 2), ((9, 6), 2, 3), ((7, 7), 3, 1), ((8, 8), 3, 4)],
)
def test_max_copies_at_any_separation_matches_exhaustive_search(
  shape, size, separation
):
  points = list(
    itertools.product(range(shape[0] - size + 1), range(shape[1] - size + 1))
  )
  best = 0

  def grow(chosen, start):
    nonlocal best
    best = max(best, len(chosen))
    for i in range(start, len(points)):
      if len(chosen) + (len(points) - i) <= best:
        return
      p = points[i]
      if all(
        max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= separation for q in chosen
      ):
        grow(chosen + [p], i + 1)

  grow([], 0)
  assert simulation.max_copies(shape, size, separation) == best


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_bad_min_separation_is_refused_in_one_line(bad, rng):
  with pytest.raises(
    simulation.SimulationError, match="min_separation"
  ) as info:
    simulation.simulate_measurement(
      rng.uniform(0, 1, (5, 5)), snr=1.0, min_separation=bad
    )
  assert "\n" not in str(info.value)
