"""Finite results at any SNR in float32, and run-to-run determinism."""

import numpy as np
import pytest

from mtd_tf import datasets
from mtd_tf import em
from mtd_tf import metrics
from mtd_tf import simulate


@pytest.mark.parametrize("snr", [0.01, 0.1, 1.0, 100.0, 10_000.0])
@pytest.mark.parametrize("m_step", ["closed_form", "gradient",
                                    "preconditioned"])
def test_finite_from_snr_001_to_10000(snr, m_step):
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulate.simulate_measurement(image, snr=snr, seed=4)
  result = em.approximate_em(sim.measurement, 5, sim.sigma,
                             init=rng.uniform(0, 1, (5, 5)), m_step=m_step,
                             max_iterations=30, dtype="float32")
  assert np.all(np.isfinite(result.estimate))
  assert np.all(np.isfinite(result.log_likelihood))


@pytest.mark.parametrize("snr", [0.01, 10_000.0])
def test_finite_for_digits_at_extreme_snr(snr):
  digit = datasets.shipped_digits()["targets"][6]
  sim = simulate.simulate_measurement(digit, snr=snr, seed=5)
  result = em.approximate_em(sim.measurement, 28, sim.sigma,
                             init=datasets.mnist_initialisation(),
                             max_iterations=10)
  assert np.all(np.isfinite(result.estimate))
  assert np.all(np.isfinite(result.log_likelihood))
  if snr > 1000:
    # Near noise-free data from a near start: EM locks on to the digit.
    near = em.approximate_em(sim.measurement, 28, sim.sigma,
                             init=digit + 0.05, max_iterations=10)
    assert metrics.relative_error(digit, near.estimate) < 0.02


def test_same_seed_same_estimate():
  runs = []
  for _ in range(2):
    rng = np.random.default_rng(8)
    image = rng.uniform(0, 1, (6, 6))
    sim = simulate.simulate_measurement(image, snr=2.0, seed=9)
    runs.append(em.approximate_em(sim.measurement, 6, sim.sigma,
                                  init=rng.uniform(0, 1, (6, 6)),
                                  m_step="gradient", learning_rate=0.05,
                                  max_iterations=20))
  np.testing.assert_array_equal(runs[0].estimate, runs[1].estimate)
  np.testing.assert_array_equal(runs[0].log_likelihood,
                                runs[1].log_likelihood)
