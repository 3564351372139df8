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
See docs/conventions.md for the patch model and the SNR.
"""

import numpy as np
from scipy import ndimage
from scipy import special
from scipy import stats as scipy_stats

__all__ = [
  "estimate_sigma",
  "block_sigma",
  "NoiseEstimateError",
  "WINDOW_QUANTILE",
  "STRONG_SIGNAL",
  "STRONG_QUANTILE",
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
      sigma), float, zero-mean noise.
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
  w = int(window_size) if window_size else _default_window(size)
  if w < 2:
    raise NoiseEstimateError(f"window_size must be >= 2, got {window_size}.")
  if quantile is not None and not 0 < float(quantile) < 1:
    raise NoiseEstimateError(f"quantile must be in (0, 1), got {quantile}.")
  images = _micrographs(measurement, max(w, _default_block(size)))
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
  for image in images:
    bins = np.searchsorted(
      edges,
      _keep_thresholds(image, w, energy_limit, sum_limit).ravel(),
      "right",
    )  # [H W]
    counts += np.bincount(bins, minlength=_NUM_BINS + 1)
    sums += np.bincount(bins, (image**2).ravel(), minlength=_NUM_BINS + 1)
  counts, sums = np.cumsum(counts), np.cumsum(sums)
  kept = None
  for _ in range(int(max_rounds)):
    now = int(np.searchsorted(edges, variance, "right"))  # bins < now kept
    if now == kept or now == 0 or counts[now - 1] == 0:
      break
    kept = now
    variance = sums[now - 1] / counts[now - 1]
  return float(np.sqrt(variance))
