"""Scratch files holding micrographs' patch spectra between passes.

The spectra of micrographs that the memory budget does not let stay in
memory are written to one scratch file each on the first pass and read back
on later passes: a read from the page cache or the disk costs a fraction of
reading the micrograph, cutting it and transforming it again (eq. 9). A
spill file takes its spectra's size on disk (about 280 MB per 4088 x 4088
micrograph at L = 28); the squared norms and the mask stay in memory.

Reads go a block of chunks at a time (`block_ranges`), in the summing
thread, into one reused aligned buffer: new memory would be faulted in
page by page, which costs more than the read itself.
"""

import os
import shutil
import tempfile

import numpy as np

from mtd_tf.em import micrograph_spectra

__all__ = ["SpillFiles", "BLOCK_BYTES", "block_ranges"]

# Bytes of spectra summed at a time (one call of the compiled sum), read
# from a scratch file or cut from a unit held in memory. TensorFlow's CPU
# allocator keeps what a call needed for the next ones, so the peak of a
# pass grows with the block: measured at L = 28, K = 4 on 4088 x 4088
# micrographs, 64 MiB blocks cost 2 % more time per pass than whole
# micrographs (264 MiB) and 370 MiB less peak memory; 32 MiB 4 %, 16 MiB
# 17 %.
BLOCK_BYTES = 64 << 20


def block_ranges(num_chunks, chunk_bytes):
  """[(begin, end)] of the blocks of a unit's chunks: `BLOCK_BYTES` each
  (at least one chunk), the same in every pass, so that sums are added in
  one order whether a unit is read, cached or spilled."""
  step = max(1, BLOCK_BYTES // max(int(chunk_bytes), 1))
  return [
    (begin, min(begin + step, int(num_chunks)))
    for begin in range(0, int(num_chunks), step)
  ]


class SpillFiles:
  """The scratch files of the spectra of some micrographs, by index.

  Each entry holds a micrograph's spectra, complex [C, S, 2L, L+1], in a
  file, and its squared norms and mask, float [C, S], in memory.
  """

  def __init__(self, dtype, parent=None):
    """Creates no file yet.

    Args:
      dtype: tf.float32 or tf.float64, the real dtype of the spectra.
      parent: folder of the scratch files (a new temporary folder inside
        it, removed by `close` or when this object is collected); None:
        the system's temporary folder.
    """
    self._complex = micrograph_spectra.complex_dtype(dtype)
    self._parent = parent
    self._dir = None
    self._files = {}  # index -> (file, spectra shape, norms, mask)
    self._buffer = None  # reused by the synchronous reads

  def __contains__(self, index):
    return int(index) in self._files

  def holds_all(self, indices):
    """Whether every micrograph of `indices` is spilled."""
    return all(int(i) in self._files for i in indices)

  @property
  def nbytes(self):
    """Bytes of spectra in the scratch files."""
    return sum(os.path.getsize(item[0]) for item in self._files.values())

  def write(self, index, item):
    """Writes micrograph `index`'s spectra to a scratch file.

    Args:
      index: the micrograph's index.
      item: (spectra complex [C, S, 2L, L+1], squared norms float [C, S],
        mask float [C, S]), arrays or tensors.
    """
    if self._dir is None:
      self._dir = tempfile.mkdtemp(prefix="mtd_spectra_", dir=self._parent)
    spectra, squared_norms, mask = (np.asarray(t) for t in item)
    path = os.path.join(self._dir, f"{index}.bin")
    spectra.tofile(path)
    self._files[index] = (path, spectra.shape, squared_norms, mask)

  def fold(self, fn, total, indices):
    """Folds `fn` over the spilled micrographs `indices`, block by block.

    Args:
      fn: `fn(total, item) -> total`, item a block (spectra complex
        [c, S, 2L, L+1], squared norms float [c, S], mask float [c, S]) of
        numpy arrays valid only during the call (the next block is read
        into the same buffer once `fn` has returned).
      total: the initial value.
      indices: spilled micrographs, in the order they are folded.

    Returns:
      the last `fn`'s value.
    """
    blocks = self.blocks(indices)
    if not len(blocks):
      return total
    need = max(self._block_bytes(b) for b in blocks)
    if self._buffer is None or self._buffer.nbytes < need:
      self._buffer = micrograph_spectra.aligned_array(
        [need], np.uint8, zero=False
      )
    for block in blocks:
      # `fn` has returned (eager, synchronous) before the next read.
      item = self.read(block, into=self._buffer)
      total = fn(total, item)
      del item
    return total

  def blocks(self, indices):
    """(micrograph, first chunk, end chunk) of the reads, in order.

    A block holds at most `BLOCK_BYTES` of spectra (`block_ranges`).

    Returns:
      int64 numpy [num_blocks, 3].
    """
    blocks = []
    for index in indices:
      _, shape, _, _ = self._files[int(index)]
      blocks.extend(
        (int(index), begin, end)
        for begin, end in block_ranges(shape[0], self._chunk_bytes(index))
      )
    return np.array(blocks, np.int64).reshape(-1, 3)

  def read(self, block, into=None):
    """Chunks [begin, end) of a micrograph's spectra from its scratch file.

    Args:
      block: (micrograph, first chunk, end chunk).
      into: None, or an aligned uint8 buffer the spectra are read into (a
        buffer written again for every block: only for a caller that is
        done with the previous block); too small a buffer is not used.

    Returns:
      numpy (spectra complex [end - begin, S, 2L, L+1], squared norms
      float [end - begin, S], mask float [end - begin, S]).

    Raises:
      OSError: if the scratch file is shorter than its spectra.
    """
    index, begin, end = (int(x) for x in block)
    path, shape, squared_norms, mask = self._files[index]
    spectra = self._block_array(block, shape, into)  # [c, S, 2L, L+1]
    with open(path, "rb") as f:
      f.seek(begin * self._chunk_bytes(index))
      if f.readinto(memoryview(spectra.reshape(-1).view(np.uint8))) != (
        spectra.nbytes
      ):
        raise OSError(f"Scratch file {path} is truncated.")
    return spectra, squared_norms[begin:end], mask[begin:end]

  def close(self):
    """Drops the read buffer and removes the scratch files."""
    self._buffer = None
    self._files.clear()
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _block_array(self, block, shape, into):
    """The array a block is read into: a view of `into` if it is big enough."""
    _, begin, end = (int(x) for x in block)
    dtype = np.dtype(self._complex.as_numpy_dtype)
    block_shape = (end - begin,) + tuple(shape[1:])
    nbytes = self._block_bytes(block)
    if into is None or into.nbytes < nbytes:
      return micrograph_spectra.aligned_array(block_shape, dtype, zero=False)
    return into[:nbytes].view(dtype).reshape(block_shape)

  def _chunk_bytes(self, index):
    """Bytes of one chunk of micrograph `index`'s spilled spectra."""
    _, shape, _, _ = self._files[int(index)]
    return int(np.prod(shape[1:])) * self._complex.size

  def _block_bytes(self, block):
    """Bytes of a block (micrograph, first chunk, end chunk)."""
    index, begin, end = (int(x) for x in block)
    return (end - begin) * self._chunk_bytes(index)
