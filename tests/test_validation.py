"""Bad input raises clear errors before TensorFlow sees it."""

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf import patches


def _run(measurement, size=5, sigma=1.0, init=None, **kwargs):
  init = np.ones((size, size)) if init is None else init
  return em.approximate_em(measurement, size, sigma, init=init,
                           max_iterations=2, **kwargs)


@pytest.mark.parametrize("measurement,match", [
    (np.zeros((5, 5, 5)), "2-D"),
    (np.zeros(25), "2-D"),
    (np.zeros((0, 0)), "empty"),
    (np.full((25, 25), np.nan), "NaN or Inf"),
    (np.full((25, 25), np.inf), "NaN or Inf"),
    (np.zeros((27, 25)), "not a multiple of image_size"),
    (np.zeros((4, 4)), "larger than"),
])
def test_bad_measurements(measurement, match):
  with pytest.raises(ValueError, match=match):
    _run(measurement)


def test_crop_instead_of_error():
  cropped = patches.extract_patches(np.ones((27, 26)), 5, crop=True)
  assert cropped.shape == (25, 5, 5)
  _run(np.ones((27, 26)), crop=True)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_sigma(sigma):
  with pytest.raises(ValueError, match="sigma"):
    _run(np.zeros((25, 25)), sigma=sigma)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_rotations=0), "num_rotations"),
    (dict(m_step="newton"), "m_step"),
    (dict(init=np.ones((4, 4))), "init"),
    (dict(init=np.full((5, 5), np.nan)), "NaN"),
    (dict(gamma="cubic"), "gamma"),
    (dict(learning_rate=0.0), "learning_rate"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _run(np.zeros((25, 25)), **kwargs)
