"""Several micrographs of one image: the statistics add up, the error falls."""

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf.model import metrics
from mtd_tf.model import simulation


@pytest.mark.slow
def test_error_falls_roughly_as_one_over_sqrt_of_copies():
  counts = [1, 2, 4, 8]
  errors = np.zeros((len(counts), 4))
  oracle = np.zeros_like(errors)
  for s in range(errors.shape[1]):
    image = np.random.default_rng(s).uniform(0, 1, (5, 5))
    sims = [
      simulation.simulate_measurement(image, snr=10, seed=[s, i])
      for i in range(max(counts))
    ]
    for c, count in enumerate(counts):
      chosen = sims[:count]
      result = em.approximate_em(
        [x.measurement for x in chosen],
        5,
        chosen[0].sigma,
        init=image,
        options=em.EMOptions(max_iterations=300),
      )
      errors[c, s] = metrics.relative_error(image, result.estimate)
      stacked = np.vstack([x.measurement for x in chosen])
      corners = np.vstack(
        [x.corners + [55 * i, 0] for i, x in enumerate(chosen)]
      )
      oracle[c, s] = metrics.oracle_alignment_error(
        stacked, image, corners, np.concatenate([x.rotations for x in chosen])
      )
  mean = errors.mean(axis=1)
  slope = np.polyfit(np.log(counts), np.log(mean), 1)[0]
  # 12 copies per micrograph: the error falls like copies^-1/2, as the
  # oracle-alignment floor does, with EM within 1.5 times the floor.
  assert -0.7 < slope < -0.35, (mean, slope)
  assert mean[-1] < 0.5 * mean[0]
  assert np.all(mean < 1.5 * oracle.mean(axis=1)), (mean, oracle.mean(axis=1))
