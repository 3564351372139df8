"""M-steps: the closed form maximises Q; EM ascends the likelihood."""

import brute_force
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.em import estep
from mtd_tf.em import mstep
from mtd_tf.em import registry
from mtd_tf.model import patches
from mtd_tf.model import rotations
from mtd_tf.model import simulation


def _stats(size, num_rotations, seed, sigma=0.4):
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(
    image, sigma=sigma, size_factor=6, num_rotations=num_rotations, seed=seed
  )
  rot = rotations.rotation_set(size, num_rotations)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, size)], 16, tf.float64
  )
  start = tf.constant((image + 0.3 * rng.standard_normal(image.shape))[None])
  stats = estep.make_estep(rot)(
    start,
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant([sigma], tf.float64),
  )
  return rot, stats, start, sigma


@pytest.mark.parametrize(
  "size,num_rotations", [(5, 4), (6, 4), (5, 2), (5, 3), (6, 6)]
)
def test_closed_form_zeroes_grad_q(size, num_rotations):
  rot, stats, start, sigma = _stats(size, num_rotations, seed=size)
  sig = tf.constant([sigma], tf.float64)
  best = mstep.closed_form_mstep(start, stats, mstep.MStepInputs(sig, rot))
  grad_at_best = mstep.q_gradient(best, stats, sig, rot)
  grad_at_start = mstep.q_gradient(start, stats, sig, rot)
  assert np.linalg.norm(grad_at_best.numpy()) < 1e-8 * np.linalg.norm(
    grad_at_start.numpy()
  )
  # And it is a maximum: Q is lower at random perturbations.
  q_best = mstep.expected_log_likelihood(best, stats, sig, rot).numpy()[0]
  rng = np.random.default_rng(0)
  for _ in range(5):
    other = best + 0.01 * rng.standard_normal(best.shape)
    assert (
      mstep.expected_log_likelihood(other, stats, sig, rot).numpy()[0] < q_best
    )


def test_gradient_step_follows_oracle_gradient():
  rot, stats, start, sigma = _stats(5, 4, seed=7)
  sig = tf.constant([sigma], tf.float64)
  stepped = mstep.gradient_mstep(
    start, stats, mstep.MStepInputs(sig, rot, learning_rate=1e-3)
  )
  grad = mstep.q_gradient(start, stats, sig, rot)
  np.testing.assert_allclose(stepped.numpy(), (start + 1e-3 * grad).numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_log_likelihood_never_decreases(seed):
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 1, (5, 5))
  init = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=2.0, seed=seed)
  result = em.approximate_em(
    sim.measurement,
    5,
    sim.sigma,
    init=init,
    options=em.EMOptions(max_iterations=40, dtype="float64"),
  )
  ll = result.log_likelihood
  assert len(ll) == result.iterations
  assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))
  # The reported value is the exact log-likelihood of the patch model at F(0).
  assert ll[0] == pytest.approx(
    brute_force.data_log_likelihood(sim.measurement, init, sim.sigma, 4),
    rel=1e-10,
  )


def test_registry_names_the_m_steps_of_em():
  assert tuple(em.M_STEPS) == ("closed_form", "gradient", "preconditioned")
  assert em.M_STEPS is registry.M_STEPS
  assert [s.maximises_q for s in registry.M_STEPS.values()] == [
    True,
    False,
    True,
  ]
  assert [s.needs_gaussian_prior for s in registry.M_STEPS.values()] == [
    True,
    False,
    False,
  ]
  rot, stats, start, sigma = _stats(5, 4, seed=3)
  inputs = mstep.MStepInputs(
    tf.constant([sigma], tf.float64), rot, learning_rate=1e-3
  )
  for step in registry.M_STEPS.values():  # one signature for all
    assert step(start, stats, inputs).shape == start.shape


def test_prior_term_calls_the_network_only_for_weighted_problems():
  seen = []

  def score(x, t):
    seen.append((x.shape[0], float(t[0])))
    return -x

  images = tf.constant(np.arange(3 * 4, dtype=np.float64).reshape(3, 2, 2))
  weight = tf.constant([0.5, 0.0, 2.0], tf.float64)
  term = mstep.prior_term(score, images, 0.01, weight).numpy()
  assert seen == [(2, pytest.approx(0.01))]
  np.testing.assert_allclose(
    term, -weight.numpy()[:, None, None] * images.numpy()
  )
  seen.clear()
  zero = mstep.prior_term(score, images, 0.01, tf.zeros([3], tf.float64))
  assert not seen and not np.any(zero.numpy())


def test_gradient_step_adds_the_weighted_score():
  rot, stats, start, sigma = _stats(5, 4, seed=4)
  sig = tf.constant([sigma], tf.float64)
  mu = np.full((5, 5), 0.5)
  prior = priors.GaussianPrior(mu)
  inputs = mstep.MStepInputs(
    sig,
    rot,
    learning_rate=1e-3,
    prior=prior,
    prior_weight=tf.constant([2.0], tf.float64),
    t_prior=0.01,
  )
  stepped = mstep.gradient_mstep(start, stats, inputs).numpy()
  grad = mstep.q_gradient(start, stats, sig, rot).numpy()
  score = -(start.numpy() - mu.astype(np.float32))
  # The prior works in float32.
  np.testing.assert_allclose(
    stepped, start + 1e-3 * (grad + 2.0 * score), rtol=1e-6, atol=1e-8
  )


@pytest.mark.parametrize("with_prior", [False, True])
def test_one_preconditioned_step_is_the_closed_form(with_prior):
  rot, stats, start, sigma = _stats(5, 4, seed=5)
  sig = tf.constant([sigma], tf.float64)
  extra = {}
  if with_prior:
    prior = priors.GaussianPrior(np.full((5, 5), 0.3))
    extra = dict(
      prior=prior,
      prior_weight=tf.constant([1.5], tf.float64),
      t_prior=0.01,
      prior_curvature=prior.curvature(0.01),
      prior_mean=prior.gaussian_mean,
    )
  inputs = mstep.MStepInputs(sig, rot, **extra)
  exact = mstep.closed_form_mstep(start, stats, inputs).numpy()
  stepped = mstep.preconditioned_mstep(start, stats, inputs).numpy()
  np.testing.assert_allclose(stepped, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,num_rotations", [(5, 4), (6, 3)])
def test_noise_mstep_is_the_expected_residual_by_direct_summation(
  size, num_rotations
):
  rng = np.random.default_rng(size)
  image = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(
    image, sigma=0.4, size_factor=6, num_rotations=num_rotations, seed=size
  )
  rot = rotations.rotation_set(size, num_rotations)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, size)], 16, tf.float64
  )

  def noise_mstep(weights_at, sigma, new):
    # E-step at (weights_at, sigma), sigma's M-step at the new F.
    stats = estep.make_estep(rot)(
      tf.constant(weights_at[None]),
      data.spectra,
      data.squared_norms,
      data.mask,
      tf.constant([sigma], tf.float64),
    )
    return mstep.noise_mstep(
      tf.constant(new[None]),
      stats,
      rot,
      tf.reduce_sum(data.squared_norms * data.mask, axis=[1, 2]),
      tf.reduce_sum(data.mask, axis=[1, 2]),
    ).numpy()[0]

  start = image + 0.3 * rng.standard_normal(image.shape)
  new = image + 0.1 * rng.standard_normal(image.shape)
  # The oracle: weights at (F_tau, 0.5), residuals at the new F.
  ops = brute_force.operators(size, num_rotations)
  w = brute_force.weights(sim.measurement, start, 0.5, num_rotations, ops)
  total = 0.0
  for m, patch in enumerate(brute_force.patches(sim.measurement, size)):
    for (lx, ly, k), op in ops.items():
      residual = patch.reshape(-1) - op @ new.reshape(-1)
      total += w[m, lx, ly, k] * np.sum(residual**2)
  expected = np.sqrt(total / (len(w) * size * size))
  np.testing.assert_allclose(noise_mstep(start, 0.5, new), expected, rtol=1e-10)
  # At the truth and its own weights it recovers the simulator's sigma.
  at_truth = noise_mstep(image, sim.sigma, image)
  assert abs(at_truth / sim.sigma - 1) < 0.06
