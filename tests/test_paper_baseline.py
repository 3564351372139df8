"""The paper-structured baseline takes the same step as our gradient M-step."""

import brute_force
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import priors
from mtd_tf.em import estep
from mtd_tf.em import mstep
from mtd_tf.model import patches
from mtd_tf.model import rotations
from mtd_tf.model import simulation
from mtd_tf.pipelines import paper_baseline


def _problem(seed=3, size=5, factor=5, sigma=0.5):
  rng = np.random.default_rng(seed)
  truth = rng.uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(
    truth, sigma=sigma, size_factor=factor, seed=seed
  )
  start = truth + 0.3 * rng.standard_normal(truth.shape)
  return sim.measurement.astype(np.float64), start, sigma


def _library_step(
  measurement, start, sigma, num_rotations, learning_rate, prior_score=None
):
  size = start.shape[0]
  rot = rotations.rotation_set(size, num_rotations)
  data = patches.patch_spectra(
    [patches.extract_patches(measurement, size)], 16, tf.float64
  )
  images = tf.constant(start[None])
  sig = tf.constant([sigma], tf.float64)
  stats = estep.make_estep(rot)(
    images, data.spectra, data.squared_norms, data.mask, sig
  )
  prior = (
    None
    if prior_score is None
    else priors.ScorePrior(
      lambda x, t: tf.convert_to_tensor(prior_score(x[0].numpy()), tf.float32)[
        None
      ],
      size,
    )
  )
  inputs = mstep.MStepInputs(
    sigma=sig,
    rotations=rot,
    learning_rate=tf.constant(learning_rate, tf.float64),
    num_steps=1,
    prior=prior,
    prior_weight=tf.ones([1], tf.float64),
    t_prior=tf.constant(0.01, tf.float32),
  )
  return mstep.gradient_mstep(images, stats, inputs).numpy()[0]


@pytest.mark.parametrize("num_rotations", [4, 2, 1])
def test_one_step_equals_library_gradient_mstep(num_rotations):
  measurement, start, sigma = _problem()  # L = 5, N = 25
  ours = paper_baseline.paper_iteration(
    measurement, start, sigma, num_rotations, learning_rate=1e-2
  )
  library = _library_step(measurement, start, sigma, num_rotations, 1e-2)
  np.testing.assert_allclose(ours, library, rtol=0, atol=1e-8)
  assert np.linalg.norm(ours - start) > 1e-3  # a real step was taken


def test_gradient_equals_brute_force_oracle():
  measurement, start, sigma = _problem(seed=5)
  rate = 1e-2
  ours = paper_baseline.paper_iteration(
    measurement, start, sigma, 4, learning_rate=rate
  )
  grad = brute_force.grad_q(measurement, start, start, sigma, 4)
  np.testing.assert_allclose((ours - start) / rate, grad, rtol=1e-9, atol=1e-8)


def test_prior_term_enters_the_step():
  measurement, start, sigma = _problem(seed=7)
  mean = np.full(start.shape, 0.5)

  def score(f):
    return -(f - mean)  # gamma s(F) of N(mean, I), gamma = 1

  ours = paper_baseline.paper_iteration(
    measurement, start, sigma, 4, learning_rate=1e-2, prior_score=score
  )
  library = _library_step(measurement, start, sigma, 4, 1e-2, score)
  np.testing.assert_allclose(ours, library, rtol=0, atol=1e-8)


def test_seconds_scale_from_a_few_patches():
  measurement, start, sigma = _problem()
  seconds = paper_baseline.paper_iteration_seconds(
    measurement, start, sigma, 4, max_patches=2
  )
  assert 0 < seconds < 60


def test_rejects_interpolated_rotations():
  measurement, start, sigma = _problem()
  with pytest.raises(ValueError, match="K in"):
    paper_baseline.paper_iteration(measurement, start, sigma, 3)
