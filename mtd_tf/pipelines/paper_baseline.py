"""The paper's published EM loop, as a timing baseline: eq. (14)-(18).

The authors' code (zabatani/2d-mtd_diffusion, `approximate_EM.py`) runs one
EM iteration as follows, and this module follows the same loop structure in
this project's numpy, so that the bench's speed-up column compares against
what that code costs rather than against a slower strawman:

1. Build, for every shift l in {0..2L-1}^2 and rotation k, the image seen by
   a patch, C T_l Z R_k F (`docs/conventions.md`), all at once
   [4L^2, K, L, L], and the index maps that say which patch pixel sees which
   pixel of F.
2. For each patch, row-major over the patch grid: the log-likelihoods of all
   (l, k) at once (eq. 15), weights by exp in extended precision,
   normalised (eq. 14); then a Python double loop over (l, k) that adds
   w (M_m - F)[seen] / sigma^2 to grad Q at the seen pixels (eq. 16).
3. One gradient-ascent step with the prior term, eq. (18):
   F <- F + mu (grad Q + gamma s(F)).

Only rotations that permute pixels (K in 1, 2, 4) have index maps; the
paper uses those only.
"""

import time

import numpy as np

from mtd_tf.base import validation

__all__ = [
  "paper_iteration",
  "paper_iteration_seconds",
  "PAPER_ITERATION_SECONDS",
]

# The paper's published code, measured on this project's machine kind
# (seconds per EM iteration, K = 4): the reference figure printed beside
# this module's own timing.
PAPER_ITERATION_SECONDS = {(5, 55): 0.31, (28, 308): 24.6}


def _check_rotations(num_rotations):
  num_rotations = int(num_rotations)
  if num_rotations < 1 or 4 % num_rotations:
    raise ValueError(
      f"The paper baseline needs rotations that permute pixels: K in "
      f"(1, 2, 4), got {num_rotations}."
    )
  return num_rotations


def _views_and_index_maps(image, num_rotations):
  """C T_l Z R_k F for all (l, k), and where each patch pixel reads F.

  Built shift by shift and rotation by rotation, as the paper's code does:
  rotate, zero-pad, roll, crop, for the image and for a map of its pixel
  indices (NaN outside the image).

  Returns:
    views: float64 [4L^2, K, L, L], C T_l Z R_k F.
    seen: nested lists [4L^2][K] of (rows, cols) index tuples: the patch
      pixels that see the image under (l, k).
    source: the same shape: the pixels of F those see, as (rows, cols).
  """
  size = image.shape[0]
  index = np.arange(size * size, dtype=np.float64).reshape(size, size)
  num_shifts = 4 * size * size
  views = np.empty((num_shifts, num_rotations, size, size))
  seen = [[None] * num_rotations for _ in range(num_shifts)]
  source = [[None] * num_rotations for _ in range(num_shifts)]
  for shift in range(num_shifts):
    lx, ly = divmod(shift, 2 * size)
    for k in range(num_rotations):
      turns = 4 * k // num_rotations
      views[shift, k] = _crop_shift_pad(np.rot90(image, turns), lx, ly, 0.0)
      window = _crop_shift_pad(np.rot90(index, turns), lx, ly, np.nan)  # [L, L]
      inside = ~np.isnan(window)
      seen[shift][k] = np.nonzero(inside)
      source[shift][k] = np.unravel_index(
        window[inside].astype(int), (size, size)
      )
  return views, seen, source


def _crop_shift_pad(rotated, lx, ly, fill):
  """C T_l Z G: pad G to 2L x 2L with `fill`, shift by -l (mod 2L), crop."""
  size = rotated.shape[0]
  padded = np.full((2 * size, 2 * size), fill)  # [2L, 2L]
  padded[:size, :size] = rotated
  # (C T_l Z G)[i, j] = (Z G)[(i + lx) mod 2L, (j + ly) mod 2L].
  return np.roll(padded, (-lx, -ly), axis=(0, 1))[:size, :size]


def _patch_gradient(patch, views, seen, source, image, sigma, grad):
  """Adds one patch's term of grad Q (eq. 16) to `grad` [L, L], in place."""
  log_likelihoods = -np.sum((patch - views) ** 2, axis=(2, 3)) / (
    2 * sigma**2
  )  # [4L^2, K]
  # Extended precision, as the paper's code; the peak is subtracted so that
  # no patch underflows to all-zero weights.
  weights = np.exp(
    (log_likelihoods - log_likelihoods.max()).astype(np.longdouble)
  )
  weights = weights / np.sum(weights)  # eq. (14)
  for shift in range(len(seen)):
    for k in range(len(seen[shift])):
      where = source[shift][k]
      grad[where] += weights[shift, k] * (
        (patch[seen[shift][k]] - image[where]) / sigma**2
      )


def _patch_generator(measurement, size):
  """The L x L patches, row-major over the patch grid."""
  rows, cols = measurement.shape[0] // size, measurement.shape[1] // size
  for i in range(rows):
    for j in range(cols):
      yield measurement[i * size : (i + 1) * size, j * size : (j + 1) * size]


def paper_iteration(
  measurement,
  image,
  sigma,
  num_rotations=4,
  learning_rate=1e-3,
  prior_score=None,
):
  """One EM iteration of the paper's code: E-step and one gradient step.

  F <- F + mu (grad Q(F | F) + prior_score(F)), eq. (18) with N = 1, which
  equals `mstep.gradient_mstep` with `num_steps=1` on the E-step's
  statistics at F.

  Args:
    measurement: array [H, W], sides multiples of L.
    image: array [L, L], the current estimate F.
    sigma: noise standard deviation > 0.
    num_rotations: K in (1, 2, 4) (rotations by multiples of 90 degrees).
    learning_rate: mu.
    prior_score: None or a callable F [L, L] -> gamma s(F) [L, L], already
      weighted.

  Returns:
    float64 numpy array [L, L], the next estimate.

  Raises:
    ValueError: on a bad measurement, image, sigma or K.
  """
  image = validation.image_array(image).astype(np.float64)
  size = image.shape[0]
  measurement = np.asarray(
    validation.measurement_array(measurement, size), np.float64
  )
  sigma = validation.positive_finite(sigma, "sigma")
  num_rotations = _check_rotations(num_rotations)
  views, seen, source = _views_and_index_maps(image, num_rotations)
  grad = np.zeros((size, size))  # [L, L]
  for patch in _patch_generator(measurement, size):
    _patch_gradient(patch, views, seen, source, image, sigma, grad)
  if prior_score is not None:
    grad += np.asarray(prior_score(image), np.float64)
  return image + learning_rate * grad


def paper_iteration_seconds(
  measurement, image, sigma, num_rotations=4, max_patches=None
):
  """Seconds per EM iteration of the paper's loop (without a prior).

  Times the per-iteration set-up (views and index maps) and the first
  `max_patches` patches, and scales the patch time to all D patches (the
  patches cost the same each: the loop does not depend on the data).

  Args:
    measurement: array [H, W], sides multiples of L.
    image: array [L, L].
    sigma: noise standard deviation.
    num_rotations: K in (1, 2, 4).
    max_patches: patches to time (None: all, an exact iteration).

  Returns:
    float, seconds.
  """
  image = validation.image_array(image).astype(np.float64)
  size = image.shape[0]
  measurement = np.asarray(
    validation.measurement_array(measurement, size), np.float64
  )
  sigma = validation.positive_finite(sigma, "sigma")
  num_rotations = _check_rotations(num_rotations)
  num_patches = (measurement.shape[0] // size) * (measurement.shape[1] // size)
  count = (
    num_patches
    if max_patches is None
    else max(1, min(int(max_patches), num_patches))
  )
  start = time.perf_counter()
  views, seen, source = _views_and_index_maps(image, num_rotations)
  set_up = time.perf_counter() - start
  grad = np.zeros((size, size))
  start = time.perf_counter()
  for _, patch in zip(
    range(count), _patch_generator(measurement, size), strict=False
  ):
    _patch_gradient(patch, views, seen, source, image, sigma, grad)
  per_patch = (time.perf_counter() - start) / count
  return set_up + per_patch * num_patches
