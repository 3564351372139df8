"""Tests of mtd_tf/sde.py: the VP-SDE, eq. (5)-(8), and the ODE sampler."""

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf.priors import sde as sde_lib

SDE = sde_lib.VPSDE()


def _closed_forms(t):
  big_b = 0.1 * t + 9.95 * t**2
  return np.exp(-big_b / 2), np.sqrt(1 - np.exp(-big_b)), big_b


@pytest.mark.parametrize("t", [0.0, 1e-5, 0.01, 0.0925, 0.5, 1.0])
def test_schedule_closed_forms(t):
  alpha, sigma, big_b = _closed_forms(t)
  np.testing.assert_allclose(SDE.beta(t), 0.1 + 19.9 * t, rtol=1e-6)
  np.testing.assert_allclose(
    SDE.integrated_beta(t), big_b, rtol=1e-6, atol=1e-12
  )
  np.testing.assert_allclose(SDE.alpha(t), alpha, rtol=1e-6)
  np.testing.assert_allclose(SDE.sigma(t), sigma, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(
    SDE.variance(t) + SDE.alpha(t) ** 2, 1.0, rtol=1e-6
  )


def test_sigma_at_reference_times():
  # The two times the MNIST quality test uses.
  assert abs(float(SDE.sigma(0.0925)) - 0.3) < 0.002
  assert abs(float(SDE.sigma(0.01)) - 0.0447) < 0.001


def test_marginal_mean_and_variance():
  x0 = tf.constant(np.random.default_rng(0).normal(size=(3, 4, 4)), tf.float32)
  t = tf.constant([0.01, 0.3, 0.9])
  dist = SDE.marginal(x0, t)
  assert dist.batch_shape == [3]
  assert dist.event_shape == [4, 4]
  alpha, sigma, _ = _closed_forms(t.numpy())
  np.testing.assert_allclose(
    dist.mean(), alpha[:, None, None] * x0.numpy(), rtol=1e-5
  )
  np.testing.assert_allclose(
    dist.stddev(), np.broadcast_to(sigma[:, None, None], (3, 4, 4)), rtol=1e-5
  )
  # Monte-Carlo check of the kernel by sampling.
  samples = dist.sample(20000, seed=1).numpy()
  np.testing.assert_allclose(samples.mean(0), dist.mean(), atol=0.03)
  np.testing.assert_allclose(samples.std(0), dist.stddev(), rtol=0.03)


def _diffused_gaussian_score(mu):
  """Exact marginal score of data N(mu, I): N(alpha mu, I) at every t."""
  mu = tf.constant(mu, tf.float32)

  def score(x, t):
    return -(x - SDE.alpha(t)[:, None, None] * mu)

  return score


def test_dsm_loss_of_exact_score_hits_analytic_minimum():
  # For data N(mu, I) and the exact marginal score, the DSM integrand of
  # eq. (7) with lambda = sigma_t^2 equals d alpha(t)^2, so the loss is
  # d E_t[exp(-B(t))], t ~ U[eps, 1].
  rng = np.random.default_rng(3)
  mu = rng.integers(0, 5, size=(5, 5)).astype(np.float32)
  x0 = (mu + rng.standard_normal((20000, 5, 5))).astype(np.float32)
  exact = _diffused_gaussian_score(mu)
  loss = float(sde_lib.denoising_score_matching_loss(exact, x0, seed=[1, 2]))
  ts = np.linspace(1e-5, 1.0, 100001)
  analytic = 25 * np.trapezoid(np.exp(-(0.1 * ts + 9.95 * ts**2)), ts)
  analytic /= 1.0 - 1e-5
  assert abs(loss - analytic) < 0.05 * analytic, (loss, analytic)
  # A wrong score (undiffused mean, or a shifted mean) does worse.
  for wrong in (lambda x, t: -(x - mu), lambda x, t: exact(x, t) + 0.3):
    wrong_loss = float(
      sde_lib.denoising_score_matching_loss(wrong, x0, seed=[1, 2])
    )
    assert wrong_loss > loss + 0.5, (wrong_loss, loss)


def _small_mlp(seed, dim=6, dtype=tf.float64):
  rng = np.random.default_rng(seed)
  w1 = tf.constant(rng.normal(size=(dim, 16)) / 2, dtype)
  w2 = tf.constant(rng.normal(size=(16, dim)) / 4, dtype)

  def score(x, t):
    del t
    flat = tf.reshape(x, [tf.shape(x)[0], -1])
    return tf.reshape(tf.nn.softplus(flat @ w1) @ w2, tf.shape(x))

  return score


def test_ism_loss_exact_trace_matches_numeric_jacobian():
  score = _small_mlp(0)
  x = np.random.default_rng(1).normal(size=(4, 2, 3))
  loss = float(sde_lib.implicit_score_matching_loss(score, tf.constant(x)))
  # Brute force: central differences in float64.
  h = 1e-6
  expected = 0.0
  for b in range(4):
    xb = x[b : b + 1]
    s = score(tf.constant(xb), None).numpy().ravel()
    trace = 0.0
    for i in range(6):
      e = np.zeros(6)
      e[i] = h
      plus = score(tf.constant(xb + e.reshape(1, 2, 3)), None).numpy().ravel()
      minus = score(tf.constant(xb - e.reshape(1, 2, 3)), None).numpy().ravel()
      trace += (plus[i] - minus[i]) / (2 * h)
    expected += 0.5 * np.sum(s**2) + trace
  expected /= 4
  np.testing.assert_allclose(loss, expected, rtol=1e-7)


def test_ism_loss_minimised_by_true_gaussian_score():
  rng = np.random.default_rng(4)
  mu = rng.integers(0, 5, size=(5, 5)).astype(np.float32)
  x = tf.constant((mu + rng.standard_normal((20000, 5, 5))).astype(np.float32))
  true_loss = float(
    sde_lib.implicit_score_matching_loss(lambda a, t: -(a - mu), x)
  )
  assert abs(true_loss - (-12.5)) < 0.3  # -d/2 for d = 25
  delta = rng.normal(size=(5, 5)).astype(np.float32) * 0.5
  for c, shift in ((1.0, delta), (0.8, 0.0), (1.2, 0.0), (0.9, delta)):
    loss = float(
      sde_lib.implicit_score_matching_loss(
        lambda a, t, c=c, shift=shift: -c * (a - mu - shift), x
      )
    )
    assert loss > true_loss + 0.1, (c, loss, true_loss)


def test_probability_flow_sampler_recovers_gaussian():
  rng = np.random.default_rng(5)
  mu = rng.integers(0, 5, size=(5, 5)).astype(np.float32)
  exact = _diffused_gaussian_score(mu)

  def guarded(x, t):
    # NaN if the solver ever asks for t <= 0 (DormandPrince evaluates past
    # its final time; a score divided by sigma_t would break there).
    return exact(x, t) + 0.0 * tf.math.log(t)[:, None, None]

  samples, evaluations = sde_lib.probability_flow_sample(
    guarded, [2000, 5, 5], eps=1e-3, seed=3
  )
  samples = samples.numpy()
  assert np.all(np.isfinite(samples))
  assert int(evaluations) > 10
  np.testing.assert_allclose(samples.mean(0), mu, atol=0.1)
  np.testing.assert_allclose(samples.var(0), 1.0, atol=0.15)
  # Pooled over pixels the statistics are tighter.
  assert abs(np.mean(samples - mu)) < 0.03
  assert abs(np.var(samples - mu) - 1.0) < 0.05


def test_std_and_variance_and_their_alias():
  t = tf.constant([1e-5, 0.01, 0.5, 1.0])
  np.testing.assert_allclose(SDE.std(t) ** 2, SDE.variance(t), rtol=1e-5)
  np.testing.assert_array_equal(SDE.std(t), SDE.sigma(t))
  # float64 times stay float64 (the M-step's prior weight uses them).
  assert SDE.variance(tf.constant(0.01, tf.float64)).dtype == tf.float64


def test_drift_diffusion_and_probability_flow_drift():
  rng = np.random.default_rng(2)
  x = tf.constant(rng.normal(size=(3, 2, 2)), tf.float32)
  t = tf.constant([0.0, 0.25, 1.0])
  drift, diffusion = SDE.drift_and_diffusion(x, t)
  beta = 0.1 + 19.9 * t.numpy()
  np.testing.assert_allclose(
    drift, -0.5 * beta[:, None, None] * x.numpy(), rtol=1e-6
  )
  np.testing.assert_allclose(diffusion, np.sqrt(beta), rtol=1e-6)
  score = lambda a, b: -2.0 * a + b[:, None, None]
  flow = SDE.probability_flow_drift(score, x, t).numpy()
  expected = -0.5 * beta[:, None, None] * (x.numpy() + score(x, t).numpy())
  np.testing.assert_allclose(flow, expected, rtol=1e-5, atol=1e-6)


def test_prior_distribution_is_standard_normal():
  dist = SDE.prior_distribution([4, 3, 3])
  assert dist.batch_shape == [4] and dist.event_shape == [3, 3]
  np.testing.assert_array_equal(dist.mean(), np.zeros((4, 3, 3)))
  np.testing.assert_array_equal(dist.stddev(), np.ones((4, 3, 3)))
  # The marginal at t = 1 is N(0, I) up to alpha(1) ~ 0.007.
  kernel = SDE.marginal(tf.ones([4, 3, 3]), tf.ones([4]))
  np.testing.assert_allclose(kernel.stddev(), dist.stddev(), atol=1e-4)
  np.testing.assert_allclose(kernel.mean(), dist.mean(), atol=0.01)


def test_dsm_loss_draws_x_t_from_the_marginal():
  # Recomputed by hand from SDE.marginal with the loss's seeds.
  rng = np.random.default_rng(6)
  x0 = tf.constant(rng.normal(size=(5, 3, 3)), tf.float32)
  score = lambda a, b: -1.5 * a
  seed = tf.constant([4, 9])
  loss = float(sde_lib.denoising_score_matching_loss(score, x0, seed=seed))
  seeds = tf.random.experimental.stateless_split(seed, 2)
  t = tf.random.stateless_uniform([5], seeds[0], sde_lib.DEFAULT_EPS, 1.0)
  kernel = SDE.marginal(x0, t)
  xt = kernel.sample(seed=seeds[1]).numpy()
  target = -(xt - kernel.mean().numpy()) / kernel.variance().numpy()
  sigma2 = SDE.variance(t).numpy()[:, None, None]
  expected = np.mean(np.sum(sigma2 * (score(xt, t) - target) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_no_vp_sde_formula_outside_sde_py():
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  repo = pathlib.Path(__file__).resolve().parents[1]
  pattern = re.compile(r"expm1|9\.95|beta_min \* t|beta_max - .*beta_min\) \*")
  offenders = [
    str(p.relative_to(repo))
    for folder in ("mtd_tf", "trainers")
    for p in sorted((repo / folder).glob("*.py"))
    if p.name != "sde.py" and pattern.search(p.read_text())
  ]
  assert not offenders, offenders
