"""Fixing the gauge: the position and orientation the data set defines.

The patch likelihood (eq. 13-15) is the same for an image F, for its
rotations R_k F in Phi (eq. 11) and, up to what falls out of the frame, for
its translates inside the L x L frame: EM's output orientation and position
are arbitrary. Only the data set's convention and the prior fix them:

- orientation: of the K rotations (of `ORIENTATION_ANGLES` angles where
  copies are turned by any angle), the one the prior finds most plausible.
  A prior exported with an orientation classifier (`orientation`) gives
  p(upright | R_k F) directly: it puts 90 % of clean MNIST test digits
  upright (1,000 digits, 100 per class), against 84 % for the proxy a bare
  score prior offers, the size of its score ||s(R_k F, t)|| at a moderate
  diffusion time t (eq. 6-8; t = 0.3 by default): at small t the score of
  an image that is not exactly on the data manifold is dominated by
  denoising and says little about orientation; at t ~ 0.3 it is smooth
  and small where the density is high. Measured on 100 winners of the
  recommended method (MNIST, SNR 0.5 and 1, seeds 3-7): the right quarter
  turn 86 of 100 times at t = 0.3, 82 at 0.35, 78 at 0.4, 72-76 at 0.25
  and 0.45-0.5; log p_t(R_k F) - log p_t(F) by the score's line integral
  (55-75 at t = 0.05-0.6) and the denoising score-matching loss averaged
  over t (62-77) did worse. Digits nearly symmetric under a half turn (a
  '1', an '8') and the pair '6' / '9' stay a coin toss for any criterion;
  where the prior cannot settle the orientation, `fix_gauge(...,
  half_turn_sd)` returns the least-squares answer under the error's own
  invariance to Phi (`aligned_mix`);
- position: an integer translation that puts the centre of mass of the
  image's support where the data set puts it; MNIST digits have their
  centre of mass at (14, 14) [row, col] within half a pixel (all 70,000),
  not at the frame centre (13.5, 13.5), so a quarter turn moves it by a
  pixel and the image is re-centred after it is turned.

The relative error of section IV minimises over Phi only, not over shifts:
an estimate in the wrong gauge scores about 1 however good it is.
See docs/conventions.md for the rotations and the error.
"""

import itertools

import numpy as np
from scipy import ndimage
from scipy import special

from mtd_tf.model import rotations as rotations_lib
from mtd_tf.priors import orientation as orientation_lib

__all__ = [
  "GaugeError",
  "MNIST_CENTRE",
  "ORIENTATION_TIME",
  "POSITION_SD",
  "HALF_TURN_SD",
  "ORIENTATION_ANGLES",
  "UPRIGHT_PROBABILITY",
  "CENTRE_THRESHOLD",
  "SUPPORT_DILATION",
  "POSITION_SD_FACTOR",
  "centre_of_mass",
  "support_centre_of_mass",
  "centre_of_mass_sd",
  "copies_in_data",
  "centre",
  "orientation_scores",
  "orientation_weights",
  "aligned_mix",
  "fix_gauge",
  "convention_centre",
  "apply_convention",
  "upright_at_any_angle",
]

# Centre of mass of MNIST digits, [row, col] (every digit within 0.5 px).
MNIST_CENTRE = (14.0, 14.0)
# An estimate's support: the pixels above CENTRE_THRESHOLD times its
# maximum, grown by SUPPORT_DILATION pixels (see `support_centre_of_mass`).
CENTRE_THRESHOLD = 0.3
SUPPORT_DILATION = 2
# Diffusion time at which the score norm ranks orientations.
ORIENTATION_TIME = 0.3
# The classifier's p(upright) above which an angle counts as upright
# (`upright_at_any_angle`; 0.5 and 0.9 were 3 points worse on 60 digits).
UPRIGHT_PROBABILITY = 0.7
# Orientations tried on data whose copies are turned by any angle: every
# 5 degrees, finer than the natural slant of handwritten digits (MNIST's
# spread about +-15 degrees), so the prior sees its estimate upright.
ORIENTATION_ANGLES = 72
# Standard deviation (pixels, per axis) assumed for an EM estimate's support
# centre of mass about its truth's when the returned estimate mixes the two
# whole-pixel positions around the convention's boundary (`centre`). The
# measured error is 0.077 px rms (bias < 0.003) on 420 winners of the
# recommended method (MNIST, SNR 0.5 and 1, 110 digits), but heavy-tailed:
# 13 % are off by more than 0.1 px. On 360 winners (13 seeds of the ten
# experiment digits, 2 seeds of 50 other test digits) 0.15 against 0.06
# left targets above 0.5 at SNR 1 on 1 of 13 seeds against 2 and on 6 of 100
# other digits against 10 (SNR 0.5: 5 against 8 seeds, 6 against 10
# digits), and lowered the SNR 0.1 mean (0.529 -> 0.505); the SNR 0.5 / 1
# means rose from 0.179 / 0.127 to 0.200 / 0.166.
POSITION_SD = 0.15
# The hedge's sd as a multiple of an estimate's centre-of-mass standard
# error (`centre_of_mass_sd`), for the estimate returned to the user: 1.5
# gives about POSITION_SD with Table I's data (standard errors 0.08 / 0.11
# px at SNR 1 / 0.5), and the hedge shrinks as 1 / sqrt(copies) with more
# data, where a fixed 0.15 px was the error's floor: MNIST at SNR 1, 194
# copies, 6 test digits: 0.109 with POSITION_SD, 0.058 with whole pixels
# (48 copies, 8 digits: 0.252 against 0.146; docs/recommended.md).
POSITION_SD_FACTOR = 1.5
# Relative difference of score norms below which the prior cannot tell an
# estimate from its half turn (see `fix_gauge`).
HALF_TURN_SD = 0.01


class GaugeError(ValueError):
  """Bad input to a gauge function."""


def _images(images):
  images = np.asarray(images, np.float64)
  if images.ndim not in (2, 3) or images.shape[-1] != images.shape[-2]:
    raise GaugeError(
      f"images must be [L, L] or [B, L, L], got shape {images.shape}."
    )
  if not np.all(np.isfinite(images)):
    raise GaugeError("images contain NaN or Inf values.")
  return images


def _above(batch, threshold):
  """Pixels above threshold times each image's maximum (and above 0)."""
  floor = np.maximum(threshold * batch.max(axis=(1, 2), keepdims=True), 0.0)
  return batch > floor  # [B, L, L]


def centre_of_mass(images, threshold=0.0):
  """Centre of mass of each image's positive part.

  Args:
    images: float [L, L] or [B, L, L].
    threshold: only pixels above threshold times the image's maximum count
      (0: the whole positive part, the data set's definition).

  Returns:
    float64 [2] or [B, 2], (row, col); the frame centre where an image has
    no positive mass.
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images if not single else images[None]  # [B, L, L]
  mass = np.where(_above(batch, threshold), batch, 0.0)  # [B, L, L]
  size = mass.shape[-1]
  grid = np.arange(size, dtype=np.float64)
  total = mass.sum(axis=(1, 2))  # [B]
  safe = np.where(total > 0, total, 1.0)
  rows = (mass.sum(axis=2) @ grid) / safe
  cols = (mass.sum(axis=1) @ grid) / safe
  centre_ = np.stack([rows, cols], axis=1)  # [B, 2]
  centre_[total <= 0] = (size - 1) / 2.0
  return centre_[0] if single else centre_


def support_centre_of_mass(
  images, threshold=CENTRE_THRESHOLD, dilation=SUPPORT_DILATION
):
  """Centre of mass of each image's positive part on its support.

  The support is the pixels above `threshold` times the image's maximum,
  grown by `dilation` pixels; the median of the pixels off the support (a
  background level) is subtracted first. On a clean MNIST digit this is
  the data set's own centre of mass (the faint anti-aliased edges lie within two
  pixels of the strokes: it moves none of the first 5,000 test digits
  across the convention's half-pixel boundary, against 7.8 % for the
  centre of mass of the pixels above 0.3 of the maximum). On an EM
  estimate it leaves out the faint background that pulls the plain centre
  of mass towards the frame centre: 0.063 px rms from the truth's on 100
  winners (SNR 0.5 and 1), against 0.083 above the threshold alone and
  0.078 for the plain centre of mass.

  Args:
    images: float [L, L] or [B, L, L].
    threshold: fraction of the maximum that seeds the support.
    dilation: pixels the support is grown by.

  Returns:
    float64 [2] or [B, 2], (row, col); the frame centre where an image has
    no positive mass.
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images if not single else images[None]  # [B, L, L]
  centre_ = centre_of_mass(_support_mass(batch, threshold, dilation))
  return centre_[0] if single else centre_


def _support_mass(batch, threshold, dilation):
  """Each image's positive part on its support, background level removed,
  float64 [B, L, L] (`support_centre_of_mass`)."""
  seeds = _above(batch, threshold)  # [B, L, L]
  if dilation > 0:
    grow = np.zeros((1, 3, 3), bool)
    grow[0] = ndimage.generate_binary_structure(2, 1)
    seeds = ndimage.binary_dilation(seeds, grow, iterations=int(dilation))
  # A flat background inside the grown support would pull the centre of
  # mass towards the support's middle: the median off the support is
  # taken away (0 on a clean digit).
  background = np.array(
    [np.median(x[~s]) if not s.all() else 0.0 for x, s in zip(batch, seeds)]
  )  # [B]
  lifted = batch - background[:, None, None]
  return np.where(seeds, np.maximum(lifted, 0.0), 0.0)  # [B, L, L]


def centre_of_mass_sd(
  images,
  sigma,
  copies,
  threshold=CENTRE_THRESHOLD,
  dilation=SUPPORT_DILATION,
):
  """Standard error of each estimate's support centre of mass, in pixels.

  An estimate averages about `copies` noisy copies, so each pixel carries
  noise of sd sigma / sqrt(copies) (eq. 1; Table I's 12 copies at SNR 1:
  about 0.09 for an MNIST digit in [0, 1]). The centre of mass of the support S
  (`support_centre_of_mass`), c = sum_S r F(r) / sum_S F, then moves by
  sum_S (r - c) dF(r) / sum_S F: per axis a variance of
  sigma^2 / copies * sum_S (r - c)^2 / (sum_S F)^2. Returned is the root
  mean square of the two axes. On 10 MNIST test digits with Table I's data
  (12 copies) this is 0.08 px at SNR 1 and 0.11 px at SNR 0.5, as measured
  on the recommended method's winners (0.077 px rms over both SNRs); it
  falls as 1 / sqrt(copies).

  Args:
    images: float [L, L] or [B, L, L], estimates.
    sigma: noise standard deviation, scalar or [B].
    copies: copies the data hold, scalar or [B] (`copies_in_data`).
    threshold, dilation: the support, as `support_centre_of_mass`.

  Returns:
    float64 [] or [B].
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images if not single else images[None]  # [B, L, L]
  sigma = np.broadcast_to(np.asarray(sigma, np.float64), len(batch))
  copies = np.broadcast_to(np.asarray(copies, np.float64), len(batch))
  if not (np.all(sigma >= 0) and np.all(copies > 0)):
    raise GaugeError(
      "sigma must be >= 0 and copies > 0 for a centre-of-mass error."
    )
  mass = _support_mass(batch, threshold, dilation)  # [B, L, L]
  support = mass > 0
  centre_ = centre_of_mass(mass)  # [B, 2]
  grid = np.arange(batch.shape[-1], dtype=np.float64)
  rows = (grid[None, :, None] - centre_[:, 0, None, None]) ** 2
  cols = (grid[None, None, :] - centre_[:, 1, None, None]) ** 2
  spread = np.sum(np.where(support, (rows + cols) / 2, 0.0), axis=(1, 2))
  total = mass.sum(axis=(1, 2))  # [B]
  sd = np.where(
    total > 0,
    sigma * np.sqrt(spread / copies) / np.where(total > 0, total, 1.0),
    0.0,
  )  # [B]
  return sd[0] if single else sd


def copies_in_data(total, image):
  """How many copies of image a measurement of pixel sum `total` holds.

  The noise of eq. (1) has mean zero, so the measurement's sum is the
  copies' (with the background removed): total / sum(image), at least 1.
  Used for `centre_of_mass_sd`.

  Args:
    total: float, the sum of the measurement's pixels.
    image: float [L, L], the estimate.

  Returns:
    float >= 1.
  """
  mass = float(np.sum(np.asarray(image, np.float64)))
  if not mass > 0 or not np.isfinite(total):
    return 1.0
  return max(float(total) / mass, 1.0)


def centre(
  images,
  target=MNIST_CENTRE,
  threshold=CENTRE_THRESHOLD,
  position_sd=0.0,
  dilation=SUPPORT_DILATION,
):
  """Translates each image by whole pixels so its centre of mass is at target.

  The centre of mass is that of the image's support
  (`support_centre_of_mass`): EM estimates carry a faint positive
  background that pulls the plain centre of mass towards the frame centre.

  The translation is circular (np.roll): what leaves one side enters the
  other, as in the patch model's shifts (docs/conventions.md); EM estimates
  are close to zero at the border, so nothing of the image is lost.

  The data set puts a digit's centre of mass anywhere within half a pixel
  of target (uniformly: a third of MNIST digits lie within 0.1 px of the
  boundary on one axis), and an estimate's centre of mass is off its
  truth's by about POSITION_SD: where it falls near the half-pixel
  boundary, rounding picks the wrong whole pixel about half the time, and
  a stroke one pixel off scores about 0.6. With position_sd > 0 each axis
  instead mixes the two whole-pixel shifts around the boundary, weighted by
  the probability that the truth lies on either side,
  Phi((frac - 1/2) / position_sd): the estimate's expectation over where
  the convention puts it (the least-squares answer). Away from the
  boundary the weight is 0 or 1 and the shift stays whole.

  Args:
    images: float [L, L] or [B, L, L].
    target: (row, col).
    threshold: fraction of the maximum that seeds the support (0 with
      dilation 0: the plain centre of mass of the positive part).
    position_sd: the centre of mass's uncertainty in pixels, scalar or [B]
      (0: whole-pixel shifts only).
    dilation: pixels the support is grown by.

  Returns:
    float64 array of the input's shape: each image shifted so that its
    support's centre of mass is within half a pixel of target (a mix of
    the two nearest whole-pixel shifts per axis where position_sd > 0).
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images[None] if single else images  # [B, L, L]
  wanted = np.asarray(target, np.float64) - support_centre_of_mass(
    batch, threshold, dilation
  )
  lower = np.floor(wanted).astype(int)  # [B, 2]
  sd = np.broadcast_to(np.asarray(position_sd, np.float64), len(batch))
  rounded = (wanted - lower > 0.5).astype(np.float64)  # [B, 2]
  upper_weight = np.where(
    sd[:, None] > 0,
    special.ndtr((wanted - lower - 0.5) / np.where(sd > 0, sd, 1.0)[:, None]),
    rounded,
  )  # [B, 2]
  out = np.zeros_like(batch)  # [B, L, L]
  for b, x in enumerate(batch):
    for row, row_weight in (
      (0, 1 - upper_weight[b, 0]),
      (1, upper_weight[b, 0]),
    ):
      for col, col_weight in (
        (0, 1 - upper_weight[b, 1]),
        (1, upper_weight[b, 1]),
      ):
        weight = row_weight * col_weight
        if weight > 0:
          shift = (lower[b, 0] + row, lower[b, 1] + col)
          out[b] += weight * np.roll(x, shift, axis=(0, 1))
  return out[0] if single else out


def _rotated(images, num_rotations):
  """All K rotations: [B, K, L, L]."""
  return rotations_lib.rotate_all(images, num_rotations)  # [B, K, L, L]


def orientation_scores(
  prior, images, num_rotations=4, t=ORIENTATION_TIME, target=MNIST_CENTRE
):
  """Implausibility of each rotation of each image.

  With the prior's orientation classifier (`priors.SavedModelPrior.
  orientation_classifier`): -log p(upright | centre(R_k F)). Otherwise the
  proxy ||s(centre(R_k F), t)||^2 of the prior's score.

  Args:
    prior: a prior callable score(x float32 [B, L, L], t float32 [B]) ->
      [B, L, L] in image units (eq. 6-8), optionally with an
      `orientation_classifier` attribute.
    images: float [B, L, L].
    num_rotations: K.
    t: diffusion time of the score (the proxy only).
    target: centre of mass each rotation is moved to before it is scored
      (None: not moved).

  Returns:
    float64 [B, K]; the smallest marks the most plausible orientation.
  """
  turned = _rotated(_images(images), int(num_rotations))  # [B, K, L, L]
  return _candidate_scores(prior, _centred(turned, target), t)


def _centred(turned, target, position_sd=0.0):
  """Each of [B, K, L, L] centred at target (None: as they are);
  position_sd scalar or [B]."""
  if target is None:
    return turned
  size = turned.shape[-1]
  sd = np.broadcast_to(np.asarray(position_sd, np.float64), turned.shape[0])
  flat = centre(
    turned.reshape(-1, size, size),
    target,
    position_sd=np.repeat(sd, turned.shape[1]),  # [B K]
  )
  return flat.reshape(turned.shape)


def _candidate_scores(prior, candidates, t):
  """`orientation_scores` of candidates [B, K, L, L] as they are."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  size = candidates.shape[-1]
  flat = candidates.reshape(-1, size, size)  # [B K, L, L]
  classify = _classifier(prior)
  if classify is not None:
    logits = classify(tf.constant(flat, tf.float32))  # [B K, 4]
    scores = -orientation_lib.upright_log_probs(np.asarray(logits))
    return scores.reshape(candidates.shape[:2])
  score = prior(
    tf.constant(flat, tf.float32),
    tf.fill([flat.shape[0]], tf.constant(t, tf.float32)),
  )
  norms = np.sum(np.asarray(score, np.float64) ** 2, axis=(1, 2))  # [B K]
  return norms.reshape(candidates.shape[:2])


def _classifier(prior):
  return getattr(prior, "orientation_classifier", None)


def orientation_weights(prior, scores, half_turn_sd=HALF_TURN_SD):
  """How much of each rotation an estimate's answer holds, [B, K].

  With the prior's orientation classifier: every orientation by its
  probability p(upright | candidate), normalised over the K candidates.
  The classifier is calibrated (its mean top probability equals its
  accuracy: 0.91 on 1,000 clean MNIST test digits, 0.910 against 0.912 on
  400 winners of the recommended method on other test digits, SNR 0.5 and
  1, where a temperature other than 1 raises the negative log-likelihood),
  so these are the odds of each orientation being the data set's, and
  `aligned_mix` turns them into the least-squares answer. With the
  score-norm proxy, whose values are not probabilities: the best
  orientation and (for an even K) its half turn weighted Phi(-gap /
  half_turn_sd), gap the relative difference of their norms (the proxy's
  half-turn gaps are small for '1's and '8's, its quarter-turn gaps are
  not).

  Args:
    prior: the prior `orientation_scores` was given.
    scores: float [B, K] from `orientation_scores`.
    half_turn_sd: > 0 hedges orientations the prior cannot settle (for
      the proxy: the relative score-norm difference at which a half turn
      is undetermined); 0: the best orientation alone.

  Returns:
    float64 [B, K], rows summing to 1.
  """
  scores = np.asarray(scores, np.float64)
  rows = np.arange(len(scores))
  num = scores.shape[1]
  best = np.argmin(scores, axis=1)  # [B]
  weights = np.zeros_like(scores)  # [B, K]
  weights[rows, best] = 1.0
  if half_turn_sd <= 0:
    return weights
  if _classifier(prior) is not None:
    # scores are -log p(upright | candidate).
    return special.softmax(-scores, axis=1)
  if num % 2:
    return weights
  half = (best + num // 2) % num  # [B]
  gap = (scores[rows, half] - scores[rows, best]) / scores[rows, best]
  weight = special.ndtr(-gap / half_turn_sd)  # [B]
  weights[rows, best] = 1.0 - weight
  weights[rows, half] = weight
  return weights


# Orientations below this weight are left out of `aligned_mix`, and at most
# MIX_CANDIDATES of the heaviest are kept: their share of the error is
# negligible and the search over turns grows as K^(n - 1).
MIX_FLOOR = 1e-3
MIX_CANDIDATES = 4


def aligned_mix(weights, candidates):
  """The least-squares estimate when the orientation is uncertain, [B, L, L].

  The relative error of section IV minimises over Phi: an estimate G
  scores against a truth T as min_k ||R_k G - T||. If the truth is
  candidate T_j with probability w_j, the G with the least expected squared
  error is sum_j w_j R^{k_j} T_j for the turns k_j in Phi that make it
  largest: the expected error sum_j w_j ||G - R^{k_j} T_j||^2 equals
  sum_j w_j ||T_j||^2 - ||G||^2 at that G. The plain mix sum_j w_j T_j
  (all k_j = 0) puts a digit and its half turn on top of each other,
  an error of the size of the digit's asymmetry; turned back, the half
  turn of a centred digit is the digit itself a pixel off on each axis
  (the convention's centre of mass is not the frame centre), so the
  aligned mix hedges the position instead. Measured on the winners of the
  recommended method (MNIST, 13 seeds of the ten experiment digits and
  200 other test digits) with the classifier's odds: targets above 0.5 at
  SNR 1 on 0 of 13 seeds (worst 0.42) against 1 of 13 (0.55) for the
  half-turn mix it replaces, and on 5 of 200 other digits against 8.

  The turn of the heaviest candidate is kept (k = 0): the estimate is
  returned in its most probable orientation.

  Args:
    weights: float [B, K], rows summing to 1 (`orientation_weights`).
    candidates: float [B, K, L, L], the K orientations, each centred.

  Returns:
    float64 [B, L, L].
  """
  weights = np.asarray(weights, np.float64)
  candidates = np.asarray(candidates, np.float64)
  num = candidates.shape[1]
  out = np.empty((len(weights),) + candidates.shape[2:])  # [B, L, L]
  for b, (w, cands) in enumerate(zip(weights, candidates)):
    order = np.argsort(-w, kind="stable")[:MIX_CANDIDATES]
    kept = [j for j in order if w[j] >= MIX_FLOOR or j == order[0]]
    share = w[kept] / w[kept].sum()  # [n]
    turned = _rotated(cands[kept], num)  # [n, K, L, L]: R^k T_j
    flat = turned.reshape(len(kept) * num, -1)
    gram = (flat @ flat.T).reshape(len(kept), num, len(kept), num)
    best, best_norm = None, 0.0
    for turns in itertools.product(range(num), repeat=len(kept) - 1):
      ks = (0,) + turns
      norm = sum(
        share[i] * share[j] * gram[i, ks[i], j, ks[j]]
        for i in range(len(kept))
        for j in range(len(kept))
      )
      if best is None or norm > best_norm * (1 + 1e-12):
        best, best_norm = ks, norm
    out[b] = np.einsum(
      "n,nij->ij", share, turned[np.arange(len(kept)), list(best)]
    )
  return out


def fix_gauge(
  images,
  prior=None,
  target=MNIST_CENTRE,
  num_rotations=4,
  t=ORIENTATION_TIME,
  position_sd=0.0,
  half_turn_sd=0.0,
):
  """Puts estimates in the data set's gauge: orientation, then position.

  With half_turn_sd > 0, an estimate whose orientation the prior cannot
  settle is returned as the `aligned_mix` of its centred orientations by
  their `orientation_weights`: the least-squares answer when the prior
  cannot tell the orientations apart, as position_sd is for the position.
  Measured with the score-norm proxy on 160
  winners of the recommended method (MNIST, SNR 0.5 and 1, 8 seeds), the
  test '1' was put upside down at SNR 1 on every seed, its score norms
  0.1-0.8 % apart, the '8' 0.4-2.8 % apart (upside down twice at SNR 0.5),
  while the right orientations of the other digits led their half turns
  by 2-30 %.

  Args:
    images: float [L, L] or [B, L, L], EM estimates.
    prior: score prior used to choose the orientation (None: orientation
      kept).
    target: centre of mass (row, col) of the data set's images (None:
      position kept).
    num_rotations: K, the rotations the orientation is chosen from.
    t: diffusion time of the orientation score (score-norm proxy).
    position_sd: see `centre` (0: whole-pixel shifts).
    half_turn_sd: > 0 hedges undetermined orientations (for the proxy: the
      relative score-norm difference at which a half turn is undetermined);
      0: the best orientation alone.

  Returns:
    float64 array of the input's shape.
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images[None] if single else images  # [B, L, L]
  if prior is None:
    if target is not None:
      batch = centre(batch, target, position_sd=position_sd)
    return batch[0] if single else batch
  turned = _rotated(batch, int(num_rotations))  # [B, K, L, L]
  centred = _centred(turned, target)  # whole pixels, as scored
  scores = _candidate_scores(prior, centred, t)  # [B, K]
  weights = orientation_weights(prior, scores, half_turn_sd)  # [B, K]
  if np.any(np.asarray(position_sd) > 0):
    centred = _centred(turned, target, position_sd)
  out = aligned_mix(weights, centred)  # [B, L, L]
  return out[0] if single else out


def convention_centre(prior):
  """The centre of mass a prior's data set puts its images at, or None.

  Reads the prior's `convention` (`priors.Prior`; prior.json "convention").
  """
  convention = getattr(prior, "convention", None) or {}
  if convention.get("centre_of_mass") is None:
    return None
  row, col = convention["centre_of_mass"]
  return float(row), float(col)


def apply_convention(
  images,
  prior,
  num_rotations=4,
  t=ORIENTATION_TIME,
  position_sd=0.0,
  half_turn_sd=0.0,
  angles=0,
):
  """`fix_gauge` with what the prior's `convention` asks for.

  The orientation is chosen by the prior when the convention says
  "upright" (only the quarter turns of Phi are tried, num_rotations = 4 at
  most; with `angles`, that many angles on [0, 2 pi), for data whose copies
  are turned by any angle), the position from its "centre_of_mass". A
  prior without a convention leaves the images as they are.

  Args:
    images: float [L, L] or [B, L, L], EM estimates.
    prior: a `priors.Prior` or None.
    num_rotations: K of the EM (orientations tried: K when K <= 4, else
      the 4 quarter turns).
    t: diffusion time of the orientation score.
    position_sd: see `centre`, scalar or [B] (0: whole-pixel shifts; for
      an estimate returned to the user `POSITION_SD_FACTOR` times its
      `centre_of_mass_sd`, `RecoveryOptions.position_sd_factor`).
    half_turn_sd: see `fix_gauge` (0: the best orientation alone;
      `HALF_TURN_SD` for an estimate returned to the user; not used with
      `angles`).
    angles: 0 (the quarter turns above), or the number of angles
      2 pi a / angles tried (`ORIENTATION_ANGLES` for continuous
      rotations), the most plausible one kept.

  Returns:
    float64 array of the input's shape.
  """
  convention = getattr(prior, "convention", None)
  if not convention:
    return _images(images)
  orient = convention.get("orientation") == "upright"
  if angles and orient:
    return upright_at_any_angle(
      images, prior, int(angles), convention_centre(prior), t, position_sd
    )
  return fix_gauge(
    images,
    prior=prior if orient else None,
    target=convention_centre(prior),
    num_rotations=min(int(num_rotations), 4),
    t=t,
    position_sd=position_sd,
    half_turn_sd=half_turn_sd if orient else 0.0,
  )


def upright_at_any_angle(
  images,
  prior,
  angles=ORIENTATION_ANGLES,
  target=MNIST_CENTRE,
  t=ORIENTATION_TIME,
  position_sd=0.0,
):
  """Turns estimates upright by the most plausible of `angles` angles.

  For data whose copies are turned by any angle, EM's estimate may stand
  at any angle. The orientation classifier, trained on quarter turns, is
  flat within about 30 degrees of upright, and the score-norm proxy is
  sharp but confuses a digit with its half turn more often; so the angle
  is the proxy's best among those the classifier finds upright with
  probability >= `UPRIGHT_PROBABILITY` (the classifier's best where none
  is; the proxy's alone without a classifier). Measured on 60 MNIST test
  digits turned by uniform angles: within 10 degrees of the truth 70 %
  of the time (median 5 degrees, within 20 degrees 90 %), against 48 %
  for the classifier alone and 63 % for the proxy alone; handwritten
  digits lean by about +-15 degrees, so "upright" is no sharper.

  The best angle alone is kept: the error minimises over every angle, so a
  mix of neighbouring angles would only blur.

  Args:
    images: float [L, L] or [B, L, L], EM estimates.
    prior: score prior (with or without `orientation_classifier`).
    angles: candidates 2 pi a / angles, a = 0 .. angles - 1.
    target: centre of mass each candidate is moved to (None: kept).
    t: diffusion time of the proxy.
    position_sd: see `centre` (0: whole-pixel shifts).

  Returns:
    float64 array of the input's shape.
  """
  images = _images(images)
  single = images.ndim == 2
  batch = images[None] if single else images  # [B, L, L]
  turned = _rotated(batch, int(angles))  # [B, A, L, L]
  centred = _centred(turned, target)  # whole pixels, as scored
  if _classifier(prior) is None:
    proxy = _candidate_scores(_ScoreOnly(prior), centred, t)  # [B, A]
    best = np.argmin(proxy, axis=1)  # [B]
  else:
    implausible = _candidate_scores(prior, centred, t)  # [B, A]
    upright = implausible <= -np.log(UPRIGHT_PROBABILITY)  # [B, A]
    # The score network runs only on the upright candidates (about one in
    # five): the rest are never chosen by the proxy.
    proxy = np.full(upright.shape, np.inf)  # [B, A]
    rows, cols = np.nonzero(upright)
    if rows.size:
      proxy[rows, cols] = _candidate_scores(
        _ScoreOnly(prior), centred[rows, cols][None], t
      )[0]
    best = np.where(
      upright.any(axis=1),
      np.argmin(proxy, axis=1),
      np.argmin(implausible, axis=1),
    )
  if np.any(np.asarray(position_sd) > 0):
    centred = _centred(turned, target, position_sd)
  out = centred[np.arange(len(batch)), best]  # [B, L, L]
  return out[0] if single else out


class _ScoreOnly:
  """A prior's score without its orientation classifier (the proxy)."""

  def __init__(self, prior):
    self._prior = prior

  def __call__(self, x, t):
    return self._prior(x, t)
