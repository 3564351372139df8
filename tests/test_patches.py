"""Patches and their spectra against brute force (eq. 9)."""

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf.model import patches


@pytest.mark.parametrize("shape,size", [((12, 8), 4), ((9, 9), 3), ((5, 5), 5)])
def test_extract_patches_is_row_major(shape, size, rng):
  measurement = rng.standard_normal(shape)
  got = patches.extract_patches(measurement, size)
  cols = shape[1] // size
  assert got.shape == ((shape[0] // size) * cols, size, size)
  assert got.dtype == np.float32
  for m in range(len(got)):
    i, j = divmod(m, cols)  # Patch m = i (W // L) + j.
    np.testing.assert_array_equal(
      got[m],
      measurement[i * size : (i + 1) * size, j * size : (j + 1) * size].astype(
        np.float32
      ),
    )


def test_crop_drops_trailing_rows_and_columns(rng):
  measurement = rng.standard_normal((13, 10))
  with pytest.raises(ValueError, match="not a multiple"):
    patches.extract_patches(measurement, 4)
  got = patches.extract_patches(measurement, 4, crop=True)
  np.testing.assert_array_equal(
    got, patches.extract_patches(measurement[:12, :8], 4)
  )


@pytest.mark.parametrize("num_patches", [1, 7, 64, 121, 1000])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_balanced_chunk_size(num_patches, chunk_size, streams):
  chunk = patches.balanced_chunk_size(num_patches, chunk_size, streams)
  num_chunks = -(-num_patches // chunk)
  padded = num_chunks * chunk
  assert 1 <= chunk <= max(chunk_size, 1)
  # Aimed at a multiple of `streams` chunks, never more chunks than that.
  target = streams * max(1, -(-num_patches // (streams * chunk_size)))
  assert num_chunks <= target
  if num_patches % target == 0:
    assert num_chunks == target
  # Padding stays below one patch per chunk.
  assert padded - num_patches < num_chunks


def test_balanced_chunk_size_example_of_the_docstring():
  assert patches.balanced_chunk_size(121, 64, 2) == 61


@pytest.mark.parametrize("size", [1, 3, 4])
def test_band_matrix_is_the_visibility_of_each_pixel(size):
  band = patches.band_matrix(size, tf.float64).numpy()
  assert band.shape == (size, 2 * size)
  for y in range(size):
    for shift in range(2 * size):
      # Row y of Z G, rolled by `shift`, lands inside the crop C.
      visible = (y + shift) % (2 * size) < size
      assert band[y, (-shift) % (2 * size)] == float(visible)


def test_patch_spectra_are_ffts_of_zero_padded_patches(rng):
  sets = [rng.standard_normal((5, 3, 3)), rng.standard_normal((2, 3, 3))]
  data = patches.patch_spectra(sets, chunk_size=2, dtype=tf.float64)
  assert data.spectra.shape == (2, 3, 2, 6, 4)  # [B, C, S, 2L, L+1]
  np.testing.assert_array_equal(data.num_patches, [5, 2])
  spectra = data.spectra.numpy().reshape(2, 6, 6, 4)
  mask = data.mask.numpy().reshape(2, 6)
  norms = data.squared_norms.numpy().reshape(2, 6)
  for b, patch_set in enumerate(sets):
    for m in range(6):
      if m < len(patch_set):
        padded = np.zeros((6, 6))
        padded[:3, :3] = patch_set[m]
        np.testing.assert_allclose(
          spectra[b, m], np.fft.rfft2(padded), atol=1e-12
        )
        assert mask[b, m] == 1
        assert norms[b, m] == pytest.approx(np.sum(patch_set[m] ** 2))
      else:
        assert mask[b, m] == 0 and norms[b, m] == 0
        assert np.all(spectra[b, m] == 0)


@pytest.mark.parametrize("size", [4, 5])
def test_offset_grid_patches_are_the_moved_grids(size, rng):
  measurement = rng.normal(size=(6 * size, 5 * size)).astype(np.float32)
  first = patches.extract_patches(measurement, size)
  np.testing.assert_array_equal(
    patches.offset_grid_patches(measurement, size, 1), first
  )
  got = patches.offset_grid_patches(measurement, size, 2)
  half = size // 2
  want = [first]
  for top, left in [(0, half), (half, 0), (half, half)]:
    want.append(
      np.stack(
        [
          measurement[r : r + size, c : c + size]
          for r in range(top, top + 5 * size, size)
          for c in range(left, left + 4 * size, size)
        ]
      )
    )
  np.testing.assert_array_equal(got, np.concatenate(want))
  # Every offset: every L x L window of the measurement appears once.
  every = patches.offset_grid_patches(measurement, size, size)
  windows = np.lib.stride_tricks.sliding_window_view(
    measurement, (size, size)
  ).reshape(-1, size, size)
  assert len(every) == 6 * 5 + (size**2 - 1) * 5 * 4
  assert {w.tobytes() for w in every} <= {w.tobytes() for w in windows}
  assert len({w.tobytes() for w in every}) == len(every)
  with pytest.raises(ValueError, match="grids per axis"):
    patches.grid_offsets(size, size + 1)
