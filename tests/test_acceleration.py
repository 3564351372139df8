"""Anderson and SQUAREM reach plain EM's likelihood in fewer evaluations, ascending."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf.em import acceleration
from mtd_tf.model import patches
from mtd_tf.model import simulation


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


@pytest.mark.parametrize("method", acceleration.METHODS)
def test_linear_map_converges_far_faster_than_plain(method):
  em_map, fixed = _linear_map()
  start = np.zeros_like(fixed)
  plain = start
  for _ in range(100):
    plain, _ = em_map(plain)
  target = em_map(plain)[1]
  accelerate = getattr(acceleration, method)
  result = accelerate(em_map, start, target_log_likelihood=target)
  assert np.all(result.evaluations_to_target < 40)
  assert np.all(em_map(result.estimate)[1] >= target)


def test_anderson_converges_to_the_fixed_point_of_a_linear_map():
  # Two distinct rates: Anderson's least squares with two differences
  # solves the linear map exactly, so it stops long before plain EM would
  # (0.95^k < 1e-10 takes k = 450 plain steps).
  em_map, fixed = _linear_map()
  result = acceleration.anderson(
    em_map, np.zeros_like(fixed), warmup=2, max_evaluations=30
  )
  np.testing.assert_allclose(result.estimate, fixed, atol=1e-10)
  assert result.accepted.any()
  history = result.log_likelihood
  assert np.all(np.diff(history, axis=0) >= 0)


def _plain_path(em_map, start, steps=40):
  """The plain EM iterates F(0..steps): float64 [steps + 1, B, L, L]."""
  path = [start]
  for _ in range(steps):
    path.append(em_map(path[-1])[0])
  return np.array(path)


def _on_path_only(em_map, path, problems=None):
  """em_map whose log p is -inf off the plain EM path (for `problems`).

  Every proposal that leaves the path loses and must be rejected.

  Args:
    em_map: the map.
    path: float64 [steps + 1, B, L, L], `_plain_path`.
    problems: the guarded problems (None: all); the others are plain.
  """

  def guarded(f):
    mapped, loglik = em_map(f)
    distance = np.sqrt(np.sum((path - f[None]) ** 2, axis=(2, 3))).min(axis=0)
    on_path = distance < 1e-12  # [B]
    if problems is not None:
      on_path |= ~np.isin(np.arange(len(f)), problems)
    return mapped, np.where(on_path, loglik, -np.inf)

  return guarded


def test_anderson_keeps_per_problem_histories():
  """One problem's rejections do not slow the other."""
  em_map, fixed = _linear_map(seed=1)
  start = fixed + 1.0
  path = _plain_path(em_map, start)  # [41, B, L, L]

  guarded = _on_path_only(em_map, path, problems=[0])  # problem 1 is free
  result = acceleration.anderson(guarded, start, warmup=0, max_evaluations=15)
  assert not result.accepted[:, 0].any() and result.accepted[:, 1].any()
  # Problem 0: evaluations 1 and 2 are plain, then each rejected proposal
  # is followed by the plain EM point: F(k) at evaluation 2 k.
  np.testing.assert_allclose(result.estimate[0], path[7, 0], atol=1e-12)
  np.testing.assert_allclose(result.estimate[1], fixed[1], atol=1e-9)


def test_squarem_safeguard_falls_back_to_plain_em_when_extrapolation_loses():
  em_map, fixed = _linear_map(seed=1)
  start = fixed + 1.0
  path = _plain_path(em_map, start)  # [41, B, L, L]

  guarded = _on_path_only(em_map, path)
  result = acceleration.squarem(guarded, start, max_evaluations=15)
  cycles = len(result.accepted)
  assert cycles == 5 and not result.accepted.any()
  # Each rejected cycle advances two plain EM steps: F2.
  np.testing.assert_allclose(result.estimate, path[2 * cycles], atol=1e-12)
  assert np.isfinite(result.log_likelihood).all()
  assert np.all(np.diff(result.log_likelihood, axis=0) > 0)


def test_anderson_safeguard_falls_back_to_plain_em_when_extrapolation_loses():
  em_map, fixed = _linear_map(seed=1)
  start = fixed + 1.0
  path = _plain_path(em_map, start)  # [41, B, L, L]

  guarded = _on_path_only(em_map, path)
  result = acceleration.anderson(guarded, start, warmup=0, max_evaluations=15)
  assert result.accepted.shape == (14, 2) and not result.accepted.any()
  # Evaluations 1, 2 are plain (F(0), F(1)); from then on every proposal
  # is rejected and the next evaluation takes the plain EM point.
  np.testing.assert_allclose(result.estimate, path[7], atol=1e-12)
  history = result.log_likelihood
  assert np.isfinite(history).all()
  assert np.all(np.diff(history, axis=0) >= 0)
  # Without the guard the same proposals are accepted.
  free = acceleration.anderson(em_map, start, warmup=0, max_evaluations=15)
  assert free.accepted.any()


# Measurements of one 6 x 6 image, at SNR 1 and 3 with four noise seeds
# each: B = 8 problems, 64 patches each.
SEEDS = (0, 1, 2, 3)
SNRS = (1.0, 3.0)
# Plain EM's iterations to its target (the log-likelihood at F(100),
# computed by evaluation 101).
PLAIN_ITERATIONS = 100


def _problems(seeds=SEEDS, jitter=0.1, start_seed=5):
  """(spectra, sigmas, starts [B, 6, 6], options) of B = 2 len(seeds).

  Each start is the image's mean plus Gaussian noise of sd `jitter`: the
  constant image is a saddle of the likelihood (every rotation of it is
  the same image), and whether an accelerator that extrapolates towards
  the nearest fixed point leaves it within 100 evaluations was decided by
  float rounding (one x86 machine's SQUAREM never did; from it Anderson
  reached plain EM's target on 3-5 of 8 problems). Off the saddle the
  start, not the rounding, decides.
  """
  rng = np.random.default_rng(4)
  size = 6
  truth = rng.uniform(0, 1, (size, size))
  sims = [
    simulation.simulate_measurement(truth, snr=snr, size_factor=8, seed=s)
    for s in seeds
    for snr in SNRS
  ]
  patch_sets = [patches.extract_patches(s.measurement, size) for s in sims]
  data = patches.patch_spectra(patch_sets, 16, tf.float64)
  sigmas = [s.sigma for s in sims]
  inits = np.random.default_rng(start_seed).normal(
    truth.mean(), jitter, (len(sims), size, size)
  )
  options = em.EMOptions(dtype="float64", tolerance=0.0)
  return data, sigmas, inits, options


def _ascends(history):
  """Whether each problem's log-likelihoods (NaN: stopped) never fall."""
  for column in history.T:
    seen = column[np.isfinite(column)]
    if np.any(np.diff(seen) < -1e-9 * np.abs(seen[:-1])):
      return False
  return True


@pytest.fixture(scope="module")
def small_problem():
  return _problems()


@pytest.fixture(scope="module")
def plain_target(small_problem):
  """Plain EM's log-likelihood after PLAIN_ITERATIONS iterations, [B]."""
  data, sigmas, inits, options = small_problem
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 8, [0.0] * 8)
  plain = em.run_prepared(
    data, batch, None, options, max_iterations=PLAIN_ITERATIONS + 1
  )
  assert _ascends(plain.log_likelihood)
  return plain.log_likelihood[PLAIN_ITERATIONS]


@pytest.mark.parametrize("method", acceleration.METHODS)
def test_reaches_plain_em_target_in_fewer_evaluations(
  small_problem, plain_target, method
):
  """On most problems, and in the median, with the ascent property on all.

  An accelerator may end in another basin than plain EM's (its long steps
  pass saddles on either side), so single problems may not reach plain
  EM's log-likelihood. Measured on 12 batches of 8 (noise seeds 0-11,
  start seeds 5 and 6, start sd 0.1 and 0.05; starts perturbed by 1e-13
  changed medians by at most 2): Anderson reached it on 6-8 of 8 with
  median 40-64 evaluations (this batch: 8, 64), the secant method on 6-8
  with median 43-53 (8, 52), SQUAREM on 6-8 with 31-42 (7, 42); plain EM
  takes 101.
  """
  data, sigmas, inits, options = small_problem
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 8, [0.0] * 8)
  em_map = em.prepared_em_map(data, batch, None, options)
  result = getattr(acceleration, method)(
    em_map,
    inits,
    max_evaluations=PLAIN_ITERATIONS,
    target_log_likelihood=plain_target,
  )
  reached = np.isfinite(result.evaluations_to_target)
  evaluations = np.where(reached, result.evaluations_to_target, np.inf)
  assert reached.sum() >= 5 and np.median(evaluations) <= 75, evaluations
  # The safeguard keeps EM's ascent property on every problem, and the
  # returned estimate is the point that reached the target.
  history = result.log_likelihood
  assert _ascends(history), history
  tolerance = 1e-9 * np.abs(plain_target)
  assert np.all(history[-1, reached] >= (plain_target - tolerance)[reached])


@pytest.mark.parametrize("method", acceleration.METHODS)
def test_em_option_accelerates_and_ascends(small_problem, method):
  """EMOptions(acceleration=method) through em.run_prepared runs method.

  Whether 15 evaluations get further than 15 plain iterations varies from
  problem to problem (Anderson's first 8 are plain; measured on 6 x 8
  problems: further on 1-5 of 8), so the speed is
  `test_reaches_plain_em_target_in_fewer_evaluations`'s claim.
  """
  data, sigmas, inits, options = small_problem
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 8, [0.0] * 8)
  fast = em.run_prepared(
    data,
    batch,
    None,
    dataclasses.replace(options, acceleration=method),
    max_iterations=15,
  )
  assert np.all(fast.iterations <= 17)  # a started cycle finishes
  history = fast.log_likelihood  # one row per cycle, then the estimate
  assert _ascends(history), history
  # The same run as the accelerator's on the EM map, which extrapolated
  # (measured: accepted steps on 4-8 of the 8 problems).
  em_map = em.prepared_em_map(data, batch, None, options)
  direct = getattr(acceleration, method)(em_map, inits, max_evaluations=15)
  assert np.all(fast.iterations == direct.evaluations)
  np.testing.assert_allclose(fast.estimate, direct.estimate, rtol=1e-12)
  np.testing.assert_allclose(history, direct.log_likelihood, rtol=1e-12)
  assert direct.accepted.any()


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
  for method in acceleration.METHODS:
    with pytest.raises(ValueError, match="constant gamma"):
      em.uses_acceleration(
        dataclasses.replace(linear, acceleration=method), batch, prior
      )
  with pytest.raises(ValueError, match="acceleration must be"):
    em.EMOptions(acceleration="broyden")


def _recording(monkeypatch, method):
  """Replaces acceleration.<method> by a wrapper that records its calls."""
  calls = []
  original = getattr(acceleration, method)

  def recording(*args, **kwargs):
    calls.append(kwargs["max_evaluations"])
    return original(*args, **kwargs)

  monkeypatch.setattr(acceleration, method, recording)
  return calls


def test_auto_runs_squarem_on_little_data(small_problem, monkeypatch):
  data, sigmas, inits, options = small_problem  # 64 patches of 6 x 6
  batch = em.ProblemBatch(sigmas, inits, ["closed_form"] * 8, [0.0] * 8)
  calls = _recording(monkeypatch, "squarem")
  result = em.run_prepared(
    data,
    batch,
    None,
    dataclasses.replace(options, acceleration="auto"),
    max_iterations=3,
  )
  assert calls == [3] and np.all(result.iterations >= 3)


def test_auto_runs_secant_from_four_patches_per_pixel(monkeypatch):
  assert em.auto_accelerator(4 * 28**2, 28) == "secant"
  assert em.auto_accelerator(4 * 28**2 - 1, 28) == "squarem"
  truth = np.random.default_rng(2).uniform(0, 1, (4, 4))
  sim = simulation.simulate_measurement(truth, snr=2.0, size_factor=16, seed=0)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, 4)], 64, tf.float64
  )
  assert data.num_patches[0] == 256  # 16 per pixel
  batch = em.ProblemBatch(
    [sim.sigma], np.full((1, 4, 4), 0.5), ["closed_form"], [0.0]
  )
  calls = _recording(monkeypatch, "secant")
  options = em.EMOptions(dtype="float64", acceleration="auto")
  em.run_prepared(data, batch, None, options, max_iterations=4)
  assert calls == [4]


def _edge_rates(size=28, high=0.8):
  """Rates that vary smoothly over the frame: high at its edge, 0 inside.

  The structure of the EM map's Jacobian in MTD: pixels far from the
  image's support lose most of their information to the hidden shifts.
  """
  ramp = np.abs(np.arange(size) - (size - 1) / 2) / ((size - 1) / 2)
  edge = np.maximum(ramp[:, None], ramp[None, :])  # 0 at centre, 1 at edge
  return high * edge  # [size, size]


def _diagonal_map(rates, batch=2, seed=0):
  """M(F) = F* + diag(rates) (F - F*), log p(F) = -||F - F*||^2 / 2."""
  fixed = np.random.default_rng(seed).standard_normal((batch,) + rates.shape)

  def em_map(f):
    return (
      fixed + rates * (f - fixed),
      -0.5 * np.sum((f - fixed) ** 2, axis=(1, 2)),
    )

  return em_map, fixed


def test_rates_recover_a_diagonal_linear_maps_rates():
  rates = _edge_rates()
  em_map, fixed = _diagonal_map(rates)
  start = fixed + np.random.default_rng(1).standard_normal(fixed.shape)
  mapped = em_map(start)[0]
  again = em_map(mapped)[0]
  estimate = acceleration._rates(
    mapped - start, (again - mapped) - (mapped - start), 1.0, 0.95
  )
  # A smooth field comes back to within the window's averaging.
  assert np.max(np.abs(estimate - rates)) < 0.15
  assert np.mean(np.abs(estimate - rates)) < 0.03
  # A constant rate comes back exactly.
  em_map, fixed = _diagonal_map(np.full(rates.shape, 0.7))
  mapped = em_map(start)[0]
  again = em_map(mapped)[0]
  np.testing.assert_allclose(
    acceleration._rates(
      mapped - start, (again - mapped) - (mapped - start), 1.0, 0.95
    ),
    0.7,
    atol=1e-12,
  )


def _plain_evaluations(em_map, start, target):
  """EM-map evaluations plain EM takes to reach the target, [B]."""
  reached = np.full(len(start), np.nan)
  current, evaluations = start, 0
  while np.isnan(reached).any():
    evaluations += 1
    current, loglik = em_map(current)
    reached[np.isnan(reached) & (loglik >= target)] = evaluations
  return reached


def test_secant_beats_anderson_where_rates_vary_over_the_frame():
  """Per-pixel rates up to 0.8: plain EM needs 72-73 evaluations to 1e-12.

  Measured on 20 starts (4 fixed points): the secant method 10, Anderson
  19, plain EM 72-73.
  """
  em_map, fixed = _diagonal_map(_edge_rates())
  target = np.full(2, -1e-12)  # ||F - F*||^2 / 2 <= 1e-12
  rng = np.random.default_rng(1)
  starts = [np.zeros_like(fixed)]
  starts += [fixed + rng.standard_normal(fixed.shape) for _ in range(2)]
  for start in starts:
    plain = _plain_evaluations(em_map, start, target)
    runs = {
      method: getattr(acceleration, method)(
        em_map, start, max_evaluations=200, target_log_likelihood=target
      )
      for method in ("secant", "anderson")
    }
    secant, anderson = runs["secant"], runs["anderson"]
    assert np.all(secant.evaluations_to_target <= plain / 5), (secant, plain)
    assert np.all(secant.evaluations_to_target < anderson.evaluations_to_target)
    np.testing.assert_allclose(secant.estimate, fixed, atol=2e-6)
    history = secant.log_likelihood
    assert np.all(np.diff(history, axis=0) >= 0)


def test_secant_waits_for_agreeing_rates_before_its_first_step():
  em_map, fixed = _diagonal_map(_edge_rates())
  start = np.zeros_like(fixed)
  result = acceleration.secant(em_map, start, max_evaluations=6)
  # Evaluations 1-3 give F(0), F(1), F(2): two secants, which agree on a
  # linear map; the first secant step is evaluated at evaluation 4.
  assert not result.accepted[:2].any() and result.accepted[2:].all()
  path = _plain_path(em_map, start, steps=3)
  strict = acceleration.secant(em_map, start, agreement=1e-9, max_evaluations=4)
  # The first two estimates differ by 0.013 on average (each step changes
  # the smoothing's weights), far more than 1e-9.
  assert not strict.accepted.any()
  np.testing.assert_allclose(strict.estimate, path[3], atol=1e-12)


def test_secant_safeguard_falls_back_to_plain_em_when_a_step_loses():
  em_map, fixed = _diagonal_map(_edge_rates(), seed=1)
  start = fixed + 1.0
  path = _plain_path(em_map, start)  # [41, B, L, L]

  guarded = _on_path_only(em_map, path)
  result = acceleration.secant(guarded, start, max_evaluations=15)
  assert not result.accepted.any()
  # Three plain evaluations engage it; each rejected step costs one
  # evaluation, then agreement must be seen again over two plain steps.
  history = result.log_likelihood
  assert np.isfinite(history).all()
  assert np.all(np.diff(history, axis=0) >= 0)
  free = acceleration.secant(em_map, start, max_evaluations=15)
  assert free.accepted.any()
  assert np.all(free.log_likelihood[-1] > history[-1])


def test_secant_rejects_bad_settings():
  em_map, fixed = _diagonal_map(_edge_rates())
  for bad in (dict(smoothing=0.0), dict(max_rate=1.0), dict(agreement=0.0)):
    with pytest.raises(ValueError, match="max_rate"):
      acceleration.secant(em_map, fixed, **bad)
