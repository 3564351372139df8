"""Bad input raises clear errors before TensorFlow sees it."""

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.base import validation
from mtd_tf.model import patches


def _run(measurement, size=5, sigma=1.0, init=None, prior=None, **options):
  init = np.ones((size, size)) if init is None else init
  return em.approximate_em(
    measurement,
    size,
    sigma,
    init=init,
    prior=prior,
    options=em.EMOptions(max_iterations=2, **options),
  )


@pytest.mark.parametrize(
  "measurement,match",
  [
    (np.zeros((5, 5, 5)), "2-D"),
    (np.zeros(25), "2-D"),
    (np.zeros((0, 0)), "empty"),
    (np.full((25, 25), np.nan), "NaN or Inf"),
    (np.full((25, 25), np.inf), "NaN or Inf"),
    (np.zeros((27, 25)), "not a multiple of image_size"),
    (np.zeros((4, 4)), "larger than"),
  ],
)
def test_bad_measurements(measurement, match):
  with pytest.raises(ValueError, match=match):
    _run(measurement)


def test_crop_instead_of_error():
  cropped = patches.extract_patches(np.ones((27, 26)), 5, crop=True)
  assert cropped.shape == (25, 5, 5)
  em.approximate_em(
    np.ones((27, 26)),
    5,
    1.0,
    init=np.ones((5, 5)),
    options=em.EMOptions(max_iterations=2),
    crop=True,
  )


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_sigma(sigma):
  with pytest.raises(ValueError, match="sigma"):
    _run(np.zeros((25, 25)), sigma=sigma)


@pytest.mark.parametrize(
  "init,match",
  [
    (np.ones((4, 4)), "init"),
    (np.full((5, 5), np.nan), "NaN"),
  ],
)
def test_bad_init(init, match):
  with pytest.raises(ValueError, match=match):
    _run(np.zeros((25, 25)), init=init)


@pytest.mark.parametrize(
  "options,match",
  [
    (dict(num_rotations=0), "num_rotations must be an integer >= 1, got 0"),
    (dict(max_iterations=-1), "max_iterations"),
    (dict(gradient_steps=0), "gradient_steps"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(m_step="newton"), "m_step must be one of"),
    (dict(gamma="cubic"), "Unknown gamma schedule 'cubic'"),
    (dict(gamma="linear:x"), "Malformed gamma"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(t_prior=-0.1), "t_prior"),
    (dict(prior_curvature=float("inf")), "prior_curvature"),
    (dict(tolerance=-1.0), "tolerance"),
    (dict(dtype="float16"), "dtype must be float32 or float64"),
    (dict(num_streams=0), "num_streams"),
  ],
)
def test_bad_options_fail_when_made(options, match):
  with pytest.raises(ValueError, match=match):
    em.EMOptions(**options)


def test_prior_of_another_size():
  prior = priors.GaussianPrior(np.zeros((4, 4)))
  with pytest.raises(
    priors.PriorError, match="4x4 images but the image size L is 5"
  ):
    _run(np.zeros((25, 25)), prior=prior)


def test_bad_batches():
  ones = np.ones((25, 25))
  with pytest.raises(ValueError, match="Got 1 sigmas for 2 measurements"):
    em.batched_em(
      [ones, ones],
      5,
      [1.0],
      inits=np.ones((2, 5, 5)),
      m_steps=["closed_form"] * 2,
    )
  with pytest.raises(ValueError, match="inits must have shape"):
    em.batched_em(
      [ones, ones],
      5,
      [1.0, 1.0],
      inits=np.ones((2, 4, 4)),
      m_steps=["closed_form"] * 2,
    )
  with pytest.raises(ValueError, match="m_steps must be 2 values"):
    em.batched_em(
      [ones, ones],
      5,
      [1.0, 1.0],
      inits=np.ones((2, 5, 5)),
      m_steps=["closed_form", "newton"],
    )
  with pytest.raises(ValueError, match="prior_weights"):
    em.batched_em(
      [ones, ones],
      5,
      [1.0, 1.0],
      inits=np.ones((2, 5, 5)),
      m_steps=["gradient"] * 2,
      prior=priors.GaussianPrior(np.zeros((5, 5))),
      prior_weights=[1.0, -1.0],
    )


@pytest.mark.parametrize(
  "shape,ok",
  [
    ((28, 28), False),
    ((28, 56), False),
    ((56, 28), False),
    ((56, 56), True),
    ((56, 308), True),
  ],
)
def test_a_micrograph_holds_at_least_two_by_two_patches(shape, ok):
  if ok:
    validation.enough_patches(shape, 28)
  else:
    with pytest.raises(ValueError, match=r"at least 2 x 2 \(sides >= 56\)"):
      validation.enough_patches(shape, 28, "m.npy")
