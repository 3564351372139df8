"""Errors of an estimate, section IV, and the oracle-alignment floor.

E = min_k ||F_true - R_k F_est||_F / ||F_true||_F over the rotations Phi
(the image is identifiable only up to a rotation). The oracle-alignment
estimate averages the copies at their true corners and rotations: no EM can
beat it on average, so it measures how far an estimate is from the noise
floor of the data.
"""

import numpy as np
from scipy import signal

from mtd_tf.base import validation
from mtd_tf.model import rotations as rotations_lib
from mtd_tf.model import simulation

__all__ = [
  "relative_error",
  "shift_aligned_error",
  "align",
  "oracle_alignment_estimate",
  "oracle_alignment_error",
  "psnr",
]


def _rotated(image, num_rotations):
  return rotations_lib.rotate_all(image, int(num_rotations))  # [K, L, L]


def _candidates(estimate, num_rotations, angles):
  """The K rotations of estimate, then (angles given) its continuous turns,
  float64 [K + A, L, L]: what the errors minimise over."""
  candidates = _rotated(estimate, num_rotations)  # [K, L, L]
  if angles is None:
    return candidates
  turned = [simulation.rotate_continuous(estimate, a) for a in np.ravel(angles)]
  return np.concatenate([candidates, np.stack(turned)])


def relative_error(true_image, estimate, num_rotations=4, angles=None):
  """min_k ||F_true - R_k F_est||_F / ||F_true||_F (section IV).

  Args:
    true_image: array [L, L].
    estimate: array [L, L].
    num_rotations: K.
    angles: None, or angles in radians (e.g. np.linspace(0, 2 pi, 360,
      endpoint=False)): also minimise over the estimate rotated by each
      (cubic interpolation, `simulation.rotate_continuous`), for data whose
      copies have continuous rotations.

  Returns:
    float.
  """
  true_image = validation.image_array(true_image, "true_image")
  estimate = validation.image_array(estimate, "estimate")
  if true_image.shape != estimate.shape:
    raise ValueError(f"Shapes differ: {true_image.shape} vs {estimate.shape}.")
  candidates = _candidates(estimate, num_rotations, angles)  # [C, L, L]
  diffs = candidates - true_image
  return float(
    np.min(np.linalg.norm(diffs.reshape(len(diffs), -1), axis=1))
    / np.linalg.norm(true_image)
  )


def shift_aligned_error(
  true_image, estimate, num_rotations=4, max_shift=None, angles=None
):
  """The error minimised over rotations and integer translations.

  The patch model of eq. (9) sums over all shifts, so its likelihood does
  not change when the image moves inside its frame (zeros shifted in, as
  long as no content leaves it): for sparse images such as digits EM can
  return a translated copy, which `relative_error` (rotations only, as in
  the paper) counts as wrong. This error also minimises over translations
  |d| <= max_shift (default L // 4).

  Args:
    true_image: array [L, L].
    estimate: array [L, L].
    num_rotations: K.
    max_shift: largest translation per axis, in pixels.
    angles: None, or angles in radians: also the estimate turned by each
      (as `relative_error`), for data whose copies have continuous
      rotations; never above `relative_error` with the same angles.

  Returns:
    float.
  """
  true_image = validation.image_array(true_image, "true_image")
  estimate = validation.image_array(estimate, "estimate")
  size = true_image.shape[0]
  max_shift = size // 4 if max_shift is None else int(max_shift)
  norm = np.linalg.norm(true_image)
  candidates = _candidates(estimate, num_rotations, angles)  # [C, L, L]
  residuals = _shifted_residuals(candidates, true_image, max_shift)
  c, drow, dcol = np.unravel_index(np.argmin(residuals), residuals.shape)
  # The best, recomputed directly: exact where the FFT's rounding is not.
  moved = _shifted_all(
    candidates[c : c + 1], int(drow) - max_shift, int(dcol) - max_shift
  )[0]
  return float(np.linalg.norm(moved - true_image) / norm)


def _shifted_residuals(candidates, true_image, max_shift):
  """||T_d C - F_true||^2 for every candidate C [C, L, L] and translation
  |d| <= max_shift (zeros shifted in), float64 [C, 2s+1, 2s+1].

  All translations at once by FFT correlation: ||T_d C||^2 (what stays in
  the frame) - 2 <T_d C, F_true> + ||F_true||^2.
  """
  size = true_image.shape[0]
  flipped = candidates[:, ::-1, ::-1]
  cross = signal.fftconvolve(
    true_image[None], flipped, mode="full", axes=(1, 2)
  )  # [C, 2L-1, 2L-1], lag d at L - 1 + d
  kept = signal.fftconvolve(
    np.ones((1, size, size)), flipped**2, mode="full", axes=(1, 2)
  )  # [C, 2L-1, 2L-1]
  lags = slice(size - 1 - max_shift, size + max_shift)
  return (
    kept[:, lags, lags] - 2.0 * cross[:, lags, lags] + np.sum(true_image**2)
  )


def _shifted_all(images, drow, dcol):
  """Each of [C, L, L] translated by (drow, dcol), zeros shifted in."""
  size = images.shape[-1]
  out = np.zeros_like(images)
  rows = slice(max(drow, 0), size + min(drow, 0))
  cols = slice(max(dcol, 0), size + min(dcol, 0))
  src_rows = slice(max(-drow, 0), size + min(-drow, 0))
  src_cols = slice(max(-dcol, 0), size + min(-dcol, 0))
  out[:, rows, cols] = images[:, src_rows, src_cols]
  return out


def align(true_image, estimate, num_rotations=4):
  """R_k F_est for the k that minimises the error: for display.

  Returns:
    float64 array [L, L].
  """
  true_image = validation.image_array(true_image, "true_image")
  candidates = _rotated(
    validation.image_array(estimate, "estimate"), num_rotations
  )
  errors = np.linalg.norm(
    (candidates - true_image).reshape(len(candidates), -1), axis=1
  )
  return candidates[int(np.argmin(errors))]


def oracle_alignment_estimate(
  measurement, image_size, corners, rotations, num_rotations=4
):
  """Averages the copies at their true corners, rotated back.

  Args:
    measurement: array [H, W].
    image_size: L.
    corners: int [p, 2] true top-left corners.
    rotations: int [p] true rotation indices k.
    num_rotations: K.

  Returns:
    float64 array [L, L], mean_i R_{k_i}^T M[c_i : c_i + L].
  """
  measurement = np.asarray(measurement, np.float64)
  size = int(image_size)
  corners = np.asarray(corners, int).reshape(-1, 2)
  if len(corners) == 0:
    raise ValueError("No copies: the oracle estimate needs at least one.")
  total = np.zeros((size, size))
  for (row, col), k in zip(corners, np.asarray(rotations, int)):
    window = measurement[row : row + size, col : col + size]
    total += rotations_lib.unrotate(window, int(k), int(num_rotations))
  return total / len(corners)


def oracle_alignment_error(
  measurement, true_image, corners, rotations, num_rotations=4
):
  """Error of the oracle-alignment estimate: the noise floor of the data."""
  true_image = validation.image_array(true_image, "true_image")
  oracle = oracle_alignment_estimate(
    measurement, true_image.shape[0], corners, rotations, num_rotations
  )
  return relative_error(true_image, oracle, num_rotations)


def psnr(reference, estimate, data_range=1.0):
  """Peak signal-to-noise ratio in dB, over all pixels of both arrays."""
  reference = np.asarray(reference, np.float64)
  mse = np.mean((reference - np.asarray(estimate, np.float64)) ** 2)
  return float(10.0 * np.log10(data_range**2 / mse))
