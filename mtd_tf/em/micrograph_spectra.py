"""One micrograph file's patch spectra, eq. (9), laid out in chunks.

A micrograph file (.mrc, .npy, .npz; see `io.load_measurement`) is cut into
its D non-overlapping L x L patches, row-major as `patches.extract_patches`,
and each patch M_m is turned into the rfft2d of its zero-padded 2L x 2L
version Z M_m (as `patches.patch_spectra`), with ||M_m||^2 for the
log-likelihood (eq. 15). The patches are transformed a block of patch rows
at a time straight into one aligned spectra array, padded to C whole chunks
of S patches: besides the micrograph, nothing of its size is held twice,
and TensorFlow shares (does not copy) the aligned array. The patches are
counted from the file's header, without reading its pixels where possible.
"""

import os

import numpy as np
import tensorflow as tf

from mtd_tf.model import io as io_lib
from mtd_tf.model import patches as patches_lib

__all__ = [
  "aligned_array",
  "complex_dtype",
  "count_patches",
  "grid_shape",
  "item_bytes",
  "load_spectra",
  "measurement_shape",
  "patch_grids",
  "spectra_bytes",
]

# numpy -> tensor conversion shares (does not copy) buffers aligned to this.
_ALIGN = 64
# Patches transformed at a time when a micrograph is first read.
_BLOCK_PATCHES = 2048


def spectra_bytes(num_patches, image_size, dtype=tf.float32):
  """Bytes of the spectra of `num_patches` patches: [D, 2L, L+1] complex."""
  itemsize = 2 * tf.as_dtype(dtype).size
  return (
    int(num_patches) * 2 * int(image_size) * (int(image_size) + 1) * (itemsize)
  )


def complex_dtype(dtype):
  """tf.complex64 for tf.float32, tf.complex128 for tf.float64."""
  return tf.complex64 if tf.as_dtype(dtype) == tf.float32 else tf.complex128


def item_bytes(item):
  """Bytes of a (spectra, squared norms, mask) triple (arrays or tensors)."""
  return sum(
    int(np.prod(t.shape)) * np.dtype(_numpy_dtype(t)).itemsize for t in item
  )


def _numpy_dtype(array):
  """The numpy dtype of a numpy array or a tensor."""
  dtype = array.dtype
  return getattr(dtype, "as_numpy_dtype", dtype)


def aligned_array(shape, dtype, zero=True):
  """A numpy array whose data start on an `_ALIGN`-byte boundary.

  Args:
    shape: the array's shape.
    dtype: its numpy dtype.
    zero: fill it with zeros (False: leave it uninitialised).

  Returns:
    numpy array [shape] of `dtype`, a view of a slightly larger uint8 one.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = (np.zeros if zero else np.empty)(nbytes + _ALIGN, np.uint8)
  offset = (-raw.ctypes.data) % _ALIGN
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def measurement_shape(path):
  """(H, W) of a micrograph file without reading its pixels where possible."""
  lower = path.lower()
  if lower.endswith(".npy"):
    return tuple(np.load(path, mmap_mode="r").shape)
  if lower.endswith((".mrc", ".mrcs", ".map")):
    import mrcfile  # pylint: disable=g-import-not-at-top

    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
      header = mrc.header
      depth = int(header.nz)
      shape = (int(header.ny), int(header.nx))
    return shape if depth <= 1 else (depth,) + shape
  return tuple(io_lib.load_measurement(path).measurement.shape)


def grid_shape(path, image_size, crop=False, grid=0):
  """(rows, cols) of patches of one grid of a micrograph file.

  Grid 0 is eq. (9)'s; a moved grid (`patches.offset_grid_patches`) has
  one row and one column fewer (none when the micrograph is one patch
  high or wide).
  """
  rows, cols = _patch_rows_cols(path, image_size, crop)
  if int(grid) == 0:
    return rows, cols
  if rows < 2 or cols < 2:
    return 0, 0
  return rows - 1, cols - 1


def _patch_rows_cols(path, image_size, crop):
  shape = measurement_shape(path)
  if len(shape) != 2:
    raise ValueError(
      f"{path} holds an array of shape {shape}; a "
      "micrograph must be two-dimensional."
    )
  height, width = shape
  if not crop and (height % image_size or width % image_size):
    raise ValueError(
      f"{path} is {height} x {width}, not a multiple of L = "
      f"{image_size}; pass crop=True to drop the remainder."
    )
  return height // image_size, width // image_size


def count_patches(path, image_size, crop=False, grids_per_axis=1, grid=None):
  """D = (H // L) * (W // L), the patches of a micrograph file.

  Args:
    path: the micrograph file.
    image_size: L (int >= 1).
    crop: drop trailing rows and columns beyond a multiple of L.
    grids_per_axis: the patches of every offset grid
      (`patches.offset_grid_patches`) when > 1: each grid moved by (a, b)
      adds (H // L - 1) (W // L - 1) patches.
    grid: None (all grids), or the index of one grid (0: eq. (9)'s).

  Returns:
    int D (0 when the micrograph is smaller than L, with crop).

  Raises:
    ValueError: if the file is not two-dimensional, or (without crop) its
      sides are not multiples of L.
  """
  rows, cols = _patch_rows_cols(path, image_size, crop)
  moved = max(rows - 1, 0) * max(cols - 1, 0)  # on a moved grid
  if grid is not None:
    return rows * cols if int(grid) == 0 else moved
  grids = len(patches_lib.grid_offsets(image_size, grids_per_axis))
  return rows * cols + (grids - 1) * moved


def load_spectra(
  path,
  image_size,
  chunk_size,
  dtype=tf.float32,
  crop=False,
  background=0.0,
  grids_per_axis=1,
  grid=None,
  gain=1.0,
  rows=None,
):
  """Reads a micrograph file and transforms its patches, in chunks.

  Args:
    path: the micrograph file, as counted by `count_patches`.
    image_size: L.
    chunk_size: S, patches per chunk.
    dtype: tf.float32 or tf.float64, of the norms and mask (the spectra
      are the matching complex dtype).
    crop: drop trailing rows and columns beyond a multiple of L.
    background: the micrograph's background level
      (`noise.estimate_noise`), subtracted from every pixel first, in the
      file's float precision (float32 for integer files), as the
      in-memory path does.
    grids_per_axis: with > 1, the patches of every offset grid too, in
      the order of `patches.offset_grid_patches` (grid 0's first).
    grid: None (all grids), or the index of the one grid to transform.
    gain: the data's units per the prior's (data = gain x image): the
      pixels, background removed, are divided by it.
    rows: None (every patch row), or (begin, end): only those patch rows
      of the one `grid` (a band of it).

  Returns:
    numpy (spectra, squared_norms, mask): complex [C, S, 2L, L+1] rfft2d
    of the zero-padded patches (aligned), float [C, S] ||M_m||^2 and
    float [C, S] 1 for a real patch, 0 for padding; C = ceil(D / S), the
    padding patches are zero.

  Raises:
    ValueError: if the file's sides are no longer multiples of L.
  """
  size = int(image_size)
  real = tf.as_dtype(dtype).as_numpy_dtype
  grids = patch_grids(
    path, size, crop, background, grids_per_axis, gain, grid, rows
  )
  count = sum(g.shape[0] * g.shape[2] for g in grids)
  num_chunks = -(-count // chunk_size)
  spectra = aligned_array(
    (num_chunks * chunk_size, 2 * size, size + 1),
    complex_dtype(dtype).as_numpy_dtype,
  )  # [C S, 2L, L+1]
  squared_norms = np.zeros(num_chunks * chunk_size, real)  # [C S]
  begin = 0
  for grid in grids:
    end = begin + grid.shape[0] * grid.shape[2]
    _transform_rows(grid, spectra[begin:end], squared_norms[begin:end])
    begin = end
  del grids
  mask = np.zeros(num_chunks * chunk_size, real)  # [C S]
  mask[:count] = 1.0
  shape = (num_chunks, chunk_size)
  return (
    spectra.reshape(shape + (2 * size, size + 1)),  # [C, S, 2L, L+1]
    squared_norms.reshape(shape),  # [C, S]
    mask.reshape(shape),  # [C, S]
  )


def patch_grids(
  path,
  size,
  crop,
  background=0.0,
  grids_per_axis=1,
  gain=1.0,
  grid=None,
  rows=None,
):
  """The micrograph's patches on each grid, [rows, L, cols, L].

  Patch (i, j) of a grid is grid[i, :, j]; without crop the file must
  still have sides that are multiples of L (it was checked by
  `count_patches`). Grid (a, b) cuts the pixels [a, a + (rows - 1) L) x
  [b, b + (cols - 1) L), as `patches.offset_grid_patches`. A nonzero
  background is subtracted (and the gain divided out) on what is cut
  only: a new array of that size; otherwise the grids are views.

  Args:
    grid: None (every grid), or the index of the one grid returned.
    rows: None, or (begin, end): the patch rows of the one `grid` cut.
  """
  measurement = io_lib.load_measurement(path).measurement  # [H, W]
  num_rows, num_cols = (
    measurement.shape[0] // size,
    measurement.shape[1] // size,
  )
  if not crop and measurement.shape != (num_rows * size, num_cols * size):
    raise ValueError(f"{path} changed since it was checked.")
  windows = [(0, 0, num_rows, num_cols)]  # (top, left, rows, cols)
  if num_rows > 1 and num_cols > 1:
    windows += [
      (top, left, num_rows - 1, num_cols - 1)
      for top, left in patches_lib.grid_offsets(size, grids_per_axis)[1:]
    ]
  if grid is not None:
    windows = windows[int(grid) : int(grid) + 1]
  grids = []
  for top, left, grid_rows, grid_cols in windows:
    begin, end = (0, grid_rows) if rows is None else rows
    window = measurement[
      top + begin * size : top + end * size, left : left + grid_cols * size
    ]  # a view
    grids.append(
      _calibrated(window, background, gain).reshape(
        end - begin, size, grid_cols, size
      )
    )  # [rows, L, cols, L]
  return grids


def _calibrated(pixels, background, gain):
  """pixels less the background, divided by the gain (a new array), or
  the pixels themselves where there is nothing to do."""
  if not background and gain == 1.0:
    return pixels
  if not np.issubdtype(pixels.dtype, np.floating):
    pixels = pixels.astype(np.float32)
  pixels = pixels - np.asarray(background, pixels.dtype)
  if gain != 1.0:  # as the in-memory path: float32 division
    pixels = pixels / np.asarray(gain, pixels.dtype)
  return pixels


def _transform_rows(grid, spectra, squared_norms):
  """Fills spectra and norms of grid's patches, a block of rows at a time.

  Args:
    grid: [rows, L, cols, L] patches (see `_patch_grids`).
    spectra: complex [>= rows cols, 2L, L+1], written in place.
    squared_norms: float [>= rows cols], written in place; its dtype is
      the dtype the patches are transformed in.
  """
  import scipy.fft  # pylint: disable=g-import-not-at-top

  rows, size, cols, _ = grid.shape
  block_rows = max(1, _BLOCK_PATCHES // cols)
  for begin in range(0, rows, block_rows):
    end = min(begin + block_rows, rows)
    # Row-major patches of these grid rows, as `patches.extract_patches`.
    block = np.ascontiguousarray(
      grid[begin:end].transpose(0, 2, 1, 3), dtype=squared_norms.dtype
    ).reshape(-1, size, size)  # [n, L, L]
    # Z M_m of eq. (9): the transform zero-pads to 2L x 2L.
    spectra[begin * cols : end * cols] = scipy.fft.rfft2(
      block, s=(2 * size, 2 * size), workers=os.cpu_count() or 1
    )  # [n, 2L, L+1]
    # ||M_m||^2 summed in float64.
    squared_norms[begin * cols : end * cols] = np.sum(
      np.square(block, dtype=np.float64), axis=(1, 2)
    )  # [n]
