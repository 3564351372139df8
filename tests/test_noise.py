"""Tests of mtd_tf.noise against simulator truth."""

import numpy as np
import pytest

from mtd_tf import datasets
from mtd_tf import noise
from mtd_tf import simulation

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


@pytest.mark.parametrize("snr", SNRS)
def test_gaussian_within_five_percent_on_average(snr):
  # A 55 x 55 measurement holds about 3000 pixels: the estimate's own
  # spread is about 1.5 %, so single draws are checked more loosely.
  rng = np.random.default_rng(0)
  mu = rng.integers(0, 5, (5, 5)).astype(float)
  errors = []
  for seed in range(21, 29):
    image = mu + np.random.default_rng(seed).standard_normal((5, 5))
    sim = simulation.simulate_measurement(image, snr=snr, seed=[seed, 2])
    errors.append(noise.estimate_sigma(sim.measurement, 5) / sim.sigma - 1)
  assert abs(np.mean(errors)) < 0.035
  assert np.max(np.abs(errors)) < 0.08


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
