"""Patches of a measurement and their spectra, eq. (9).

The measurement is cut into D non-overlapping L x L patches, row-major
(docs/conventions.md: patch m = i * (W // L) + j is
M[iL:(i+1)L, jL:(j+1)L]). The E-step needs each patch only through the 2-D
real FFT of its zero-padded 2L x 2L version (Z M_m), so those spectra are
computed once, before EM starts, and padded to a whole number of chunks.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mtd_tf.base import validation

__all__ = [
  "extract_patches",
  "grid_offsets",
  "offset_grid_patches",
  "PatchSpectra",
  "patch_spectra",
  "band_matrix",
  "balanced_chunk_size",
]


def extract_patches(measurement, image_size, crop=False):
  """Cuts a measurement into its D non-overlapping L x L patches.

  Args:
    measurement: array [H, W], H and W multiples of L (or crop=True).
    image_size: L.
    crop: drop trailing rows and columns beyond a multiple of L.

  Returns:
    float32 numpy array [D, L, L], D = (H // L) * (W // L), row-major.

  Raises:
    ValueError: on input that `validation.measurement_array` rejects.
  """
  array = validation.measurement_array(measurement, image_size, crop=crop)
  size = int(image_size)
  rows, cols = array.shape[0] // size, array.shape[1] // size
  return (
    array.reshape(rows, size, cols, size)
    .transpose(0, 2, 1, 3)
    .reshape(rows * cols, size, size)
  )


@dataclasses.dataclass(frozen=True)
class PatchSpectra:
  """The data of EM, reduced to what the E-step needs.

  Attributes:
    spectra: complex [B, C, S, 2L, L+1]: rfft2d of the zero-padded patches,
      B measurements (batch), C chunks of S patches each.
    squared_norms: float [B, C, S]: ||M_m||_F^2 (for the log-likelihood).
    mask: float [B, C, S]: 1 for a real patch, 0 for chunk padding.
    num_patches: int [B] numpy: D of each batch element.
  """

  spectra: tf.Tensor
  squared_norms: tf.Tensor
  mask: tf.Tensor
  num_patches: np.ndarray

  @property
  def image_size(self):
    return int(self.spectra.shape[-2]) // 2


def grid_offsets(image_size, per_axis):
  """The (row, col) offsets of per_axis^2 patch grids, eq. (9)'s first.

  The grids are moved by multiples of L / per_axis pixels (rounded down)
  along each axis: per_axis = 2 gives (0, 0), (0, h), (h, 0), (h, h) with
  h = L // 2; per_axis = L gives every offset, i.e. every L x L window.
  """
  size = int(image_size)
  if isinstance(per_axis, bool) or not 1 <= int(per_axis) <= size:
    raise ValueError(
      f"grids per axis must be an integer from 1 to L = {size}, got "
      f"{per_axis!r}."
    )
  steps = [(i * size) // int(per_axis) for i in range(int(per_axis))]
  return [(top, left) for top in steps for left in steps]


def offset_grid_patches(measurement, image_size, per_axis, crop=False):
  """The L x L patches of a measurement on several offset grids.

  A copy that eq. (9)'s grid cuts into up to four pieces lies mostly inside
  one patch of a grid moved by half a patch (and wholly inside one with
  every offset, per_axis = L); EM on the patches of all grids maximises a
  composite likelihood (each grid's patch likelihood, eq. 13, summed), in
  which every pixel counts per_axis^2 times. Grid (a, b) cuts M[a:, b:]
  with its trailing partial rows and columns dropped.

  Args:
    measurement: array [H, W], H and W multiples of L (or crop=True).
    image_size: L.
    per_axis: grids per axis (`grid_offsets`).
    crop: as `extract_patches`, for grid 0.

  Returns:
    float32 [D_total, L, L]: grid 0's patches, then each other grid's.
  """
  size = int(image_size)
  offsets = grid_offsets(size, per_axis)
  parts = [extract_patches(measurement, size, crop)]  # [D, L, L]
  height, width = np.shape(measurement)
  rows, cols = (height // size) * size, (width // size) * size
  for top, left in offsets[1:]:
    window = np.asarray(measurement)[
      top : top + rows - size, left : left + cols - size
    ]
    if min(window.shape) >= size:
      parts.append(extract_patches(window, size, crop=True))
  return np.concatenate(parts)


def patch_spectra(patch_sets, chunk_size=64, dtype=tf.float32):
  """Spectra of zero-padded patches, chunked, for one or more measurements.

  Args:
    patch_sets: a list of B float arrays [D_b, L, L] (each element of the
      batch may hold patches of several micrographs, concatenated).
    chunk_size: patches per chunk S; the number of chunks C is
      ceil(max_b D_b / S). S shrinks to max_b D_b when that is smaller.
    dtype: tf.float32 or tf.float64.

  Returns:
    `PatchSpectra`.
  """
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  size = int(np.shape(patch_sets[0])[-1])
  counts = np.array([len(p) for p in patch_sets])
  if np.any(counts == 0):
    raise ValueError("Every measurement must hold at least one patch.")
  chunk = min(int(chunk_size), int(counts.max()))
  num_chunks = -(-int(counts.max()) // chunk)
  total = num_chunks * chunk
  np_dtype = np.float32 if dtype == tf.float32 else np.float64
  padded = np.zeros((len(patch_sets), total, size, size), np_dtype)
  mask = np.zeros((len(patch_sets), total), np_dtype)
  for b, patches in enumerate(patch_sets):
    padded[b, : len(patches)] = patches
    mask[b, : len(patches)] = 1.0
  squared_norms = np.sum(padded.astype(np.float64) ** 2, axis=(2, 3))
  spectra = tf.signal.rfft2d(
    tf.pad(tf.constant(padded), [[0, 0], [0, 0], [0, size], [0, size]]),
  )  # [B, total, 2L, L+1]
  shape = [len(patch_sets), num_chunks, chunk]
  # Norms past float32's range become Inf here; the resolution check names
  # the cause (em.problem.check_resolution), without numpy's warning first.
  with np.errstate(over="ignore"):
    norms = squared_norms.astype(np_dtype).reshape(shape)
  return PatchSpectra(
    spectra=tf.reshape(spectra, shape + [2 * size, size + 1]),
    squared_norms=tf.constant(norms),
    mask=tf.constant(mask.reshape(shape)),
    num_patches=counts,
  )


def balanced_chunk_size(num_patches, chunk_size, num_streams=1):
  """A chunk size near `chunk_size` that splits the patches evenly.

  It aims at a chunk count that is a multiple of `num_streams` (fewer
  chunks only when rounding the chunk size up leaves the last ones empty)
  and padding stays below one patch per chunk (121 patches in 2 streams:
  chunks of 61, not 64).
  """
  streams = max(int(num_streams), 1)
  per_round = streams * max(int(chunk_size), 1)
  num_chunks = streams * max(1, -(-int(num_patches) // per_round))
  return max(1, -(-int(num_patches) // num_chunks))


def band_matrix(image_size, dtype=tf.float32):
  """B[y, l] = [(y - l) mod 2L < L] for y < L, l < 2L: visibility of pixel y.

  Row y of the rotated image is seen in the cropped patch under shift l
  exactly when B[y, l] = 1, so ||C T_l Z G||^2 = (B^T (G*G) B)[lx, ly].

  Returns:
    Tensor [L, 2L] of 0/1 values.
  """
  size = int(image_size)
  y = np.arange(size)[:, None]
  shift = np.arange(2 * size)[None, :]
  return tf.constant(
    ((y - shift) % (2 * size) < size).astype(np.float64), dtype=dtype
  )
