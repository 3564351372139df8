"""The noise level sigma of eq. (1) estimated from the measurement alone.

The paper assumes sigma known. At the section IV density (0.1) most of the
measurement holds no signal, so sigma is read off the blocks that look
empty: the measurement is cut into b x b blocks, and each block's mean square
e_j = ||B_j||^2 / n (n = b^2 pixels) is, for an empty block,
sigma^2 chi^2_n / n. Blocks that hold a copy have a larger mean square.
The estimate is a clipped mean with the exact correction for the clipping:

  1. start from the median of e over all blocks (divided by the median of
     chi^2_n / n);
  2. keep the blocks with e_j < c sigma^2, c the `keep_quantile` quantile of
     chi^2_n / n, and set sigma^2 = mean(kept e) / E[chi^2_n / n | chi^2_n
     / n < c], where E[X 1{X < nc}] = n P(chi^2_{n+2} < nc) for X ~ chi^2_n;
  3. repeat 2 until the kept set no longer changes.

Signal that survives the clipping (a copy's faint edge in a block) biases
the estimate up by its energy over the kept pixels; at density 0.1 this is
below 0.5 % in sigma on MNIST and below 3 % on N(mu, I) images from SNR
0.1 to 10 (see
tests/test_noise.py). At low SNR nothing is clipped, and the bias is the
density times the SNR over two in relative sigma (0.5 % at SNR 0.1).

Refinement inside EM (an M-step for sigma, not used by this module): with
the E-step statistics of `estep.Statistics` (S1[k], V[k]) and the patch
norms sum_m ||M_m||^2,

  sigma^2 = (1 / (D L^2)) sum_{m,l,k} w ||M_m - C T_l Z R_k F||^2
          = (1 / (D L^2)) (sum_m ||M_m||^2 - 2 sum_k <S1[k], R_k F>
                           + sum_k <V[k], (R_k F)^2>)
          = (1 / (D L^2)) (sum_m ||M_m||^2 - 2 sigma_tau^2 Q(F | F_tau)),

Q as computed by `mstep.expected_log_likelihood` with sigma_tau (eq. 16).
See docs/conventions.md for the patch model and the SNR.
"""

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["estimate_sigma", "NoiseEstimateError"]


class NoiseEstimateError(ValueError):
  """The measurement cannot give a noise estimate."""


def _clipped_mean_factor(n, threshold):
  """E[X / n | X / n < threshold] for X ~ chi^2_n."""
  inside = scipy_stats.chi2.cdf(n * threshold, n)
  return scipy_stats.chi2.cdf(n * threshold, n + 2) / max(inside, 1e-300)


def estimate_sigma(
  measurement, image_size, block_size=None, keep_quantile=0.9, max_rounds=50
):
  """Estimates the noise standard deviation from the measurement alone.

  Args:
    measurement: array [H, W] (or a list of such micrographs sharing one
      sigma), float.
    image_size: L. Only sets the default block size.
    block_size: b, side of the blocks (default: L for L <= 8, else L // 4,
      at least 4: small enough that most blocks are empty, large enough that
      a block holding signal stands out).
    keep_quantile: blocks whose mean square is below this quantile of the
      noise-only distribution are kept.
    max_rounds: clipping rounds at most.

  Returns:
    float sigma > 0.

  Raises:
    NoiseEstimateError: if the measurement is smaller than one block, not
      finite, or holds no noise (every block exactly zero).
  """
  images = (
    measurement if isinstance(measurement, (list, tuple)) else [measurement]
  )
  size = int(image_size)
  if size < 1:
    raise NoiseEstimateError(f"image_size must be >= 1, got {image_size}.")
  b = (
    int(block_size)
    if block_size
    else (size if size <= 8 else max(4, size // 4))
  )
  energies = []
  for image in images:
    image = np.asarray(image, np.float64)
    if image.ndim != 2 or image.shape[0] < b or image.shape[1] < b:
      raise NoiseEstimateError(
        f"measurement must be a 2-D array of at least {b} x {b}, got shape "
        f"{image.shape}."
      )
    if not np.all(np.isfinite(image)):
      raise NoiseEstimateError("measurement contains NaN or Inf values.")
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
