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

from mtd_tf import validation

__all__ = ["paper_iteration", "paper_iteration_seconds",
           "PAPER_ITERATION_SECONDS"]

# The paper's published code, measured on this project's machine kind
# (seconds per EM iteration, K = 4): the reference figure printed beside
# this module's own timing.
PAPER_ITERATION_SECONDS = {(5, 55): 0.31, (28, 308): 24.6}


def _check_rotations(num_rotations):
  num_rotations = int(num_rotations)
  if num_rotations < 1 or 4 % num_rotations:
    raise ValueError(
        f"The paper baseline needs rotations that permute pixels: K in "
        f"(1, 2, 4), got {num_rotations}.")
  return num_rotations


def _views_and_index_maps(image, num_rotations):
  """C T_l Z R_k F for all (l, k), and where each patch pixel reads F.

  Returns:
    views: float64 [4L^2, K, L, L], C T_l Z R_k F.
    seen: list over l of lists over k of int arrays: flat patch pixels that
      see the image under (l, k).
    source: the same shape: the flat pixel of F each of those sees.
  """
  size = image.shape[0]
  flat_image = np.append(image.reshape(-1), 0.0)  # [L^2 + 1], last: outside
  index = np.arange(size * size).reshape(size, size)
  rows = np.arange(size)[:, None]
  cols = np.arange(size)[None, :]
  num_shifts = 4 * size * size
  views = np.empty((num_shifts, num_rotations, size, size))
  seen = [[None] * num_rotations for _ in range(num_shifts)]
  source = [[None] * num_rotations for _ in range(num_shifts)]
  for k in range(num_rotations):
    # R_k F as an index map: rotated[i, j] is the flat pixel of F there.
    padded = np.full((2 * size, 2 * size), size * size)  # outside: L^2
    padded[:size, :size] = np.rot90(index, 4 * k // num_rotations)
    for shift in range(num_shifts):
      lx, ly = divmod(shift, 2 * size)
      # (C T_l Z G)[i, j] = (Z G)[(i + lx) mod 2L, (j + ly) mod 2L].
      window = padded[(rows + lx) % (2 * size), (cols + ly) % (2 * size)]  # [L, L]
      views[shift, k] = flat_image[window]
      flat_window = window.reshape(-1)
      inside = np.flatnonzero(flat_window < size * size)
      seen[shift][k] = inside
      source[shift][k] = flat_window[inside]
  return views, seen, source


def _patch_gradient(patch, views, seen, source, flat_image, sigma, grad):
  """Adds one patch's term of grad Q (eq. 16) to `grad` [L^2], in place."""
  log_likelihoods = -np.sum((patch - views)**2, axis=(2, 3)) / (
      2 * sigma**2)  # [4L^2, K]
  weights = np.exp((log_likelihoods - log_likelihoods.max()).astype(
      np.longdouble))  # extended precision, as the paper's code
  weights = (weights / weights.sum()).astype(np.float64)  # eq. (14)
  flat_patch = patch.reshape(-1)
  for shift in range(len(seen)):
    for k in range(len(seen[shift])):
      where = source[shift][k]
      grad[where] += weights[shift, k] * (
          flat_patch[seen[shift][k]] - flat_image[where]) / sigma**2


def _patch_generator(measurement, size):
  """The L x L patches, row-major over the patch grid."""
  rows, cols = measurement.shape[0] // size, measurement.shape[1] // size
  for i in range(rows):
    for j in range(cols):
      yield measurement[i * size:(i + 1) * size, j * size:(j + 1) * size]


def paper_iteration(measurement, image, sigma, num_rotations=4,
                    learning_rate=1e-3, prior_score=None):
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
  measurement = np.asarray(validation.measurement_array(measurement, size),
                           np.float64)
  sigma = validation.positive_finite(sigma, "sigma")
  num_rotations = _check_rotations(num_rotations)
  views, seen, source = _views_and_index_maps(image, num_rotations)
  flat_image = image.reshape(-1)
  grad = np.zeros(size * size)  # [L^2]
  for patch in _patch_generator(measurement, size):
    _patch_gradient(patch, views, seen, source, flat_image, sigma, grad)
  grad = grad.reshape(size, size)
  if prior_score is not None:
    grad += np.asarray(prior_score(image), np.float64)
  return image + learning_rate * grad


def paper_iteration_seconds(measurement, image, sigma, num_rotations=4,
                            max_patches=None):
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
  measurement = np.asarray(validation.measurement_array(measurement, size),
                           np.float64)
  sigma = validation.positive_finite(sigma, "sigma")
  num_rotations = _check_rotations(num_rotations)
  num_patches = (measurement.shape[0] // size) * (measurement.shape[1] // size)
  count = num_patches if max_patches is None else max(
      1, min(int(max_patches), num_patches))
  start = time.perf_counter()
  views, seen, source = _views_and_index_maps(image, num_rotations)
  set_up = time.perf_counter() - start
  flat_image = image.reshape(-1)
  grad = np.zeros(size * size)
  start = time.perf_counter()
  for _, patch in zip(range(count), _patch_generator(measurement, size)):
    _patch_gradient(patch, views, seen, source, flat_image, sigma, grad)
  per_patch = (time.perf_counter() - start) / count
  return set_up + per_patch * num_patches

