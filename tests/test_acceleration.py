"""SQUAREM reaches plain EM's likelihood in fewer map evaluations, ascending."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import acceleration
from mtd_tf import em
from mtd_tf import patches
from mtd_tf import simulation


def _linear_map(rate=0.95, size=4, batch=2, seed=0):
  """M(F) = F* + A (F - F*) with log p(F) = -||F - F*||^2 / 2 (analytic)."""
  rng = np.random.default_rng(seed)
  fixed = rng.standard_normal((batch, size, size))
  # A slow direction and a fast one: the regime where EM crawls.
  scales = np.where(rng.uniform(size=(size, size)) < 0.5, rate, 0.3)

  def em_map(f):
    return (
      fixed + scales * (f - fixed),
      -0.5 * np.sum((f - fixed) ** 2, axis=(1, 2)),
    )

  return em_map, fixed


def test_linear_map_converges_far_faster_than_plain():
  em_map, fixed = _linear_map()
  start = np.zeros_like(fixed)
  plain = start
  for _ in range(100):
    plain, _ = em_map(plain)
  target = em_map(plain)[1]
  result = acceleration.squarem(em_map, start, target_log_likelihood=target)
  assert np.all(result.evaluations_to_target < 40)
  assert np.all(em_map(result.estimate)[1] >= target)


def test_safeguard_falls_back_to_plain_em_when_extrapolation_loses():
  em_map, fixed = _linear_map(seed=1)
  start = fixed + 1.0
  path = [start]
  for _ in range(40):
    path.append(em_map(path[-1])[0])
  path = np.array(path)  # [41, B, L, L], the plain EM iterates

  def guarded(f):
    # log p is -inf off the plain EM path: every extrapolation that leaves
    # it loses and must be rejected.
    mapped, loglik = em_map(f)
    distance = np.sqrt(np.sum((path - f[None]) ** 2, axis=(2, 3))).min(axis=0)
    return mapped, np.where(distance < 1e-12, loglik, -np.inf)

  result = acceleration.squarem(guarded, start, max_evaluations=15)
  cycles = len(result.accepted)
  assert cycles == 5 and not result.accepted.any()
  # Each rejected cycle advances two plain EM steps: F2.
  np.testing.assert_allclose(result.estimate, path[2 * cycles], atol=1e-12)
  assert np.isfinite(result.log_likelihood).all()
  assert np.all(np.diff(result.log_likelihood, axis=0) > 0)


@pytest.fixture(scope="module")
def small_problem():
  rng = np.random.default_rng(4)
  size = 6
  truth = rng.uniform(0, 1, (size, size))
  sims = [
    simulation.simulate_measurement(truth, snr=snr, size_factor=8, seed=s)
    for s, snr in enumerate([1.0, 3.0])
  ]
  patch_sets = [patches.extract_patches(s.measurement, size) for s in sims]
  data = patches.patch_spectra(patch_sets, 16, tf.float64)
  sigmas = [s.sigma for s in sims]
  inits = np.stack([np.full((size, size), truth.mean())] * 2)
  options = em.EMOptions(dtype="float64", tolerance=0.0)
  return data, sigmas, inits, options


@pytest.mark.slow
def test_reaches_plain_em_target_in_fewer_evaluations(small_problem):
  data, sigmas, inits, options = small_problem
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 2, [0.0, 0.0])
  plain = em.run_prepared(data, batch, None, options, max_iterations=101)
  target = plain.log_likelihood[100]  # log p(F(100)), [B]
  assert np.all(np.diff(plain.log_likelihood, axis=0) > -1e-9)
  em_map = acceleration.prepared_em_map(data, batch, None, options)
  result = acceleration.squarem(
    em_map, inits, max_evaluations=100, target_log_likelihood=target
  )
  assert np.all(result.evaluations_to_target < 100), (
    result.evaluations_to_target
  )
  # The ascent property: every cycle start is at least as likely as the one
  # before, and the returned estimate reaches the target.
  history = result.log_likelihood
  for b in range(2):
    seen = history[:, b][np.isfinite(history[:, b])]
    assert np.all(np.diff(seen) >= -1e-9 * np.abs(seen[:-1]))
    assert seen[-1] >= target[b] - 1e-9 * abs(target[b])


def test_em_option_accelerates_and_ascends(small_problem):
  """EMOptions(acceleration="squarem") through em.run_prepared."""
  data, sigmas, inits, options = small_problem
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 2, [0.0, 0.0])
  plain = em.run_prepared(data, batch, None, options, max_iterations=31)
  fast = em.run_prepared(
    data,
    batch,
    None,
    dataclasses.replace(options, acceleration="squarem"),
    max_iterations=15,
  )
  assert np.all(fast.iterations <= 17)  # a started cycle finishes
  history = fast.log_likelihood  # one row per cycle, then the estimate
  assert np.all(np.diff(history, axis=0) >= -1e-9 * np.abs(history[:-1]))
  # As many evaluations as plain EM's iterations get further than it.
  evaluations = int(fast.iterations[0])
  assert np.all(history[-1] > plain.log_likelihood[evaluations]), (
    history[-1],
    plain.log_likelihood[evaluations],
  )


def test_auto_acceleration_only_where_it_helps():
  batch = em.ProblemBatch([1.0], np.zeros((1, 3, 3)), ["closed_form"], [0.0])
  gradient = em.ProblemBatch([1.0], np.zeros((1, 3, 3)), ["gradient"], [1.0])
  prior = object()
  auto = em.EMOptions(acceleration="auto")
  assert em.uses_acceleration(auto, batch, None)
  assert not em.uses_acceleration(auto, gradient, prior)
  assert not em.uses_acceleration(em.EMOptions(), batch, None)
  linear = em.EMOptions(acceleration="auto", gamma="linear")
  assert not em.uses_acceleration(linear, batch, prior)
  assert em.uses_acceleration(linear, batch, None)  # gamma unused
  with pytest.raises(ValueError, match="constant gamma"):
    em.uses_acceleration(
      dataclasses.replace(linear, acceleration="squarem"), batch, prior
    )
  with pytest.raises(ValueError, match="acceleration must be"):
    em.EMOptions(acceleration="anderson")
