"""Tests of mtd_tf.noise against simulator truth."""

import numpy as np
import pytest

from mtd_tf.model import datasets
from mtd_tf.model import noise
from mtd_tf.model import simulation

SNRS = (0.1, 0.5, 1.0, 5.0, 10.0)


def test_pure_noise_is_unbiased():
  rng = np.random.default_rng(3)
  estimates = [
    noise.estimate_sigma(2.5 * rng.standard_normal((308, 308)), 28)
    for _ in range(5)
  ]
  assert abs(np.mean(estimates) / 2.5 - 1) < 0.004


@pytest.mark.parametrize("snr", SNRS)
def test_mnist_within_five_percent(snr):
  digits = datasets.shipped_digits()["targets"]
  for seed in (11, 12, 13):
    sim = simulation.simulate_measurement(
      digits[seed % 10], snr=snr, seed=[seed, 1]
    )
    estimate = noise.estimate_sigma(sim.measurement, 28)
    assert abs(estimate / sim.sigma - 1) < 0.05, (seed, estimate, sim.sigma)


def _gaussian_measurements(snr, seeds):
  rng = np.random.default_rng(0)
  mu = rng.integers(0, 5, (5, 5)).astype(float)
  for seed in seeds:
    image = mu + np.random.default_rng(seed).standard_normal((5, 5))
    yield simulation.simulate_measurement(image, snr=snr, seed=[seed, 2])


@pytest.mark.parametrize("snr", SNRS)
def test_gaussian_unbiased_within_a_few_percent(snr):
  # A 55 x 55 measurement holds about 3000 pixels: even the truly empty
  # pixels, known, give sigma to about 1.4 % (sd), so single draws reach
  # 5 % now and then (0.5 % of them at SNR 1-10, see mtd_tf/noise.py).
  errors = [
    noise.estimate_sigma(sim.measurement, 5) / sim.sigma - 1
    for sim in _gaussian_measurements(snr, range(21, 41))
  ]
  assert abs(np.mean(errors)) < 0.015, np.mean(errors)
  assert np.std(errors) < 0.022, np.std(errors)
  assert np.max(np.abs(errors)) < 0.065, np.max(np.abs(errors))


def test_windows_leave_out_faint_copies_the_blocks_keep():
  # SNR 1: a copy's corner in a block is below the blocks' clipping, so
  # stage 1 alone is biased up; the windows test the whole copy at once.
  window, block = [], []
  for sim in _gaussian_measurements(1.0, range(100, 160)):
    window.append(noise.estimate_sigma(sim.measurement, 5) / sim.sigma - 1)
    block.append(noise.block_sigma(sim.measurement, 5) / sim.sigma - 1)
  assert np.mean(block) > 0.012
  assert abs(np.mean(window)) < 0.5 * np.mean(block)


@pytest.mark.parametrize("w", [2, 3, 4, 5])
def test_window_statistics_against_brute_force(w):
  x = np.random.default_rng(w).standard_normal((9, 12))
  energy, high, low = noise._window_statistics(x, w)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      corners = [
        (a, b)
        for a in range(max(0, i - w + 1), min(i, x.shape[0] - w) + 1)
        for b in range(max(0, j - w + 1), min(j, x.shape[1] - w) + 1)
      ]
      squares = [np.sum(x[a : a + w, b : b + w] ** 2) for a, b in corners]
      sums = [np.sum(x[a : a + w, b : b + w]) for a, b in corners]
      np.testing.assert_allclose(energy[i, j], max(squares) - x[i, j] ** 2)
      np.testing.assert_allclose(high[i, j], max(sums) - x[i, j])
      np.testing.assert_allclose(low[i, j], min(sums) - x[i, j])


def test_signal_blocks_are_clipped():
  # Without clipping, SNR 10 at density 0.1 would inflate sigma^2 by 2x.
  digit = datasets.shipped_digits()["targets"][3]
  sim = simulation.simulate_measurement(digit, snr=10.0, seed=5)
  plain = np.sqrt(np.mean(sim.measurement.astype(np.float64) ** 2))
  assert plain / sim.sigma > 1.2
  assert abs(noise.estimate_sigma(sim.measurement, 28) / sim.sigma - 1) < 0.03


def test_list_of_micrographs():
  rng = np.random.default_rng(1)
  parts = [0.7 * rng.standard_normal((56, 56)) for _ in range(4)]
  assert abs(noise.estimate_sigma(parts, 28) / 0.7 - 1) < 0.03


@pytest.mark.parametrize(
  "bad", [np.zeros((3, 3)), np.full((28, 28), np.nan), np.zeros((28, 28))]
)
def test_bad_input_raises(bad):
  with pytest.raises(noise.NoiseEstimateError):
    noise.estimate_sigma(bad, 28)


def _exact_window_sigma(measurement, w, quantile, start):
  """The kept-set iteration pixel by pixel, no binning (reference)."""
  from scipy import special
  from scipy import stats

  energy, high, low = noise._window_statistics(measurement, w)
  n = w * w - 1
  e_lim = stats.chi2.ppf(quantile, n)
  s_lim = special.ndtri(0.5 + 0.5 * quantile) * np.sqrt(n)
  variance, kept = start**2, None
  for _ in range(50):
    sd = np.sqrt(variance)
    now = (energy < e_lim * variance) & (high < s_lim * sd)
    now &= low > -s_lim * sd
    if kept is not None and np.array_equal(now, kept):
      break
    kept = now
    variance = np.mean(measurement[kept] ** 2)
  return np.sqrt(variance)


@pytest.mark.parametrize("snr", [1.0, 10.0])
def test_binned_thresholds_match_the_pixel_by_pixel_iteration(snr):
  for sim in _gaussian_measurements(snr, range(50, 55)):
    m = sim.measurement
    exact = _exact_window_sigma(m, 3, 0.99, noise.block_sigma(m, 5))
    binned = noise.estimate_sigma(m, 5, window_size=3, quantile=0.99)
    assert abs(binned / exact - 1) < 2e-4


def test_strong_signal_uses_smaller_windows(monkeypatch):
  # SNR 10 at density 0.1: the copies hold about as much energy as the
  # noise, so the windows are a pixel smaller and the quantile higher.
  seen = []
  window_statistics = noise._window_statistics
  monkeypatch.setattr(
    noise,
    "_window_statistics",
    lambda image, w: seen.append(w) or window_statistics(image, w),
  )
  strong, weak = (
    next(_gaussian_measurements(snr, [30])).measurement for snr in (10.0, 1.0)
  )
  noise.estimate_sigma(strong, 5)
  noise.estimate_sigma(weak, 5)
  noise.estimate_sigma(strong, 5, window_size=4)
  assert seen == [3, 4, 4]


@pytest.mark.parametrize(
  "kwargs", [{"window_size": 1}, {"quantile": 1.0}, {"quantile": 0.0}]
)
def test_bad_options_raise(kwargs):
  with pytest.raises(noise.NoiseEstimateError, match="must be"):
    noise.estimate_sigma(np.ones((56, 56)), 28, **kwargs)


def _mnist(snr, seed, digit=None):
  """An MNIST measurement; one digit (one sigma per SNR) when given."""
  digits = datasets.shipped_digits()["targets"]
  return simulation.simulate_measurement(
    digits[seed % 10 if digit is None else digit], snr=snr, seed=[seed, 7]
  )


@pytest.mark.parametrize("snr", [0.1, 1.0, 10.0])
def test_background_is_the_level_of_the_empty_pixels(snr):
  sim = _mnist(snr, 3)
  m = sim.measurement.astype(np.float64)
  clean = noise.estimate_noise(m, 28)
  # Zero-mean data: a level within its statistical error of 0, and the
  # sigma of estimate_sigma.
  sd = clean.sigma / np.sqrt(clean.empty_pixels)
  assert abs(clean.background) < 5 * sd, (clean, sd)
  assert clean.sigma == pytest.approx(noise.estimate_sigma(m, 28), rel=2e-3)
  assert abs(clean.sigma / sim.sigma - 1) < 0.02
  # A background level moves the level by it and leaves sigma as it was;
  # units (a scale) scale both: the estimator is equivariant.
  for scale, level in ((1.0, 1.0), (1.0, -7.5), (100.0, 3e4)):
    found = noise.estimate_noise(scale * m + level, 28)
    assert found.background == pytest.approx(
      scale * clean.background + level, abs=1e-6 * (scale + abs(level))
    )
    assert found.sigma == pytest.approx(scale * clean.sigma, rel=1e-6)
    assert found.empty_pixels == clean.empty_pixels


def test_background_is_not_the_plain_mean():
  # The copies have positive mass: the plain mean sits above the level of
  # the empty pixels; the estimate does not.
  sim = _mnist(10.0, 4)
  m = sim.measurement.astype(np.float64) + 2.0
  found = noise.estimate_noise(m, 28)
  sd = found.sigma / np.sqrt(found.empty_pixels)
  assert abs(found.background - 2.0) < 5 * sd
  assert np.mean(m) - 2.0 > 20 * sd


def test_constant_and_noise_free_micrographs_are_refused():
  with pytest.raises(noise.NoiseEstimateError, match="constant .every pixel"):
    noise.estimate_noise(np.full((56, 56), 5.0), 28)
  with pytest.raises(noise.NoiseEstimateError, match="constant"):
    noise.estimate_noise(np.zeros((56, 56)), 28)
  copies = np.zeros((56, 56))
  copies[3:20, 5:25] = 1.0
  with pytest.raises(noise.NoiseEstimateError, match="no noise"):
    noise.estimate_noise(copies + 4.0, 28)


def test_large_micrographs_are_measured_on_their_centre():
  rng = np.random.default_rng(5)
  big = 3.0 + 0.5 * rng.standard_normal((600, 600))
  found = noise.estimate_noise(big, 28, max_pixels=200 * 200)
  assert found.empty_pixels <= 200 * 200
  assert found.background == pytest.approx(3.0, abs=0.01)
  assert found.sigma == pytest.approx(0.5, rel=0.02)
  whole = noise.estimate_noise(big, 28, max_pixels=None)
  assert whole.empty_pixels > 200 * 200


def test_scale_outliers_keep_one_sigma_and_name_other_scales():
  # Files of one sigma (the estimator's spread, SNR 0.1-10) agree.
  levels = [
    noise.estimate_noise(_mnist(snr, s, digit=5).measurement, 28)
    for snr in (0.1, 1.0, 10.0)
    for s in range(4)
  ]
  for snr_files in (levels[:4], levels[4:8], levels[8:]):
    sigmas = [x.sigma for x in snr_files]
    counts = [x.empty_pixels for x in snr_files]
    assert noise.scale_outliers(sigmas, counts)[0] == []
  a, b = levels[4], levels[5]
  # One file 100 x the other: named against the median file.
  assert noise.scale_outliers(
    [a.sigma, 100 * b.sigma], [a.empty_pixels, b.empty_pixels]
  ) == ([1], 0)
  assert noise.scale_outliers(
    [100 * a.sigma, b.sigma], [a.empty_pixels, b.empty_pixels]
  ) == ([0], 1)
  off, median = noise.scale_outliers(
    [a.sigma, 100 * b.sigma, b.sigma, 0.01 * a.sigma], [a.empty_pixels] * 4
  )
  assert off == [1, 3] and median in (0, 2)
  # Recorded sigmas have no spread: 5 % apart is another scale.
  assert noise.scale_outliers([1.0, 1.0, 1.06])[0] == [2]
  assert noise.scale_outliers([1.0, 1.0, 1.04])[0] == []
  # Small files measure sigma loosely: the limit widens with the spread.
  assert noise.scale_outliers([1.0, 1.3], [300, 300])[0] == []
  assert noise.scale_outliers([1.0, 3.0], [300, 300])[0] == [1]
