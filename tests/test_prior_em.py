"""Algorithm 1 with a prior: the exact Gaussian prior makes EM a MAP solver."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.em import estep
from mtd_tf.model import patches
from mtd_tf.model import rotations
from mtd_tf.model import simulation

# MAP-EM run to convergence.
_MAP = em.EMOptions(dtype="float64", max_iterations=2000, tolerance=1e-11)


@pytest.fixture(scope="module")
def gaussian_problem():
  rng = np.random.default_rng(0)
  mu = rng.integers(0, 5, (5, 5)).astype(float)
  image = mu + rng.standard_normal((5, 5))
  sim = simulation.simulate_measurement(image, snr=1.0, seed=0)
  return mu, image, sim, rng.uniform(0, 1, (5, 5))


def _log_posterior_gradient(sim, estimate, mu, gamma):
  """grad_F [log p(M | F) + gamma log N(F; mu, I)] through the E-step."""
  rot = rotations.rotation_set(5, 4)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, 5)], 64, tf.float64
  )
  step = estep.make_estep(rot, jit_compile=False)
  images = tf.constant(estimate[None])
  with tf.GradientTape() as tape:
    tape.watch(images)
    ll = step(
      images,
      data.spectra,
      data.squared_norms,
      data.mask,
      tf.constant([sim.sigma], tf.float64),
    ).log_likelihood[0]
    objective = ll - 0.5 * gamma * tf.reduce_sum((images - mu) ** 2)
  return tape.gradient(objective, images)[0].numpy()


def test_closed_form_em_with_gaussian_prior_reaches_the_map(gaussian_problem):
  mu, _, sim, init = gaussian_problem
  prior = priors.GaussianPrior(mu)
  result = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, prior=prior, options=_MAP
  )
  assert result.iterations < 2000
  # A fixed point of MAP-EM is a stationary point of the log posterior.
  at_map = _log_posterior_gradient(sim, result.estimate, mu, 1.0)
  at_init = _log_posterior_gradient(sim, init, mu, 1.0)
  assert np.linalg.norm(at_map) < 1e-6 * np.linalg.norm(at_init)


@pytest.mark.slow
def test_gradient_m_step_with_exact_prior_converges_to_the_same_map(
  gaussian_problem,
):
  mu, _, sim, init = gaussian_problem
  prior = priors.GaussianPrior(mu)
  exact = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, prior=prior, options=_MAP
  )
  stepped = em.approximate_em(
    sim.measurement,
    5,
    sim.sigma,
    init=init,
    prior=prior,
    options=dataclasses.replace(
      _MAP, m_step="gradient", learning_rate=0.1, gradient_steps=50
    ),
  )
  np.testing.assert_allclose(stepped.estimate, exact.estimate, atol=1e-6)


def test_prior_lowers_error_at_low_snr(gaussian_problem):
  mu, image, sim, init = gaussian_problem
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top

  with_prior = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, prior=priors.GaussianPrior(mu)
  )
  without = em.approximate_em(sim.measurement, 5, sim.sigma, init=init)
  assert metrics.relative_error(
    image, with_prior.estimate
  ) < metrics.relative_error(image, without.estimate)


@pytest.mark.slow  # ~5 s on the shared 2-core machine.
def test_batched_with_prior_equals_one_by_one(gaussian_problem):
  mu, _, sim, init = gaussian_problem
  prior = priors.GaussianPrior(mu)
  setups = [
    ("gradient", 1.0),
    ("gradient", 0.0),
    ("closed_form", 0.0),
    ("preconditioned", 1.0),
    ("preconditioned", 0.0),
    ("closed_form", 1.0),
  ]
  options = em.EMOptions(
    max_iterations=25, learning_rate=0.05, gamma="linear", dtype="float64"
  )
  batched = em.batched_em(
    [sim.measurement] * 6,
    5,
    [sim.sigma] * 6,
    inits=np.stack([init] * 6),
    m_steps=[s[0] for s in setups],
    prior=prior,
    prior_weights=[s[1] for s in setups],
    options=options,
  )
  for b, (m_step, weight) in enumerate(setups):
    single = em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=init,
      prior=prior if weight else None,
      options=dataclasses.replace(options, m_step=m_step),
    )
    assert batched.iterations[b] == single.iterations
    np.testing.assert_allclose(
      batched.estimate[b], single.estimate, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
  "spec,tau,total,expected",
  [
    ("linear", 30.0, 100.0, 0.3),
    ("linear:2", 50.0, 100.0, 1.0),
    ("constant:0.5", 7.0, 100.0, 0.5),
    (3.0, 1.0, 10.0, 3.0),
  ],
)
def test_gamma_schedules(spec, tau, total, expected):
  fn = em.gamma_schedule(spec)
  assert float(fn(tf.constant(tau), tf.constant(total))) == pytest.approx(
    expected
  )


def test_learned_prior_has_no_closed_form(gaussian_problem):
  _, _, sim, init = gaussian_problem

  def score(x, t):
    del t
    return -x

  with pytest.raises(ValueError, match="no closed-form M-step"):
    em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=init,
      prior=priors.ScorePrior(score, 5),
    )


def test_preconditioned_step_is_the_exact_m_step(gaussian_problem):
  """One preconditioned step maximises Q (+ the exact Gaussian log-prior)."""
  mu, _, sim, init = gaussian_problem
  for prior in (None, priors.GaussianPrior(mu)):
    options = em.EMOptions(dtype="float64", max_iterations=30, gamma="linear")
    exact = em.approximate_em(
      sim.measurement, 5, sim.sigma, init=init, prior=prior, options=options
    )
    stepped = em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=init,
      prior=prior,
      options=dataclasses.replace(options, m_step="preconditioned"),
    )
    # Prior callables take and return float32: agreement to float32 rounding.
    tol = 1e-9 if prior is None else 1e-6
    np.testing.assert_allclose(
      stepped.estimate, exact.estimate, rtol=tol, atol=tol
    )
