"""The compiled E-step against the plain-loop float64 oracle (eq. 14-16)."""

import brute_force
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf.em import chunk_streams
from mtd_tf.em import estep
from mtd_tf.em import mstep
from mtd_tf.model import patches
from mtd_tf.model import rotations
from mtd_tf.model import simulation

CASES = [(size, sigma) for size in (5, 6) for sigma in (0.05, 0.3, 1.0, 5.0)]


def _problem(size, sigma, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(
    image, sigma=sigma, size_factor=5, seed=seed
  )
  estimate = image + 0.3 * rng.standard_normal(image.shape)
  other = image + 0.5 * rng.standard_normal(image.shape)
  return sim, estimate, other


def _statistics(
  measurement, size, estimate, sigma, dtype, chunk_size=7, num_rotations=4
):
  rot = rotations.rotation_set(size, num_rotations)
  data = patches.patch_spectra(
    [patches.extract_patches(measurement, size)], chunk_size, dtype
  )
  step = estep.make_estep(rot)
  stats = step(
    tf.constant(estimate[None], dtype),
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant([sigma], dtype),
  )
  return rot, stats


@pytest.mark.parametrize("size,sigma", CASES)
def test_posterior_weights_match_oracle(size, sigma):
  sim, estimate, _ = _problem(size, sigma)
  ops = brute_force.operators(size, 4)
  expected = brute_force.weights(sim.measurement, estimate, sigma, 4, ops)
  got = estep.posterior_weights(sim.measurement, estimate, sigma)
  assert got.shape == (len(expected), 2 * size, 2 * size, 4)
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), 1.0, atol=1e-12)
  np.testing.assert_allclose(got, expected, atol=1e-10)
  got32 = estep.posterior_weights(
    sim.measurement, estimate, sigma, dtype=tf.float32
  )
  # float32 logits carry an absolute error of about eps ||M|| ||F|| / sigma^2.
  np.testing.assert_allclose(got32, expected, atol=2e-6 / min(sigma, 1) ** 2)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("size,sigma", CASES)
def test_grad_q_and_log_likelihood_match_oracle(size, sigma, dtype):
  sim, estimate, other = _problem(size, sigma)
  ops = brute_force.operators(size, 4)
  rot, stats = _statistics(sim.measurement, size, estimate, sigma, dtype)
  got = mstep.q_gradient(
    tf.constant(other[None], dtype), stats, tf.constant([sigma], dtype), rot
  )[0].numpy()
  expected = brute_force.grad_q(sim.measurement, estimate, other, sigma, 4, ops)
  rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  tol = 1e-10 if dtype == tf.float64 else 2e-5 / min(sigma, 1) ** 2
  assert rel < tol
  ll = brute_force.data_log_likelihood(sim.measurement, estimate, sigma, 4, ops)
  assert stats.log_likelihood[0].numpy() == pytest.approx(
    ll, rel=1e-12 if dtype == tf.float64 else 1e-5
  )


def test_chunking_does_not_change_statistics():
  sim, estimate, _ = _problem(6, 0.5)
  results = [
    _statistics(sim.measurement, 6, estimate, 0.5, tf.float64, chunk_size=c)[1]
    for c in (1, 4, 7, 25)
  ]
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_chunks,num_streams", [(7, 3), (2, 3), (8, 1)])
def test_stream_bounds_cover_the_chunks_once_in_order(num_chunks, num_streams):
  bounds = chunk_streams.stream_bounds(num_chunks, num_streams)
  assert len(bounds) == num_streams
  assert bounds[0][0] == 0 and bounds[-1][1] == num_chunks
  assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
  assert all(begin <= end for begin, end in bounds)


def test_streams_do_not_change_statistics():
  sim, estimate, _ = _problem(6, 0.5)
  rot = rotations.rotation_set(6, 4)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, 6)], 4, tf.float64
  )
  args = (
    tf.constant(estimate[None], tf.float64),
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant([0.5], tf.float64),
  )
  results = [estep.make_estep(rot, num_streams=n)(*args) for n in (1, 2, 3)]
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10)
  parts = chunk_streams.stream_partial_sums(
    estep.make_partial_sums(rot), 3, *args
  )
  assert len(parts) == 3
  total = estep.add_partial_sums(parts)
  assert total.num_patches.numpy()[0] == len(
    patches.extract_patches(sim.measurement, 6)
  )


def test_weights_are_finite_at_extreme_snr():
  sim, estimate, _ = _problem(5, 1e-3)
  got = estep.posterior_weights(
    sim.measurement, estimate, 1e-3, dtype=tf.float32
  )
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), 1.0, atol=1e-5)


def test_statistics_of_a_non_square_measurement_match_oracle():
  size, sigma = 5, 0.7
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(
    image, sigma=sigma, seed=3, measurement_shape=(15, 30)
  )
  rot, stats = _statistics(sim.measurement, size, image, sigma, tf.float64)
  got = mstep.q_gradient(
    tf.constant(image[None] * 0.5), stats, tf.constant([sigma], tf.float64), rot
  )[0].numpy()
  expected = brute_force.grad_q(sim.measurement, image, image * 0.5, sigma, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
  "patches_,chunk,streams,expected",
  [
    (121, 64, 2, 61),
    (121, 64, 1, 61),
    (21316, 64, 2, 64),
    (5, 64, 2, 3),
    (100, 10, 3, 9),
  ],
)
def test_balanced_chunk_size(patches_, chunk, streams, expected):
  got = patches.balanced_chunk_size(patches_, chunk, streams)
  assert got == expected
  chunks = -(-patches_ // got)
  assert chunks * got - patches_ < chunks  # less than a patch per chunk


def test_uniform_log_rho_matches_the_default():
  sim, estimate, _ = _problem(6, 0.5)
  rot = rotations.rotation_set(6, 4)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, 6)], 7, tf.float64
  )
  args = (
    tf.constant(estimate[None], tf.float64),
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant([0.5], tf.float64),
  )
  step = estep.make_estep(rot)
  default = step(*args)
  uniform = tf.fill([1, 12, 12], tf.constant(-np.log(144.0), tf.float64))
  stats, rho = step(*args, None, uniform, with_shift_posterior=True)
  for a, b in zip(default, stats):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10)
  weights = estep.posterior_weights(sim.measurement, estimate, 0.5)
  np.testing.assert_allclose(
    rho[0].numpy(), weights.sum(axis=(0, 3)) / len(weights), atol=1e-12
  )


def test_estimated_shift_prior_finds_the_empty_patches():
  # With F the truth at high SNR, EM on rho alone recovers the fraction of
  # patches that show no copy (the shifts with lx == L or ly == L).
  size, sigma = 6, 0.05
  rng = np.random.default_rng(3)
  image = rng.uniform(0.5, 1.0, (size, size))
  sim = simulation.simulate_measurement(image, sigma=sigma, seed=3)
  blocks = sim.measurement.shape[0] // size
  occupied = np.zeros((blocks, blocks), bool)
  for r, c in np.asarray(sim.corners):
    for i in range(blocks):
      for j in range(blocks):
        rows = r < (i + 1) * size and r + size > i * size
        cols = c < (j + 1) * size and c + size > j * size
        occupied[i, j] |= rows and cols
  truth = 1.0 - occupied.mean()
  rot = rotations.rotation_set(size, 4)
  data = patches.patch_spectra(
    [patches.extract_patches(sim.measurement, size)], 64, tf.float64
  )
  step = estep.make_estep(rot)
  log_rho = tf.fill([1, 2 * size, 2 * size], -np.log(4.0 * size**2))
  for _ in range(20):
    _, rho = step(
      tf.constant(image[None], tf.float64),
      data.spectra,
      data.squared_norms,
      data.mask,
      tf.constant([sigma], tf.float64),
      None,
      tf.cast(log_rho, tf.float64),
      with_shift_posterior=True,
    )
    log_rho = tf.math.log(tf.maximum(rho, 1e-20))
  rho = rho[0].numpy()
  empty = rho[size, :].sum() + rho[:, size].sum() - rho[size, size]
  assert rho.sum() == pytest.approx(1.0, abs=1e-9)
  assert 0.3 < truth < 0.95
  assert empty == pytest.approx(truth, abs=0.1)
  # The uniform prior's mass on empty shifts is far from it.
  assert abs((4 * size - 1) / (4 * size**2) - truth) > 0.2
