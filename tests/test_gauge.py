"""Tests of mtd_tf.gauge: centring exactness and orientation on MNIST."""

import numpy as np
import pytest

from mtd_tf.model import datasets
from mtd_tf.recovery import gauge


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
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top

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


def test_centre_of_mass_sd_is_the_spread_of_noisy_averages():
  """The analytic standard error against the centre of mass of averages
  of noisy copies (the oracle's estimate), for 12 and 192 copies."""
  digit = datasets.shipped_digits()["targets"][2]
  sigma = np.linalg.norm(digit) / 28  # SNR 1
  rng = np.random.default_rng(7)
  for copies in (12, 192):
    noise = sigma / np.sqrt(copies)
    centres = gauge.support_centre_of_mass(
      digit + noise * rng.standard_normal((400, 28, 28))
    )  # [400, 2]
    measured = np.sqrt(np.mean(np.var(centres, axis=0)))
    predicted = gauge.centre_of_mass_sd(digit, sigma, copies)
    assert predicted == pytest.approx(measured, rel=0.25)
  # 16 x the copies: a quarter of the uncertainty.
  np.testing.assert_allclose(
    gauge.centre_of_mass_sd([digit, digit], sigma, [12, 192]),
    gauge.centre_of_mass_sd(digit, sigma, 12) * np.array([1.0, 0.25]),
  )


def test_copies_in_data_counts_the_simulated_copies():
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  digit = datasets.shipped_digits()["targets"][6]
  for factor, seed in ((11, 1), (22, 2)):
    sim = simulation.simulate_measurement(
      digit, snr=0.5, size_factor=factor, seed=seed
    )
    found = gauge.copies_in_data(np.sum(sim.measurement, dtype=float), digit)
    assert found == pytest.approx(len(sim.corners), rel=0.2)
  assert gauge.copies_in_data(-3.0, digit) == 1.0  # at least one
  assert gauge.copies_in_data(5.0, np.zeros((28, 28))) == 1.0


def test_centre_takes_a_position_sd_per_image():
  digit = datasets.shipped_digits()["targets"][5]  # row 13.513: boundary
  both = gauge.centre(np.stack([digit, digit]), position_sd=[0.0, 0.15])
  np.testing.assert_allclose(both[0], gauge.centre(digit))
  np.testing.assert_allclose(both[1], gauge.centre(digit, position_sd=0.15))
  assert not np.allclose(both[0], both[1])


def _scored(monkeypatch, scores):
  # The score norms fix_gauge ranks the candidates by.
  monkeypatch.setattr(
    gauge, "_candidate_scores", lambda *a, **k: np.array([scores], float)
  )


def _expected_squared_error(estimate, truths, weights):
  """sum_j w_j min_k ||R_k G - T_j||^2: the error of section IV, squared."""
  return sum(
    w * min(np.sum((np.rot90(estimate, k) - t) ** 2) for k in range(4))
    for w, t in zip(weights, truths)
  )


def test_aligned_mix_is_the_least_squares_answer():
  # Brute force over every turn of every candidate (the heaviest's kept):
  # aligned_mix attains the least expected squared error of the family,
  # and that error is sum_j w_j ||T_j||^2 - ||G||^2.
  import itertools  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  for _ in range(5):
    candidates = rng.standard_normal((4, 7, 7))
    weights = rng.dirichlet(np.ones(4))
    mixed = gauge.aligned_mix(weights[None], candidates[None])[0]
    heaviest = int(np.argmax(weights))
    family = []
    for turns in itertools.product(range(4), repeat=4):
      if turns[heaviest] == 0:
        family.append(
          sum(w * np.rot90(c, k) for w, c, k in zip(weights, candidates, turns))
        )
    errors = [_expected_squared_error(g, candidates, weights) for g in family]
    ours = _expected_squared_error(mixed, candidates, weights)
    assert any(np.allclose(mixed, g, atol=1e-12) for g in family)
    np.testing.assert_allclose(ours, min(errors), rtol=1e-10)
    np.testing.assert_allclose(
      ours, weights @ np.sum(candidates**2, (1, 2)) - np.sum(mixed**2)
    )


def test_aligned_mix_leaves_out_negligible_orientations():
  rng = np.random.default_rng(5)
  candidates = rng.standard_normal((1, 4, 6, 6))
  weights = np.array([[0.0004, 0.9992, 0.0004, 0.0]])
  np.testing.assert_array_equal(
    gauge.aligned_mix(weights, candidates)[0], candidates[0, 1]
  )


def test_half_turn_tie_hedges_the_position_not_the_shape(monkeypatch):
  # Score norms equal for the upright digit and its half turn: the prior
  # cannot tell them apart. Turned back, the centred half turn is the
  # digit a whole pixel off on each axis (the convention's centre of mass
  # is not the frame centre), so the answer is the digit at the two
  # positions, not the digit over its half turn.
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top

  digit = datasets.shipped_digits()["targets"][7]
  _scored(monkeypatch, [1.0, 3.0, 1.0, 2.0])
  mixed = gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01)
  upright = gauge.centre(digit)
  upside_down = gauge.centre(np.rot90(digit, 2))
  back = np.rot90(upside_down, 2)
  offsets = [
    (r, c)
    for r in (-1, 0, 1)
    for c in (-1, 0, 1)
    if np.array_equal(back, np.roll(upright, (r, c), axis=(0, 1)))
  ]
  assert offsets == [(-1, -1)]
  np.testing.assert_allclose(mixed, 0.5 * upright + 0.5 * back, atol=1e-12)
  plain = 0.5 * upright + 0.5 * upside_down
  truths, halves = (upright, upside_down), (0.5, 0.5)
  assert _expected_squared_error(mixed, truths, halves) < 0.6 * (
    _expected_squared_error(plain, truths, halves)
  )
  # Either way half the error of the digit a pixel off on each axis.
  half_pixel = 0.5 * np.linalg.norm(back - upright) / np.linalg.norm(upright)
  for truth in truths:
    ours = metrics.relative_error(truth, mixed)
    np.testing.assert_allclose(ours, half_pixel, rtol=1e-9)
    assert ours < metrics.relative_error(truth, plain) - 0.1
  # Without half_turn_sd the first of the tied orientations alone.
  np.testing.assert_allclose(gauge.fix_gauge(digit, prior=object()), upright)


def test_half_turn_far_behind_changes_nothing(monkeypatch):
  digit = datasets.shipped_digits()["targets"][7]
  _scored(monkeypatch, [1.0, 1.5, 1.2, 1.4])  # the half turn 20 % behind
  np.testing.assert_allclose(
    gauge.fix_gauge(digit, prior=object(), half_turn_sd=0.01),
    gauge.fix_gauge(digit, prior=object()),
    atol=1e-12,
  )
  # A quarter turn close behind is never mixed in by the score-norm proxy:
  # only half turns.
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
  upright = gauge.centre(digit)
  upside_down = gauge.centre(np.rot90(digit, 2))
  family = [(1 - w) * upright + w * np.rot90(upside_down, k) for k in range(4)]
  expected = max(family, key=lambda g: np.sum(g**2))
  np.testing.assert_allclose(mixed, expected, atol=1e-12)
  np.testing.assert_allclose(
    expected, (1 - w) * upright + w * np.rot90(upside_down, 2)
  )


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

  # Version 1 of mnist_unet has no "convention": priors.kinds falls back.
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


def _angle_off(image, truth, angles=72):
  """Degrees by which image stands turned from truth (the best of a grid)."""
  from mtd_tf.model import rotations  # pylint: disable=g-import-not-at-top

  turned = rotations.rotate_all(image[None], angles)[0]  # [A, L, L]
  best = int(np.argmin(np.sum((turned - truth) ** 2, axis=(1, 2))))
  return min(best, angles - best) * 360.0 / angles


@pytest.mark.slow
def test_gauge_at_any_angle_puts_turned_digits_upright():
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  prior = priors.load_prior("mnist_unet")
  digits = datasets.shipped_digits()["targets"]
  rng = np.random.default_rng(21)
  truths = np.concatenate([digits] * 3)  # [30, L, L]
  angles = rng.uniform(0, 2 * np.pi, len(truths))
  turned = np.stack(
    [simulation.rotate_continuous(d, a) for d, a in zip(truths, angles)]
  )
  upright = gauge.apply_convention(turned, prior, 16, angles=72)
  quarter = gauge.apply_convention(turned, prior, 16)
  off = np.array([_angle_off(u, d) for u, d in zip(upright, truths)])
  off_quarter = np.array([_angle_off(q, d) for q, d in zip(quarter, truths)])
  # Quarter turns leave a uniform angle about 22 degrees off on average.
  assert np.mean(off <= 15) >= 0.7
  assert np.median(off) <= 10
  assert np.mean(off <= 15) > np.mean(off_quarter <= 15) + 0.3
  # Upright digits mostly stay upright (7 of 10 within 15 degrees: some
  # lean more than the prior's idea of upright), centred at the convention.
  same = gauge.apply_convention(digits, prior, 16, angles=72)
  assert np.mean([_angle_off(s, d) <= 15 for s, d in zip(same, digits)]) >= 0.6
  np.testing.assert_allclose(
    gauge.support_centre_of_mass(same),
    np.tile(gauge.MNIST_CENTRE, (10, 1)),
    atol=0.51,
  )


class _FakeOrientationPrior:
  """A prior whose score network counts the images it is given: score =
  x - template (norm: distance to the template), and a classifier whose
  p(upright) is larger the more mass lies in the image's top half."""

  def __init__(self, template):
    self.template = np.asarray(template, np.float32)
    self.scored = 0

  def __call__(self, x, t):
    del t
    self.scored += int(x.shape[0])
    return np.asarray(x) - self.template

  def orientation_classifier(self, x):
    x = np.asarray(x, np.float64)
    half = x.shape[1] // 2
    lead = x[:, :half].sum(axis=(1, 2)) - x[:, half:].sum(axis=(1, 2))
    logits = np.zeros((len(x), 4))
    logits[:, 0] = lead / 2.0
    return logits


def test_any_angle_gauge_scores_only_upright_candidates():
  # The proxy picks among the candidates the classifier finds upright, so
  # the score network is run on those alone; the choice is the one made
  # with every candidate scored (brute force below).
  digits = datasets.shipped_digits()["targets"]
  prior = _FakeOrientationPrior(digits[3])
  images = np.stack([np.rot90(digits[3], 1), digits[5], np.rot90(digits[8])])
  angles = 24
  got = gauge.upright_at_any_angle(images, prior, angles)
  turned = gauge._centred(gauge._rotated(images, angles), gauge.MNIST_CENTRE)
  flat = turned.reshape(-1, 28, 28)
  norms = np.sum((flat - prior.template) ** 2, axis=(1, 2)).reshape(3, angles)
  logits = prior.orientation_classifier(flat)
  p = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
  upright = (p >= gauge.UPRIGHT_PROBABILITY).reshape(3, angles)
  assert upright.any(axis=1).all() and not upright.all()
  best = np.argmin(np.where(upright, norms, np.inf), axis=1)
  np.testing.assert_allclose(got, turned[np.arange(3), best], atol=1e-12)
  assert prior.scored == upright.sum() < 3 * angles
