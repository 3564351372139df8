"""Tests of mtd_tf.gauge: centring exactness and orientation on MNIST."""

import numpy as np
import pytest

from mtd_tf import datasets
from mtd_tf import gauge


def test_centre_of_mass_analytic():
  image = np.zeros((28, 28))
  image[3, 5] = 1.0
  image[7, 9] = 3.0
  np.testing.assert_allclose(gauge.centre_of_mass(image), [6.0, 8.0])
  # Negative values (EM estimates have them) are ignored.
  image[20, 20] = -5.0
  np.testing.assert_allclose(gauge.centre_of_mass(image), [6.0, 8.0])


def test_shipped_digits_are_at_the_convention():
  digits = datasets.shipped_digits()
  for images in (digits["targets"], digits["init_digits"]):
    offsets = gauge.centre_of_mass(images) - np.array(gauge.MNIST_CENTRE)
    assert np.all(np.abs(offsets) <= 0.5)


def test_centre_undoes_a_shift_exactly():
  digits = datasets.shipped_digits()["targets"]
  rng = np.random.default_rng(4)
  for digit in digits:
    rows, cols = np.nonzero(digit)
    # Shifts that keep the digit inside the frame (nothing wraps).
    shift = (
      rng.integers(-rows.min(), 28 - rows.max()),
      rng.integers(-cols.min(), 28 - cols.max()),
    )
    moved = np.roll(digit, shift, axis=(0, 1))
    np.testing.assert_array_equal(gauge.centre(moved, threshold=0.0), digit)


def test_centre_batch_lands_within_half_a_pixel():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (6, 28, 28)) * (
    rng.uniform(size=(6, 28, 28)) > 0.8
  )
  offsets = gauge.centre_of_mass(gauge.centre(images)) - 14.0
  # A circular shift moves the centre of mass exactly only where no mass
  # wraps; these images fill the frame, so allow a little more.
  assert np.all(np.abs(offsets) <= 1.5)


def test_soft_centre_mixes_the_two_shifts_at_the_boundary():
  # Mass 1 at column 10 and 1 at column 11, row 14: centre (14, 10.5),
  # 3.5 columns left of the target: 3 or 4 columns right equally likely.
  image = np.zeros((28, 28))
  image[14, 10] = image[14, 11] = 1.0
  soft = gauge.centre(image, threshold=0.0, position_sd=0.07)
  expected = np.zeros((28, 28))
  expected[14, 13] = 0.5  # column 10 moved by 3
  expected[14, 14] = 1.0  # column 11 by 3, column 10 by 4
  expected[14, 15] = 0.5  # column 11 by 4
  np.testing.assert_allclose(soft, expected, atol=1e-12)
  np.testing.assert_allclose(gauge.centre_of_mass(soft), [14.0, 14.0])


def test_soft_centre_is_the_whole_pixel_centre_away_from_the_boundary():
  digit = datasets.shipped_digits()["targets"][0]  # 0.17 px off (14, 14)
  moved = np.roll(digit, (3, -2), axis=(0, 1))
  np.testing.assert_allclose(
    gauge.centre(moved, position_sd=0.07),
    gauge.centre(moved),
    atol=1e-4,  # the other position's weight: Phi(-0.29 / 0.07) ~ 2e-5
  )


def test_soft_centre_bounds_the_error_near_the_boundary():
  """Noisy shifted copies of a digit 0.01 px from the half-pixel boundary.

  Rounding its centre of mass picks the wrong pixel for some draws (a
  stroke one pixel off scores about 0.6-0.8); mixing the two positions
  keeps every draw near the midpoint's error, at a small cost in the mean.
  """
  from mtd_tf import metrics  # pylint: disable=g-import-not-at-top

  truth = datasets.shipped_digits()["targets"][5]  # row 13.513
  rng = np.random.default_rng(0)
  hard, soft = [], []
  for _ in range(40):
    shift = tuple(rng.integers(-3, 4, size=2))
    estimate = np.roll(truth, shift, axis=(0, 1))
    estimate = estimate + 0.03 * rng.standard_normal(truth.shape)
    hard.append(metrics.relative_error(truth, gauge.centre(estimate)))
    soft.append(
      metrics.relative_error(
        truth, gauge.centre(estimate, position_sd=gauge.POSITION_SD)
      )
    )
  hard, soft = np.array(hard), np.array(soft)
  assert np.sum(hard > 0.5) >= 5 and np.sum(soft > 0.5) <= 1
  assert soft.max() < hard.max() - 0.1
  assert soft.mean() < hard.mean() + 0.03


def _scored(monkeypatch, scores):
  # The score norms fix_gauge ranks the candidates by.
  monkeypatch.setattr(
    gauge, "_candidate_scores", lambda *a, **k: np.array([scores], float)
  )


def test_half_turn_tie_returns_both_orientations(monkeypatch):
  # Score norms equal for a quarter turn and its half turn: the prior
  # cannot tell them apart, so each centred orientation gets weight 1/2.
  digit = datasets.shipped_digits()["targets"][1]
  _scored(monkeypatch, [2.0, 1.0, 3.0, 1.0])
  mixed = gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01)
  one = gauge.centre(np.rot90(digit, 1))
  three = gauge.centre(np.rot90(digit, 3))
  np.testing.assert_allclose(mixed, 0.5 * one + 0.5 * three, atol=1e-12)
  # Without half_turn_sd the first of the tied orientations alone.
  np.testing.assert_allclose(gauge.fix_gauge(digit, prior=object()), one)


def test_half_turn_far_behind_changes_nothing(monkeypatch):
  digit = datasets.shipped_digits()["targets"][7]
  _scored(monkeypatch, [1.0, 1.5, 1.2, 1.4])  # the half turn 20 % behind
  np.testing.assert_allclose(
    gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01),
    gauge.fix_gauge(digit, prior=object()),
    atol=1e-12,
  )
  # A quarter turn close behind is never mixed in: only half turns.
  _scored(monkeypatch, [1.0, 1.0001, 1.2, 1.4])
  np.testing.assert_allclose(
    gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01),
    gauge.centre(digit),
    atol=1e-12,
  )


def test_half_turn_weight_follows_the_normal_tail(monkeypatch):
  from scipy import special

  digit = datasets.shipped_digits()["targets"][4]
  _scored(monkeypatch, [1.0, 1.5, 1.01, 1.4])  # gap 1 % = one half_turn_sd
  mixed = gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01)
  w = special.ndtr(-1.0)
  expected = (1 - w) * gauge.centre(digit) + w * gauge.centre(
    np.rot90(digit, 2)
  )
  np.testing.assert_allclose(mixed, expected, atol=1e-12)


def test_fix_gauge_without_prior_only_centres():
  digit = datasets.shipped_digits()["targets"][2]
  turned = np.roll(np.rot90(digit), (2, -3), axis=(0, 1))
  fixed = gauge.fix_gauge(turned, prior=None)
  np.testing.assert_allclose(gauge.centre_of_mass(fixed), 14.0, atol=0.5)
  np.testing.assert_array_equal(fixed, gauge.centre(np.rot90(digit)))


def test_convention_centre_reads_the_prior_convention():
  from mtd_tf import priors

  class Prior:
    convention = priors.convention_of({"kind": "mnist"})

  # Version 1 of mnist_unet has no "convention": priors.py falls back.
  assert gauge.convention_centre(Prior()) == gauge.MNIST_CENTRE
  Prior.convention = priors.convention_of({"kind": "gaussian"})
  assert gauge.convention_centre(Prior()) is None
  Prior.convention = priors.convention_of(
    {"kind": "other", "convention": {"centre_of_mass": [10, 11]}}
  )
  assert gauge.convention_centre(Prior()) == (10.0, 11.0)
  # gauge.py never sniffs the kind: a bare kind without convention is None.
  Prior.convention = None
  Prior.metadata = {"kind": "mnist"}
  assert gauge.convention_centre(Prior()) is None


def test_apply_convention_centres_without_orientation_and_keeps_without():
  digit = datasets.shipped_digits()["targets"][3]
  moved = np.roll(digit, (3, -2), axis=(0, 1))

  class Centring:
    convention = {"centre_of_mass": [14.0, 14.0]}

  fixed = gauge.apply_convention(moved, Centring())
  np.testing.assert_array_equal(fixed, gauge.centre(digit))
  assert np.array_equal(gauge.apply_convention(moved, None), moved)


def test_bad_input_raises():
  with pytest.raises(gauge.GaugeError):
    gauge.centre(np.zeros((3, 4)))
  with pytest.raises(gauge.GaugeError):
    gauge.centre_of_mass(np.full((5, 5), np.nan))


@pytest.mark.slow
def test_prior_orientation_beats_chance_on_test_digits():
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top

  prior = priors.load_prior("mnist_unet/1")
  digits = datasets.shipped_digits()["targets"]
  rng = np.random.default_rng(9)
  turns = rng.integers(0, 4, len(digits))
  turned = np.stack(
    [
      np.roll(np.rot90(d, k), tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
      for d, k in zip(digits, turns)
    ]
  )
  fixed = gauge.fix_gauge(turned, prior)
  right = sum(np.array_equal(f, d) for f, d in zip(fixed, digits))
  # Chance is 2.5 of 10; the score norm at t = 0.3 gets about 8 of 10.
  assert right >= 6


def test_support_centre_of_mass_is_the_data_sets_on_clean_digits():
  # MNIST's convention is the plain centre of mass; the support (pixels
  # above 0.3 of the maximum, grown by 2) holds every nonzero pixel of a
  # digit, while the thresholded centre of mass alone moves the '6' across
  # the half-pixel boundary (column 13.56 -> 13.48).
  digits = datasets.shipped_digits()["targets"]
  plain = gauge.centre_of_mass(digits)
  np.testing.assert_allclose(gauge.support_centre_of_mass(digits), plain)
  assert np.all(np.abs(plain - 14.0) < 0.5)
  np.testing.assert_array_equal(gauge.centre(digits), digits)
  thresholded = gauge.centre_of_mass(digits, threshold=0.3)
  assert np.any(np.abs(thresholded - 14.0) > 0.5)


def test_support_centre_of_mass_of_a_batch_does_not_mix_images():
  digits = datasets.shipped_digits()["targets"][:3]
  batch = gauge.support_centre_of_mass(digits)
  single = [gauge.support_centre_of_mass(d) for d in digits]
  np.testing.assert_allclose(batch, single)


def test_threshold_ignores_a_faint_background():
  # A faint positive background pulls the plain centre of mass towards the
  # frame centre; on the digit's support only the digit counts.
  digit = datasets.shipped_digits()["targets"][5]
  moved = np.roll(digit, (5, -4), axis=(0, 1))
  background = np.full((28, 28), 0.08)
  noisy = moved + background
  np.testing.assert_allclose(
    gauge.support_centre_of_mass(noisy),
    gauge.support_centre_of_mass(moved),
    atol=0.05,
  )
  clean_shift = tuple(
    np.round(14.0 - gauge.support_centre_of_mass(moved)).astype(int)
  )
  np.testing.assert_array_equal(
    gauge.centre(noisy, threshold=0.3), np.roll(noisy, clean_shift, axis=(0, 1))
  )
  plain_shift = tuple(np.round(14.0 - gauge.centre_of_mass(noisy)).astype(int))
  assert plain_shift != clean_shift
