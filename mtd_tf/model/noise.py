"""The noise level sigma of eq. (1) estimated from the measurement alone.

The paper assumes sigma known. At the section IV density (0.1) most of the
measurement holds no signal, so sigma is read off the pixels that look
empty. Two stages:

1. Blocks (a start): the measurement is cut into b x b blocks; an empty
   block's mean square is sigma^2 chi^2_n / n (n = b^2). A clipped mean
   with the exact correction for the clipping: start from the median over
   all blocks (divided by the median of chi^2_n / n); keep the blocks below
   the `keep_quantile` quantile c of chi^2_n / n and set sigma^2 =
   mean(kept) / E[chi^2_n / n | chi^2_n / n < c] (E[X 1{X < nc}] = n
   P(chi^2_{n+2} < nc) for X ~ chi^2_n); repeat until the kept set holds.
   Its weakness is signal that survives the clipping: a copy cut across
   four blocks leaves faint corners below the threshold (+2 % in sigma at
   SNR 1 on the 55 x 55 Gaussian measurements, sd 2 %).
2. Windows, leave one out (the estimate): a pixel p is kept when every w x
   w window containing it looks empty *without p*:
   sum_{W - p} x^2 < chi^2_{n-1, q} sigma^2 and |sum_{W - p} x| <
   z_q sigma sqrt(n - 1) (n = w^2; the sum catches the copies' mean, the
   square sum their energy), and sigma^2 is the plain mean of x_p^2 over
   the kept pixels, repeated until the kept set holds. A copy fills one of
   the windows that contain any of its pixels, so the whole copy is tested
   at once, and since p's own value takes no part in the choice, an empty
   pixel's x_p^2 is not biased by it: no clipping correction.

Where the copies carry much of the energy (STRONG_SIGNAL), the windows are
a pixel smaller and the quantile higher.

Measured on the experiment driver's Gaussian measurements (L = 5, 55 x 55,
density 0.1, seeds 0-99, 1,000 per SNR): relative error +0.78 / +0.18 /
-0.04 % on average at SNR 1 / 5 / 10, sd 1.8 / 1.6 / 1.6 %, 19 of 3,000
beyond 5 %, against +1.99 / +1.16 / +0.73 %, sd 2.0-2.1 %, 126 of 3,000 for
the blocks; the floor (the truly empty pixels, known) is sd 1.4 %. On MNIST
(L = 28, SNR 0.1-30) both are within 0.7 %.

Refinement inside EM: with `EMOptions(estimate_sigma=True)` (the
recommended method when sigma is not given) this estimate is the start and
EM's M-step for sigma (`mstep.noise_mstep`, the expected residual per pixel
of every pixel, copies included) refines it from the recommended method's
prune point on: on the same Gaussian measurements (seeds 0-99) -0.3 / -0.5
/ -0.5 %, sd 1.45 / 1.34 / 1.36 %, 1 of 3,000 beyond 5 %.
Background (`estimate_noise`): a real micrograph is eq. (1) on top of a
background level b in arbitrary units. b is the mean of the pixels stage 2
keeps as empty, found about a level that starts at the median and moves to
that mean until it holds (the copies have positive mass, so neither the
plain mean nor the median is the level of the empty pixels). Adding a
constant to a micrograph moves b by that constant and leaves sigma and the
kept pixels as they were; scaling it scales both. On the MNIST measurements
above (seeds 0-59) sigma is within 0.3 % (sd) of the truth, and b within
about sigma / sqrt(empty pixels) of 0. `scale_outliers` tells micrographs
whose sigmas cannot be one sigma (other units, another normalisation).
See docs/conventions.md for the patch model and the SNR.
"""

import typing

import numpy as np
from scipy import ndimage
from scipy import special
from scipy import stats as scipy_stats

__all__ = [
  "estimate_sigma",
  "estimate_noise",
  "NoiseEstimate",
  "block_sigma",
  "NoiseEstimateError",
  "WINDOW_QUANTILE",
  "STRONG_SIGNAL",
  "STRONG_QUANTILE",
  "BACKGROUND_TOLERANCE",
  "BACKGROUND_ROUNDS",
  "MAX_PIXELS",
  "SIGMA_SPREAD",
  "SIGMA_SPREAD_LIMIT",
  "SIGMA_AGREEMENT",
  "scale_outliers",
]

# Quantile of the empty-window statistics above which a window holds signal.
WINDOW_QUANTILE = 0.99
# Where the copies carry more than this share of the measurement's energy
# beyond the noise's (density x SNR above about 0.3), they stand out in
# windows a pixel smaller, tested at STRONG_QUANTILE: less empty space is
# ruled out around each copy and by chance (Gaussian L = 5, SNR 5 / 10: sd
# 1.81 / 1.95 % -> 1.62 / 1.61 %; driver seeds 0-99 with a measurement
# beyond 5 %: 25 -> 18).
STRONG_SIGNAL = 0.3
STRONG_QUANTILE = 0.995
# The background level is refined until it moves by less than this many
# sigma (its own statistical error is about sigma / sqrt(empty pixels)).
BACKGROUND_TOLERANCE = 1e-3
BACKGROUND_ROUNDS = 10
# `estimate_noise` measures at most this many pixels of a micrograph (its
# central square): a 4096 x 4096 one whole takes 14 s on one core.
MAX_PIXELS = 1 << 20
# Micrographs of one sigma: the spread of `estimate_noise`'s sigma, in units
# of the chi-square floor 1 / sqrt(2 n) (n empty pixels), measured 1.07-1.17
# (MNIST 308 x 308 at L = 28, 60 files per SNR; Gaussian 55 x 55 and
# 20 x 20 at L = 5, 300 per SNR; SNR 0.1, 1, 10), the largest of 300 errors
# 4.0 such sd. Two sigmas further apart than SIGMA_SPREAD_LIMIT spreads
# are not one sigma.
SIGMA_SPREAD = 1.2
SIGMA_SPREAD_LIMIT = 8.0
# Nor are sigmas more than 5 % apart, however well measured: two MNIST
# micrographs (digit 3, SNR 3) with the second scaled by 1.05 / 1.1 / 1.2
# raise EM's error from 0.133 to 0.141 / 0.153 / 0.188.
SIGMA_AGREEMENT = 0.05
# Thresholds binned over exp(+-_BIN_SPAN) times the start, 1e-4 apart.
_BIN_SPAN = 3.0
_NUM_BINS = 60001


class NoiseEstimateError(ValueError):
  """The measurement cannot give a noise estimate."""


def _clipped_mean_factor(n, threshold):
  """E[X / n | X / n < threshold] for X ~ chi^2_n."""
  inside = scipy_stats.chi2.cdf(n * threshold, n)
  return scipy_stats.chi2.cdf(n * threshold, n + 2) / max(inside, 1e-300)


def _micrographs(measurement, side):
  """The measurement as a list of finite float64 [H, W] arrays >= side."""
  images = (
    measurement if isinstance(measurement, (list, tuple)) else [measurement]
  )
  out = []
  for image in images:
    image = np.asarray(image, np.float64)
    if image.ndim != 2 or image.shape[0] < side or image.shape[1] < side:
      raise NoiseEstimateError(
        f"measurement must be a 2-D array of at least {side} x {side}, got "
        f"shape {image.shape}."
      )
    if not np.all(np.isfinite(image)):
      raise NoiseEstimateError("measurement contains NaN or Inf values.")
    out.append(image)
  return out


def _image_size(image_size):
  size = int(image_size)
  if size < 1:
    raise NoiseEstimateError(f"image_size must be >= 1, got {image_size}.")
  return size


def _default_block(size):
  return size if size <= 8 else max(4, size // 4)


def _default_window(size):
  # Small images: a pixel less than the image, so a copy still fills a
  # window while the zone it rules out stays small.
  return max(2, size - 1) if size <= 8 else _default_block(size)


def block_sigma(
  measurement, image_size, block_size=None, keep_quantile=0.9, max_rounds=50
):
  """The clipped mean square of the blocks that look empty (stage 1).

  Args:
    measurement: array [H, W] (or a list of such micrographs sharing one
      sigma), float.
    image_size: L. Only sets the default block size.
    block_size: b, side of the blocks (default: L for L <= 8, else L // 4,
      at least 4).
    keep_quantile: blocks whose mean square is below this quantile of the
      noise-only distribution are kept.
    max_rounds: clipping rounds at most.

  Returns:
    float sigma > 0.

  Raises:
    NoiseEstimateError: if the measurement is smaller than one block, not
      finite, or holds no noise (most blocks exactly zero).
  """
  size = _image_size(image_size)
  b = int(block_size) if block_size else _default_block(size)
  energies = []
  for image in _micrographs(measurement, b):
    rows, cols = image.shape[0] // b, image.shape[1] // b
    blocks = image[: rows * b, : cols * b].reshape(rows, b, cols, b)
    energies.append(np.mean(blocks**2, axis=(1, 3)).ravel())  # [rows * cols]
  energies = np.concatenate(energies)
  n = b * b
  variance = np.median(energies) / (scipy_stats.chi2.median(n) / n)
  if not variance > 0:
    raise NoiseEstimateError(
      "measurement holds no noise (most blocks are exactly zero)."
    )
  threshold = scipy_stats.chi2.ppf(keep_quantile, n) / n
  factor = _clipped_mean_factor(n, threshold)
  kept = None
  for _ in range(int(max_rounds)):
    now = energies < threshold * variance
    if kept is not None and np.array_equal(now, kept):
      break
    kept = now
    if not kept.any():
      break
    variance = np.mean(energies[kept]) / factor
  return float(np.sqrt(variance))


def _window_sums(image, w):
  """Sums over every w x w window, [H - w + 1, W - w + 1] (top-left)."""
  c = np.pad(np.cumsum(np.cumsum(image, axis=0), axis=1), ((1, 0), (1, 0)))
  return c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]


def _over_covering(sums, w, shape, reduce):
  """reduce (max or min) of window sums over the windows containing each pixel.

  sums: [H - w + 1, W - w + 1] by top-left corner; returns [H, W].
  """
  fill = -np.inf if reduce is ndimage.maximum_filter else np.inf
  padded = np.full((shape[0] + w - 1, shape[1] + w - 1), fill)
  padded[w - 1 : w - 1 + sums.shape[0], w - 1 : w - 1 + sums.shape[1]] = sums
  # Pixel (i, j) lies in the windows with corners (i - w + 1 .. i, ...):
  # in padded coordinates (i .. i + w - 1, ...), a w x w block from (i, j).
  out = reduce(padded, size=w, mode="nearest", origin=-(w // 2))
  return out[: shape[0], : shape[1]]


def _window_statistics(image, w):
  """Per pixel: the largest energy, largest and smallest sum, of the windows
  containing it, each without the pixel itself. [3, H, W]."""
  squares = image**2
  energy = _over_covering(
    _window_sums(squares, w), w, image.shape, ndimage.maximum_filter
  )
  sums = _window_sums(image, w)
  high = _over_covering(sums, w, image.shape, ndimage.maximum_filter)
  low = _over_covering(sums, w, image.shape, ndimage.minimum_filter)
  return energy - squares, high - image, low - image


def _keep_thresholds(image, w, energy_limit, sum_limit):
  """Per pixel, the sigma^2 above which every window around it looks empty.

  A pixel is kept when energy < energy_limit sigma^2, high < sum_limit
  sigma and low > -sum_limit sigma (`_window_statistics`): that is,
  when sigma^2 is above the largest of energy / energy_limit and the
  squares of max(high, 0) / sum_limit and max(-low, 0) / sum_limit.
  [H, W].
  """
  energy, high, low = _window_statistics(image, w)
  threshold = energy / energy_limit
  np.maximum(threshold, (np.maximum(high, 0.0) / sum_limit) ** 2, out=threshold)
  np.maximum(threshold, (np.maximum(-low, 0.0) / sum_limit) ** 2, out=threshold)
  return threshold


def _window_pass(images, size, window_size, quantile, max_rounds):
  """Stage 2 on zero-mean micrographs: (variance, kept pixels, their sum).

  The variance is the mean of x^2 over the kept pixels (module docstring);
  the sum of x over them measures what is left of a background level.
  """
  w = int(window_size) if window_size else _default_window(size)
  if w < 2:
    raise NoiseEstimateError(f"window_size must be >= 2, got {window_size}.")
  if quantile is not None and not 0 < float(quantile) < 1:
    raise NoiseEstimateError(f"quantile must be in (0, 1), got {quantile}.")
  images = _micrographs(images, max(w, _default_block(size)))
  variance = block_sigma(images, size) ** 2
  energy_share = (
    sum(float(np.sum(image**2)) for image in images)
    / sum(image.size for image in images)
    / variance
    - 1.0
  )
  strong = energy_share > STRONG_SIGNAL
  if not window_size and strong:
    w = max(2, w - 1)
  if quantile is None:
    quantile = STRONG_QUANTILE if strong else WINDOW_QUANTILE
  n = w * w - 1  # pixels of a window without the one tested
  energy_limit = scipy_stats.chi2.ppf(quantile, n)
  sum_limit = special.ndtri(0.5 + 0.5 * float(quantile)) * np.sqrt(n)
  # A pixel is kept while sigma^2 is above its threshold. Pixels are
  # binned by threshold (relative steps of 1e-4 about the start), so only
  # one micrograph's windows are held at a time and each round is a lookup.
  edges = variance * np.exp(np.linspace(-_BIN_SPAN, _BIN_SPAN, _NUM_BINS))
  # Bin k holds the pixels with edges[k - 1] <= threshold < edges[k].
  counts = np.zeros(_NUM_BINS + 1)  # [bins + 1]
  sums = np.zeros(_NUM_BINS + 1)  # [bins + 1], their sum of x^2
  firsts = np.zeros(_NUM_BINS + 1)  # [bins + 1], their sum of x
  for image in images:
    bins = np.searchsorted(
      edges,
      _keep_thresholds(image, w, energy_limit, sum_limit).ravel(),
      "right",
    )  # [H W]
    counts += np.bincount(bins, minlength=_NUM_BINS + 1)
    sums += np.bincount(bins, (image**2).ravel(), minlength=_NUM_BINS + 1)
    firsts += np.bincount(bins, image.ravel(), minlength=_NUM_BINS + 1)
  counts, sums, firsts = np.cumsum(counts), np.cumsum(sums), np.cumsum(firsts)
  kept = None
  for _ in range(int(max_rounds)):
    now = int(np.searchsorted(edges, variance, "right"))  # bins < now kept
    if now == kept or now == 0 or counts[now - 1] == 0:
      break
    kept = now
    variance = sums[now - 1] / counts[now - 1]
  if kept is None:
    return float(variance), 0, 0.0
  return float(variance), int(counts[kept - 1]), float(firsts[kept - 1])


def estimate_sigma(
  measurement,
  image_size,
  window_size=None,
  quantile=None,
  max_rounds=50,
):
  """Estimates the noise standard deviation from the measurement alone.

  Args:
    measurement: array [H, W] (or a list of such micrographs sharing one
      sigma), float, zero-mean noise (`estimate_noise` first removes a
      background level).
    image_size: L. Sets the default window size.
    window_size: w, side of the windows that test a pixel's surroundings
      (default: L - 1 for L <= 8, else L // 4, at least 4; a pixel less
      where the signal is strong, see STRONG_SIGNAL).
    quantile: a window whose energy or |sum| (without the pixel) is above
      this quantile of its noise-only distribution holds signal (default:
      WINDOW_QUANTILE, STRONG_QUANTILE where the signal is strong).
    max_rounds: rounds at most.

  Returns:
    float sigma > 0.

  Raises:
    NoiseEstimateError: if the measurement is smaller than a window, not
      finite, or holds no noise (most pixels exactly zero).
  """
  size = _image_size(image_size)
  variance, _, _ = _window_pass(
    measurement, size, window_size, quantile, max_rounds
  )
  return float(np.sqrt(variance))


class NoiseEstimate(typing.NamedTuple):
  """A micrograph's background level and noise, from its empty pixels.

  Attributes:
    background: the level b of the pixels no copy covers (the
      measurement is b + eq. (1)'s zero-mean noise around the copies).
    sigma: the noise standard deviation around b.
    empty_pixels: the pixels sigma and b were measured on (the kept set).
  """

  background: float
  sigma: float
  empty_pixels: int


def estimate_noise(
  micrograph,
  image_size,
  window_size=None,
  quantile=None,
  max_rounds=50,
  max_background_rounds=BACKGROUND_ROUNDS,
  max_pixels=MAX_PIXELS,
  background=None,
):
  """The background level and sigma of one micrograph, from its empty pixels.

  Real micrographs sit on a background level in arbitrary units, while
  eq. (1) has zero-mean noise around the copies. The background is the
  mean of the pixels that stage 2 keeps as empty (module docstring), not
  the plain mean (the copies have positive mass): start from the median,
  keep the pixels whose every window looks empty about it, move the level
  to their mean, and repeat until it moves by less than
  BACKGROUND_TOLERANCE sigma. An empty pixel takes no part in its own
  choice, so its value is an unbiased draw of the background however far
  the start was. On zero-mean data the background found is within about
  sigma / sqrt(empty pixels) of 0 and sigma is `estimate_sigma`'s.

  Args:
    micrograph: array [H, W], float.
    image_size: L.
    window_size, quantile, max_rounds: as `estimate_sigma`.
    max_background_rounds: level updates at most.
    max_pixels: a larger micrograph is measured on its central square of
      about this many pixels (None: all of it): 2^20 pixels give sigma
      to 0.1 % and cost about a second.
    background: None: estimated; a number: the level, taken as given (0
      for data known to be zero-mean; sigma is then `estimate_sigma`'s).

  Returns:
    `NoiseEstimate`.

  Raises:
    NoiseEstimateError: a micrograph that is constant, holds no noise
      (most pixels equal), is not finite or is smaller than a window.
  """
  size = _image_size(image_size)
  (image,) = _micrographs(micrograph, 1)
  low, high = float(np.min(image)), float(np.max(image))
  if low == high:
    raise NoiseEstimateError(
      f"measurement is constant (every pixel is {low:g}): it holds neither "
      "noise nor copies."
    )
  if max_pixels and image.size > max_pixels:
    side = max(int(np.sqrt(max_pixels)), 2 * size)
    top = max((image.shape[0] - side) // 2, 0)
    left = max((image.shape[1] - side) // 2, 0)
    image = image[top : top + side, left : left + side]
  fixed = background is not None
  level = float(background) if fixed else float(np.median(image))
  variance, count = 0.0, 0
  for _ in range(1 if fixed else max(int(max_background_rounds), 1)):
    variance, count, total = _window_pass(
      image - level, size, window_size, quantile, max_rounds
    )
    if fixed:
      break
    shift = total / count if count else 0.0
    level += shift
    # The kept pixels' mean square about the new level.
    variance = max(variance - shift**2, 0.0)
    if abs(shift) <= BACKGROUND_TOLERANCE * np.sqrt(variance):
      break
  if not variance > 0:
    raise NoiseEstimateError(
      "measurement holds no noise (the pixels no copy covers are all equal)."
    )
  return NoiseEstimate(level, float(np.sqrt(variance)), count)


def scale_outliers(sigmas, empty_pixels=None):
  """The micrographs whose sigma disagrees with the others' (their scale).

  Micrographs of one image share one sigma (eq. 1); a file whose noise is
  on another scale (other units, another normalisation) holds copies on
  that scale too, which one image cannot fit. Each sigma is compared with
  the median file's (the lower middle one for an even count): it
  disagrees when |log(sigma_i / sigma_median)| exceeds the larger of
  log(1 + SIGMA_AGREEMENT) and SIGMA_SPREAD_LIMIT times the spread of the
  pair (each `SIGMA_SPREAD` / sqrt(2 n), n its empty pixels; a recorded
  sigma has none).

  Args:
    sigmas: float [N] per micrograph.
    empty_pixels: int [N] the pixels each sigma was estimated on, with
      None (or None entries) for sigmas that were recorded, not estimated.

  Returns:
    (indices of the disagreeing micrographs, index of the median one).
  """
  sigmas = np.asarray(sigmas, np.float64)
  if empty_pixels is None:
    empty_pixels = [None] * len(sigmas)
  spread = np.array(
    [SIGMA_SPREAD / np.sqrt(2.0 * n) if n else 0.0 for n in empty_pixels]
  )  # [N] relative sd of each sigma
  median = int(np.argsort(sigmas, kind="stable")[(len(sigmas) - 1) // 2])
  limit = np.maximum(
    np.log1p(SIGMA_AGREEMENT),
    SIGMA_SPREAD_LIMIT * np.sqrt(spread**2 + spread[median] ** 2),
  )  # [N]
  off = np.abs(np.log(sigmas / sigmas[median])) > limit
  return [int(i) for i in np.flatnonzero(off)], median
