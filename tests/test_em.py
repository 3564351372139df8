"""Recovery by approximate EM: what EM promises on a non-convex problem."""

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf.em import mstep
from mtd_tf.model import datasets
from mtd_tf.model import metrics
from mtd_tf.model import simulation


@pytest.fixture(scope="module")
def digit_problem():
  digit = datasets.shipped_digits()["targets"][3]
  return digit, simulation.simulate_measurement(digit, snr=10, seed=11)


@pytest.mark.slow
def test_local_convergence_from_noisy_truth(digit_problem):
  digit, sim = digit_problem
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(digit.shape)
  init = digit + 0.3 * np.linalg.norm(digit) * noise / np.linalg.norm(noise)
  assert metrics.relative_error(digit, init) == pytest.approx(0.3, abs=0.01)
  result = em.approximate_em(sim.measurement, 28, sim.sigma, init=init)
  assert metrics.relative_error(digit, result.estimate) < 0.15


def test_em_from_truth_is_near_the_oracle_alignment_floor(digit_problem):
  digit, sim = digit_problem
  floor = metrics.oracle_alignment_error(
    sim.measurement, digit, sim.corners, sim.rotations
  )
  # About 12 copies at SNR 10: the floor is near sqrt(1 / (12 * 10)).
  assert 0.05 < floor < 0.15
  result = em.approximate_em(sim.measurement, 28, sim.sigma, init=digit)
  assert metrics.relative_error(digit, result.estimate) < 1.5 * floor


def test_random_images_from_random_start():
  errors = []
  for seed in range(6):
    rng = np.random.default_rng(100 + seed)
    image = rng.uniform(0, 1, (5, 5))
    sim = simulation.simulate_measurement(image, snr=10, seed=seed)
    result = em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=rng.uniform(0, 1, (5, 5)),
      options=em.EMOptions(max_iterations=200),
    )
    errors.append(metrics.relative_error(image, result.estimate))
  assert np.median(errors) < 0.2


@pytest.mark.slow
def test_gradient_m_step_converges_towards_closed_form(digit_problem):
  digit, sim = digit_problem
  closed = em.approximate_em(sim.measurement, 28, sim.sigma, init=digit)
  gradient = em.approximate_em(
    sim.measurement,
    28,
    sim.sigma,
    init=digit,
    options=em.EMOptions(m_step="gradient", max_iterations=300),
  )
  assert metrics.relative_error(closed.estimate, gradient.estimate) < 0.05


@pytest.mark.slow
def test_batched_run_equals_one_by_one():
  rng = np.random.default_rng(5)
  images = rng.uniform(0, 1, (3, 5, 5))
  sims = [
    simulation.simulate_measurement(f, snr=s, seed=i)
    for i, (f, s) in enumerate(zip(images, (1.0, 5.0, 10.0)))
  ]
  inits = rng.uniform(0, 1, (3, 5, 5))
  m_steps = ["closed_form", "gradient", "closed_form"]
  batched = em.batched_em(
    [s.measurement for s in sims],
    5,
    [s.sigma for s in sims],
    inits=inits,
    m_steps=m_steps,
    options=em.EMOptions(max_iterations=30, dtype="float64"),
  )
  for b, sim in enumerate(sims):
    single = em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=inits[b],
      options=em.EMOptions(
        m_step=m_steps[b], max_iterations=30, dtype="float64"
      ),
    )
    assert batched.iterations[b] == single.iterations
    np.testing.assert_allclose(
      batched.estimate[b], single.estimate, rtol=1e-10, atol=1e-10
    )


def test_several_micrographs_add_up():
  rng = np.random.default_rng(9)
  image = rng.uniform(0, 1, (5, 5))
  sims = [
    simulation.simulate_measurement(image, sigma=0.5, seed=s) for s in range(3)
  ]
  init = image + 0.1 * rng.standard_normal((5, 5))
  options = em.EMOptions(dtype="float64")
  joint = em.approximate_em(
    [s.measurement for s in sims], 5, 0.5, init=init, options=options
  )
  stacked = em.approximate_em(
    np.vstack([s.measurement for s in sims]), 5, 0.5, init=init, options=options
  )
  # Stacking micrographs vertically gives the same patches.
  np.testing.assert_allclose(joint.estimate, stacked.estimate, atol=1e-10)


def test_groups_sharing_spectra_equal_copies():
  rng = np.random.default_rng(5)
  image = rng.uniform(0, 1, (5, 5))
  sims = [simulation.simulate_measurement(image, snr=5, seed=s) for s in (1, 2)]
  inits = rng.uniform(0, 1, (5, 5, 5))
  groups = [0, 0, 1, 0, 1]
  options = em.EMOptions(max_iterations=7, dtype="float64")
  copies = em.batched_em(
    [sims[g].measurement for g in groups],
    5,
    [sims[g].sigma for g in groups],
    inits=inits,
    m_steps=["closed_form"] * 5,
    options=options,
  )
  shared = em.batched_em(
    [s.measurement for s in sims],
    5,
    [sims[g].sigma for g in groups],
    inits=inits,
    m_steps=["closed_form"] * 5,
    options=options,
    groups=groups,
  )
  np.testing.assert_allclose(
    shared.estimate, copies.estimate, rtol=1e-10, atol=1e-12
  )
  np.testing.assert_allclose(
    shared.log_likelihood, copies.log_likelihood, rtol=1e-12
  )
  with pytest.raises(ValueError, match="groups"):
    em.batched_em(
      [s.measurement for s in sims],
      5,
      [1.0] * 2,
      inits=inits[:2],
      m_steps=["closed_form"] * 2,
      groups=[0, 2],
    )


def test_start_iteration_continues_the_run():
  rng = np.random.default_rng(6)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=5, seed=3)
  init = rng.uniform(0, 1, (1, 5, 5))
  options = em.EMOptions(max_iterations=6, dtype="float64", tolerance=0.0)
  whole = em.batched_em(
    [sim.measurement],
    5,
    [sim.sigma],
    inits=init,
    m_steps=["closed_form"],
    options=options,
  )
  from mtd_tf.model import patches

  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, 5)], 64, tf.float64
  )
  batch = em.ProblemBatch([sim.sigma], init, ["closed_form"], [0.0])
  first = em.run_prepared(data, batch, None, options, max_iterations=2)
  batch2 = em.ProblemBatch([sim.sigma], first.estimate, ["closed_form"], [0.0])
  second = em.run_prepared(data, batch2, None, options, start_iteration=2)
  assert int(second.iterations[0]) == 4
  np.testing.assert_allclose(second.estimate, whole.estimate, rtol=1e-10)


def test_annealed_prior_starts_at_t0_and_ends_at_t_prior():
  from mtd_tf import priors

  rng = np.random.default_rng(7)
  mu = rng.uniform(0, 1, (5, 5))
  prior = priors.GaussianPrior(mu, diffused=True)
  sim = simulation.simulate_measurement(mu, snr=2, seed=4)
  init = rng.uniform(0, 1, (5, 5))

  def run(**kwargs):
    options = em.EMOptions(
      m_step="preconditioned", dtype="float64", tolerance=0.0, **kwargs
    )
    return em.approximate_em(
      sim.measurement, 5, sim.sigma, init=init, options=options, prior=prior
    ).estimate

  # The first iteration of the annealed run uses the score at T0 ...
  np.testing.assert_allclose(
    run(max_iterations=1, t_schedule="geometric:0.5", t_prior=0.01),
    run(max_iterations=1, t_prior=0.5),
    rtol=1e-6,
  )
  # ... and differs from the fixed time (the diffused score depends on t).
  assert not np.allclose(
    run(max_iterations=1, t_prior=0.5), run(max_iterations=1, t_prior=0.01)
  )


def test_estimated_sigma_ascends_and_finds_the_simulators_sigma():
  # EM's noise level (an ECM step after each M-step) from a start 30 %
  # off: the likelihood never falls and sigma ends near the truth.
  rng = np.random.default_rng(3)
  image = rng.uniform(0.0, 1.0, (6, 6))
  sim = simulation.simulate_measurement(image, snr=2, seed=3, size_factor=30)
  init = image + 0.2 * rng.standard_normal(image.shape)

  def run(start, **kwargs):
    options = em.EMOptions(
      dtype="float64", max_iterations=30, tolerance=0, **kwargs
    )
    return em.approximate_em(
      sim.measurement, 6, start, init=init, options=options
    )

  for shift_prior in (False, "occupancy"):
    for start in (1.3 * sim.sigma, 0.7 * sim.sigma):
      result = run(start, estimate_sigma=True, estimate_shift_prior=shift_prior)
      ll = result.log_likelihood
      assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:])), shift_prior
      # 900 patches of 36 pixels: the estimate's own sd is about 0.4 %.
      assert abs(result.sigma / sim.sigma - 1) < 0.02, (shift_prior, start)
  fixed = run(1.3 * sim.sigma)
  assert fixed.sigma == 1.3 * sim.sigma
  with pytest.raises(ValueError, match="estimate_sigma"):
    em.EMOptions(estimate_sigma="yes")
  # The accelerators' one-iteration runs would restart sigma: none runs.
  batch = em.ProblemBatch([1.0], init[None], ["closed_form"], [0.0])
  assert not em.uses_acceleration(
    em.EMOptions(acceleration="squarem", estimate_sigma=True), batch, None
  )


def test_estimated_shift_prior_keeps_the_log_likelihood_non_decreasing():
  rng = np.random.default_rng(5)
  image = rng.uniform(0.0, 1.0, (6, 6))
  sim = simulation.simulate_measurement(image, snr=2, seed=5)
  init = rng.uniform(0.0, 1.0, (6, 6))
  options = em.EMOptions(
    estimate_shift_prior=True, dtype="float64", max_iterations=15, tolerance=0
  )
  result = em.approximate_em(
    sim.measurement, 6, sim.sigma, init=init, options=options
  )
  ll = result.log_likelihood
  assert len(ll) == 15
  assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:]))
  plain = em.approximate_em(
    sim.measurement,
    6,
    sim.sigma,
    init=init,
    options=em.EMOptions(dtype="float64", max_iterations=15, tolerance=0),
  )
  # A fitted rho explains the data better than the uniform one.
  assert ll[-1] > plain.log_likelihood[-1]


def test_occupancy_shift_prior_is_the_tied_projection():
  rng = np.random.default_rng(3)
  size = 4
  rho = rng.uniform(0.1, 1.0, (2, 2 * size, 2 * size))
  rho /= rho.sum(axis=(1, 2), keepdims=True)
  got = mstep.occupancy_shift_prior(tf.constant(rho)).numpy()
  index = np.arange(2 * size)
  empty = (index[:, None] == size) | (index[None, :] == size)
  np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0)
  for b in range(2):
    # epsilon is rho's empty mass, shared equally by the 4L - 1 empty
    # shifts; the others share the rest equally.
    epsilon = rho[b][empty].sum()
    np.testing.assert_allclose(got[b][empty], epsilon / (4 * size - 1))
    np.testing.assert_allclose(
      got[b][~empty], (1 - epsilon) / (4 * size**2 - 4 * size + 1)
    )


def test_occupancy_estimate_matches_the_simulated_empty_fraction():
  # With the true image at high SNR the posterior knows which patches are
  # empty: epsilon is the fraction of patches that no copy touches.
  from mtd_tf.em import estep
  from mtd_tf.model import patches
  from mtd_tf.model import rotations

  rng = np.random.default_rng(11)
  size = 5
  image = rng.uniform(0.5, 1.5, (size, size))
  sim = simulation.simulate_measurement(
    image, snr=50, seed=11, measurement_shape=(200, 200), density=0.15
  )
  covered = np.zeros(sim.measurement.shape, bool)
  for row, col in sim.corners:
    covered[row : row + size, col : col + size] = True
  touched = patches.extract_patches(covered.astype(np.float32), size)
  truth = np.mean(touched.reshape(len(touched), -1).max(axis=1) == 0)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, size)], 64, tf.float64
  )
  step = estep.make_estep(rotations.rotation_set(size, 4))
  _, rho = step(
    tf.constant(image[None]),
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant([sim.sigma], tf.float64),
    with_shift_posterior=True,
  )
  got = mstep.occupancy_shift_prior(rho).numpy()[0]
  epsilon = got[size, 0] * (4 * size - 1)
  assert abs(epsilon - truth) < 0.02, (epsilon, truth)


def test_occupancy_shift_prior_em_ascends_and_beats_uniform():
  rng = np.random.default_rng(5)
  image = rng.uniform(0.0, 1.0, (6, 6))
  sim = simulation.simulate_measurement(image, snr=2, seed=5)
  init = rng.uniform(0.0, 1.0, (6, 6))

  def run(shift_prior):
    options = em.EMOptions(
      estimate_shift_prior=shift_prior,
      dtype="float64",
      max_iterations=15,
      tolerance=0,
    )
    return em.approximate_em(
      sim.measurement, 6, sim.sigma, init=init, options=options
    ).log_likelihood

  ll = run("occupancy")
  assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:]))
  assert ll[-1] > run(False)[-1]
  with pytest.raises(ValueError, match="estimate_shift_prior"):
    em.EMOptions(estimate_shift_prior="tied")


def test_a_one_patch_measurement_is_refused_before_xla():
  with pytest.raises(ValueError, match="holds 1 patch of 5 x 5"):
    em.approximate_em(np.zeros((5, 5)), 5, 1.0, init=np.zeros((5, 5)))


@pytest.mark.parametrize(
  "k,chunk", [(1, 256), (4, 64), (16, 16), (72, 3), (1000, 1)]
)
def test_default_chunk_holds_a_fixed_number_of_patch_rotation_pairs(k, chunk):
  assert em.chunk_size_for(k) == chunk
  assert em.EMOptions().chunk_size == em.chunk_size_for(4)
