"""Tests of mtd_tf.recovery: selection, the log-prior line integral, gauge."""

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf import recovery
from mtd_tf.model import metrics
from mtd_tf.model import simulation
from mtd_tf.recovery import recommended


def test_log_prior_differences_exact_for_a_gaussian():
  rng = np.random.default_rng(0)
  mu = rng.uniform(0, 1, (5, 5))
  prior = priors.GaussianPrior(mu)
  images = rng.normal(size=(3, 5, 5))
  reference = rng.normal(size=(3, 5, 5))
  got = recovery.log_prior_differences(prior, images, reference, t=0.01)
  want = -0.5 * (
    np.sum((images - mu) ** 2, axis=(1, 2))
    - np.sum((reference - mu) ** 2, axis=(1, 2))
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def gaussian_problem():
  rng = np.random.default_rng(7)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=10, seed=7)
  return image, sim


def test_selection_picks_the_start_with_the_higher_objective(gaussian_problem):
  image, sim = gaussian_problem
  rng = np.random.default_rng(8)
  options = em.EMOptions(max_iterations=30, dtype="float64")
  found = recovery.multistart_em(
    [sim.measurement],
    5,
    [sim.sigma],
    inits=rng.uniform(0, 1, (1, 5, 5)),
    m_step="closed_form",
    options=options,
    recovery=recovery.RecoveryOptions(num_windows=3),
  )
  assert len(found.groups) == 4 and found.problem_iterations > 0
  objective = found.objective
  assert int(found.winner[0]) == int(np.nanargmax(objective))
  assert metrics.relative_error(image, found.estimate[0]) < 0.2


def test_pruning_rebatches_and_keeps_the_best(gaussian_problem):
  _, sim = gaussian_problem
  rng = np.random.default_rng(9)
  options = em.EMOptions(max_iterations=20, dtype="float64", tolerance=0.0)
  found = recovery.multistart_em(
    [sim.measurement, sim.measurement],
    5,
    [sim.sigma] * 2,
    inits=rng.uniform(0, 1, (2, 5, 5)),
    m_step="closed_form",
    options=options,
    recovery=recovery.RecoveryOptions(num_windows=3, prune_at=5, keep=1),
  )
  # 8 starts x 5 iterations, then 2 x 15.
  assert found.problem_iterations == 8 * 5 + 2 * 15
  assert np.sum(np.isfinite(found.objective)) == 2
  assert np.all(found.iterations == 20)


def test_gauge_follows_the_prior_convention(gaussian_problem):
  _, sim = gaussian_problem

  class Centring(priors.ScorePrior):
    pass

  prior = Centring(lambda x, t: tf.zeros_like(x), 5)
  prior.convention = {"centre_of_mass": [2.0, 2.0]}
  options = em.EMOptions(max_iterations=5, dtype="float64")
  kwargs = dict(
    inits=np.full((1, 5, 5), 0.5),
    m_step="preconditioned",
    options=options,
    prior=prior,
  )
  on = recovery.multistart_em([sim.measurement], 5, [sim.sigma], **kwargs)
  off = recovery.multistart_em(
    [sim.measurement],
    5,
    [sim.sigma],
    recovery=recovery.RecoveryOptions(gauge=False),
    **kwargs,
  )
  np.testing.assert_allclose(off.estimate, off.raw_estimate)
  from mtd_tf.recovery import gauge

  np.testing.assert_allclose(
    on.estimate, gauge.centre(on.raw_estimate, (2.0, 2.0))
  )
  mixed = recovery.multistart_em(
    [sim.measurement],
    5,
    [sim.sigma],
    recovery=recovery.RecoveryOptions(position_sd=gauge.POSITION_SD),
    **kwargs,
  )
  np.testing.assert_allclose(
    mixed.estimate,
    gauge.centre(mixed.raw_estimate, (2.0, 2.0), position_sd=gauge.POSITION_SD),
  )
  np.testing.assert_allclose(mixed.position_sd, [gauge.POSITION_SD])
  # With a factor: the winner's centre-of-mass standard error, from the
  # copies the measurement holds, times it.
  scaled = recovery.multistart_em(
    [sim.measurement],
    5,
    [sim.sigma],
    recovery=recovery.RecoveryOptions(position_sd_factor=1.5),
    **kwargs,
  )
  raw = scaled.raw_estimate
  copies = gauge.copies_in_data(np.sum(sim.measurement, dtype=float), raw[0])
  expected = 1.5 * gauge.centre_of_mass_sd(raw, scaled.sigma, copies)
  np.testing.assert_allclose(scaled.position_sd, expected)
  assert scaled.position_sd[0] > 0
  np.testing.assert_allclose(
    scaled.estimate, gauge.centre(raw, (2.0, 2.0), position_sd=expected)
  )
  np.testing.assert_allclose(on.position_sd, [0.0])


def test_bad_options():
  with pytest.raises(ValueError, match="selection"):
    recovery.RecoveryOptions(selection="best")
  with pytest.raises(ValueError, match="keep"):
    recovery.RecoveryOptions(keep=0)
  with pytest.raises(ValueError, match="grids_per_axis"):
    recovery.RecoveryOptions(grids_per_axis=0)
  for name in ("position_sd", "half_turn_sd", "position_sd_factor"):
    with pytest.raises(ValueError, match=name):
      recovery.RecoveryOptions(**{name: -0.1})
  with pytest.raises(ValueError, match="composite_weight"):
    recovery.RecoveryOptions(composite_weight=0.0)


def test_recommended_method_returns_the_gauge_with_its_uncertainty():
  from mtd_tf import em
  from mtd_tf.recovery import gauge

  _, options = recovery.recommended_options(em.EMOptions(), 28)
  assert options.position_sd_factor == gauge.POSITION_SD_FACTOR > 0
  assert options.half_turn_sd == gauge.HALF_TURN_SD > 0
  assert options.grids_per_axis == 2 and options.composite_weight == 1.0
  _, small = recovery.recommended_options(em.EMOptions(), 5)
  assert small.grids_per_axis == 5
  assert small.composite_weight == recovery.RECOMMENDED_DENSE_GRID_WEIGHT < 1
  # Quarter turns unless the copies are turned by any angle.
  assert options.orientation_angles == 0
  _, turned = recovery.recommended_options(em.EMOptions(), 28, continuous=True)
  assert turned.orientation_angles == gauge.ORIENTATION_ANGLES > 4
  with pytest.raises(ValueError, match="orientation_angles"):
    recovery.RecoveryOptions(orientation_angles=-1)


def test_grid_weight_counts_the_grids_times_the_composite_weight():
  assert recommended._grid_weight(1, 0.6) == 1.0  # pylint: disable=protected-access
  assert recommended._grid_weight(2, 1.0) == 4.0  # pylint: disable=protected-access
  assert recommended._grid_weight(5, 0.6) == pytest.approx(15.0)  # pylint: disable=protected-access


def test_offset_grids_lower_the_error_at_low_snr():
  # The composite likelihood of four grids sees most copies whole (eq. 9's
  # grid cuts them into up to four pieces): lower error with the same prior.
  rng = np.random.default_rng(21)
  mu = rng.integers(0, 5, (5, 5)).astype(np.float64)
  prior = priors.GaussianPrior(mu)
  targets = mu + rng.normal(size=(6, 5, 5))
  sims = [
    simulation.simulate_measurement(t, snr=1, seed=30 + i)
    for i, t in enumerate(targets)
  ]
  options = em.EMOptions(max_iterations=30, dtype="float64", tolerance=0.0)

  def mean_error(per_axis):
    found = recovery.multistart_em(
      [s.measurement for s in sims],
      5,
      [s.sigma for s in sims],
      inits=rng.uniform(0, 4, (6, 5, 5)),
      prior=prior,
      options=options,
      recovery=recovery.RecoveryOptions(num_windows=1, grids_per_axis=per_axis),
    )
    return np.mean(
      [metrics.relative_error(t, e) for t, e in zip(targets, found.estimate)]
    )

  one, four = mean_error(1), mean_error(2)
  assert four < 0.95 * one, (one, four)


def test_composite_weight_scales_the_prior_against_the_grids():
  # With the exact N(mu, I) prior the MAP moves from the data's answer
  # towards mu as the prior's weight grows: a tiny composite_weight leaves
  # the grids' estimate, a huge one returns mu.
  rng = np.random.default_rng(5)
  mu = rng.integers(0, 5, (5, 5)).astype(np.float64)
  target = mu + rng.normal(size=(5, 5))
  sim = simulation.simulate_measurement(target, snr=5, seed=8)
  options = em.EMOptions(max_iterations=30, dtype="float64", tolerance=0.0)

  def estimate(weight):
    return recovery.multistart_em(
      [sim.measurement],
      5,
      [sim.sigma],
      inits=target[None],
      prior=priors.GaussianPrior(mu),
      options=options,
      recovery=recovery.RecoveryOptions(
        num_windows=0, grids_per_axis=5, composite_weight=weight
      ),
    ).estimate[0]

  small, large = estimate(1e-4), estimate(1e4)
  assert np.linalg.norm(large - mu) < 0.01 * np.linalg.norm(mu)
  assert metrics.relative_error(target, small) < 0.3
  assert np.linalg.norm(small - mu) > 0.5 * np.linalg.norm(target - mu)
