"""Out-of-core E-step: micrographs streamed from disk, eq. (14)-(16).

The E-step's statistics are sums over patches (`estep.PartialSums`), so
they can be accumulated one micrograph at a time. `StreamingData` keeps a
list of micrograph files (.mrc, .npy, .npz; see `io.load_measurement`) and,
each time statistics are asked for, runs a `tf.data` pipeline that reads a
micrograph, cuts its patches (`patches.extract_patches`) and transforms
them (the rfft2d of the zero-padded patches, as `patches.patch_spectra`)
while the compiled `estep.make_partial_sums` loop sums the previous one.
The memory budget bounds the spectra held at once: two micrographs in
flight (the one being summed and the one the pipeline prepares) plus a
cache of micrographs kept after the first pass. The spectra of the other
micrographs are spilled to a scratch file on the first pass and read back
on the next ones (a read from the page cache or the disk costs a fraction
of reading the micrograph, cutting it and transforming it again); with
`spill=False` they are read and transformed again on every pass. Peak
memory therefore does not grow with the number of micrographs; the spill
files take their spectra's size on disk (about 280 MB per 4088 x 4088
micrograph at L = 28).
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from mtd_tf.em import estep as estep_lib
from mtd_tf.model import io as io_lib
from mtd_tf.model import patches as patches_lib

__all__ = [
  "StreamingData",
  "shard",
  "spectra_bytes",
  "DEFAULT_MEMORY_BUDGET_BYTES",
  "IN_FLIGHT",
]

# Spectra held at once (768 MiB): two 4088 x 4088 micrographs in flight at
# L = 28 in float32 (264 MiB each) and none cached, so that peak memory is
# the same for 2 micrographs as for 1,000; smaller micrographs are cached in
# what is left.
DEFAULT_MEMORY_BUDGET_BYTES = 768 << 20
# Micrographs whose spectra are in memory while streaming: the one summed
# and the one the pipeline prepares.
IN_FLIGHT = 2
# numpy -> tensor conversion shares (does not copy) buffers aligned to this.
_ALIGN = 64
# Patches transformed at a time when a micrograph is first read.
_BLOCK_PATCHES = 2048
# Bytes of spilled spectra read at a time: a whole micrograph's (264 MiB
# at 4088 x 4088, L = 28), into one reused buffer (one of the `IN_FLIGHT`
# micrographs of the budget). Each block is one call of the compiled sum,
# whose fixed cost made 24 MiB blocks 1.4 x slower per spilled patch.
_BLOCK_BYTES = 1 << 30


def spectra_bytes(num_patches, image_size, dtype=tf.float32):
  """Bytes of the spectra of `num_patches` patches: [D, 2L, L+1] complex."""
  itemsize = 2 * tf.as_dtype(dtype).size
  return (
    int(num_patches) * 2 * int(image_size) * (int(image_size) + 1) * (itemsize)
  )


def shard(paths, num_workers, worker_index):
  """The micrographs of one worker: a deterministic round-robin share.

  Args:
    paths: list of paths and glob patterns (expanded by `io.expand_paths`,
      globs sorted), the same list on every worker.
    num_workers: number of workers >= 1.
    worker_index: this worker's index in [0, num_workers).

  Returns:
    list of paths: paths[worker_index::num_workers] of the expanded list.

  Raises:
    ValueError: on a bad worker count or index, or fewer files than workers.
    FileNotFoundError: if a path or pattern matches no file.
  """
  num_workers, worker_index = int(num_workers), int(worker_index)
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
  if not 0 <= worker_index < num_workers:
    raise ValueError(
      f"worker_index must be in [0, {num_workers}), got {worker_index}."
    )
  expanded = io_lib.expand_paths(
    [paths] if isinstance(paths, str) else list(paths)
  )
  if len(expanded) < num_workers:
    raise ValueError(
      f"{len(expanded)} micrographs cannot feed {num_workers} "
      "workers: use fewer workers or more micrographs."
    )
  return expanded[worker_index::num_workers]


def _measurement_shape(path):
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


class StreamingData:
  """Micrographs on disk that share one image, as input of the E-step.

  Attributes:
    paths: the micrograph files, in order.
    image_size: L.
    dtype: tf.float32 or tf.float64, of the spectra and statistics.
    num_patches: D, the patches of all micrographs together (int).
    patch_counts: patches per micrograph, int numpy [num_micrographs].
    cached_bytes: bytes of spectra held in memory now.
  """

  def __init__(
    self,
    paths,
    image_size,
    chunk_size=64,
    dtype=tf.float32,
    memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
    crop=False,
    num_streams=1,
    spill=True,
    spill_dir=None,
  ):
    """Checks the files and counts their patches (no pixels are read).

    Args:
      paths: a path, a glob pattern, or a list of them (`io.expand_paths`).
      image_size: L.
      chunk_size: patches per chunk of the compiled loop (about).
      dtype: tf.float32 or tf.float64 (or their names).
      memory_budget_bytes: bytes of spectra held at once, the `IN_FLIGHT`
        micrographs being streamed included; what is left after those is
        the cache kept between passes (0: nothing is cached).
      crop: drop trailing rows and columns beyond a multiple of L.
      num_streams: concurrent chunk loops per micrograph (as `estep`).
      spill: write the spectra of micrographs that are not cached to
        scratch files on the first pass and read them back on later passes
        (False: read and transform the micrograph again every pass).
      spill_dir: folder of the scratch files (a new temporary folder inside
        it, removed by `close` or when this object is collected); None: the
        system's temporary folder.

    Raises:
      ValueError: on a bad size, chunk size, dtype, budget, or a micrograph
        whose sides are not multiples of L (without crop).
      FileNotFoundError: on a missing file or a pattern matching nothing.
    """
    self.paths = io_lib.expand_paths(
      [paths] if isinstance(paths, str) else list(paths)
    )
    if not self.paths:
      raise ValueError("StreamingData needs at least one micrograph file.")
    self.image_size = int(image_size)
    if self.image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {image_size}.")
    if int(chunk_size) < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    self._chunk_size = int(chunk_size)
    self._dtype = tf.as_dtype(dtype)
    if self._dtype not in (tf.float32, tf.float64):
      raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
    if not memory_budget_bytes >= 0:
      raise ValueError(
        f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}."
      )
    self._budget = memory_budget_bytes
    self._crop = bool(crop)
    self._streams = max(int(num_streams), 1)
    counts = []
    for path in self.paths:
      shape = _measurement_shape(path)
      if len(shape) != 2:
        raise ValueError(
          f"{path} holds an array of shape {shape}; a "
          "micrograph must be two-dimensional."
        )
      height, width = shape
      if not self._crop and (
        height % self.image_size or width % self.image_size
      ):
        raise ValueError(
          f"{path} is {height} x {width}, not a multiple of L = "
          f"{self.image_size}; pass crop=True to drop the remainder."
        )
      counts.append((height // self.image_size) * (width // self.image_size))
    self.patch_counts = np.array(counts, np.int64)
    if np.any(self.patch_counts == 0):
      raise ValueError(f"A micrograph is smaller than L = {self.image_size}.")
    self._cache = {}
    self._spilled = {}  # index -> (file, spectra shape, norms, mask)
    self._read_buffer = None  # reused by the synchronous spilled reads
    self._spill = bool(spill)
    self._spill_parent = spill_dir
    self._spill_dir = None
    self._sums = {}  # compiled per-micrograph sums, per RotationSet

  @property
  def dtype(self):
    """tf.float32 or tf.float64."""
    return self._dtype

  @property
  def num_patches(self):
    return int(self.patch_counts.sum())

  @property
  def cached_bytes(self):
    return sum(_nbytes(item) for item in self._cache.values())

  @property
  def spilled_bytes(self):
    """Bytes of spectra in the scratch files."""
    return sum(os.path.getsize(item[0]) for item in self._spilled.values())

  def _cache_room(self):
    """Bytes the cache may hold: the budget less the micrographs in flight."""
    largest = spectra_bytes(
      max(
        -(-int(c) // self._chunks(i)) * self._chunks(i)
        for i, c in enumerate(self.patch_counts)
      ),
      self.image_size,
      self._dtype,
    )
    return self._budget - IN_FLIGHT * largest

  def _spill_item(self, index, item):
    """Writes micrograph `index`'s spectra to a scratch file."""
    if self._spill_dir is None:
      self._spill_dir = tempfile.mkdtemp(
        prefix="mtd_spectra_", dir=self._spill_parent
      )
    spectra, squared_norms, mask = (np.asarray(t) for t in item)
    path = os.path.join(self._spill_dir, f"{index}.bin")
    spectra.tofile(path)
    self._spilled[index] = (path, spectra.shape, squared_norms, mask)

  def _blocks(self, indices):
    """(micrograph, first chunk, end chunk) of the spilled reads, in order.

    A block holds at most `_BLOCK_BYTES` of spectra (in practice a whole
    micrograph's); the synchronous reads put every block into one reused
    buffer, so that its pages are not faulted in anew for every read.
    """
    blocks = []
    for index in indices:
      _, shape, _, _ = self._spilled[int(index)]
      step = max(1, _BLOCK_BYTES // self._chunk_bytes(index))
      blocks.extend(
        (int(index), begin, min(begin + step, shape[0]))
        for begin in range(0, shape[0], step)
      )
    return np.array(blocks, np.int64).reshape(-1, 3)

  def _read_spilled(self, block, into=None):
    """Chunks [begin, end) of a micrograph's spectra from its scratch file.

    Args:
      block: (micrograph, first chunk, end chunk).
      into: None, or an aligned uint8 buffer the spectra are read into (a
        buffer written again for every block: new memory is faulted in
        page by page, which costs more than the read from the page cache;
        only for a caller that is done with the previous block).
    """
    index, begin, end = (int(x) for x in block)
    path, shape, squared_norms, mask = self._spilled[index]
    dtype = np.dtype(_complex(self._dtype).as_numpy_dtype)
    per_chunk = self._chunk_bytes(index)
    block_shape = (end - begin,) + tuple(shape[1:])
    if into is None or into.nbytes < self._block_bytes(block):
      spectra = _aligned_zeros(block_shape, dtype, zero=False)
    else:
      spectra = (
        into[: self._block_bytes(block)].view(dtype).reshape(block_shape)
      )
    with open(path, "rb") as f:
      f.seek(begin * per_chunk)
      if f.readinto(memoryview(spectra.reshape(-1).view(np.uint8))) != (
        spectra.nbytes
      ):
        raise OSError(f"Scratch file {path} is truncated.")
    return spectra, squared_norms[begin:end], mask[begin:end]

  def _chunk_bytes(self, index):
    """Bytes of one chunk of micrograph `index`'s spilled spectra."""
    _, shape, _, _ = self._spilled[int(index)]
    return int(np.prod(shape[1:])) * _complex(self._dtype).size

  def _block_bytes(self, block):
    """Bytes of a block (micrograph, first chunk, end chunk)."""
    index, begin, end = (int(x) for x in block)
    return (end - begin) * self._chunk_bytes(index)

  def close(self):
    """Drops the cache and removes the scratch files."""
    self._read_buffer = None
    self._cache.clear()
    self._spilled.clear()
    if self._spill_dir is not None:
      shutil.rmtree(self._spill_dir, ignore_errors=True)
      self._spill_dir = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _chunks(self, index):
    return patches_lib.balanced_chunk_size(
      int(self.patch_counts[index]), self._chunk_size, self._streams
    )

  def _load(self, index):
    """Reads micrograph `index`: spectra [C, S, 2L, L+1], norms, mask.

    The spectra are transformed a block of patch rows at a time straight
    into their (aligned, so that TensorFlow shares rather than copies it)
    array: besides the micrograph, nothing of its size is held twice.
    """
    import scipy.fft  # pylint: disable=g-import-not-at-top

    index = int(index)
    size = self.image_size
    measurement = io_lib.load_measurement(self.paths[index]).measurement
    rows, cols = measurement.shape[0] // size, measurement.shape[1] // size
    if not self._crop and measurement.shape != (rows * size, cols * size):
      raise ValueError(f"{self.paths[index]} changed since it was checked.")
    grid = measurement[: rows * size, : cols * size].reshape(
      rows, size, cols, size
    )  # a view: patch (i, j) is grid[i, :, j]
    count = rows * cols
    chunk = self._chunks(index)
    num_chunks = -(-count // chunk)
    real = self._dtype.as_numpy_dtype
    spectra = _aligned_zeros(
      (num_chunks * chunk, 2 * size, size + 1),
      _complex(self._dtype).as_numpy_dtype,
    )
    squared_norms = np.zeros(num_chunks * chunk, real)
    block_rows = max(1, _BLOCK_PATCHES // cols)
    for begin in range(0, rows, block_rows):
      end = min(begin + block_rows, rows)
      # Row-major patches of these grid rows, as `patches.extract_patches`.
      block = np.ascontiguousarray(
        grid[begin:end].transpose(0, 2, 1, 3), dtype=real
      ).reshape(-1, size, size)  # [n, L, L]
      # Z M_m of eq. (9): the transform zero-pads to 2L x 2L.
      spectra[begin * cols : end * cols] = scipy.fft.rfft2(
        block, s=(2 * size, 2 * size), workers=os.cpu_count() or 1
      )
      # ||M_m||^2 summed in float64.
      squared_norms[begin * cols : end * cols] = np.sum(
        np.square(block, dtype=np.float64), axis=(1, 2)
      )
    del measurement, grid
    mask = np.zeros(num_chunks * chunk, real)
    mask[:count] = 1.0
    shape = (num_chunks, chunk)
    return (
      spectra.reshape(shape + (2 * size, size + 1)),
      squared_norms.reshape(shape),
      mask.reshape(shape),
    )

  def _dataset(self, indices):
    """A `tf.data` pipeline of (spectra, squared norms, mask) per micrograph."""
    size = self.image_size
    dtype = self._dtype
    indices = np.asarray(indices, np.int64)

    def read(index):
      spectra, squared_norms, mask = tf.numpy_function(
        self._load, [index], [_complex(dtype), dtype, dtype]
      )
      spectra = tf.ensure_shape(spectra, [None, None, 2 * size, size + 1])
      return spectra, squared_norms, mask

    # A sequential map and one prefetched element: `IN_FLIGHT` micrographs.
    return tf.data.Dataset.from_tensor_slices(indices).map(read).prefetch(1)

  def _micrograph_sums(self, rotations):
    """The compiled sum over one micrograph's chunks, `num_streams` loops."""
    cached = self._sums.get(rotations)
    if cached is not None:
      return cached
    partial_sums = estep_lib.make_partial_sums(rotations)
    streams = self._streams

    @tf.function(reduce_retracing=True)
    def sums(images, spectra, squared_norms, mask, sigma):
      num_chunks = tf.shape(spectra)[0]
      parts = []
      for i in range(streams):
        begin = (num_chunks * i) // streams
        end = (num_chunks * (i + 1)) // streams
        # One micrograph feeds all B problems: batch 1 broadcasts.
        parts.append(
          partial_sums(
            images,
            spectra[None, begin:end],
            squared_norms[None, begin:end],
            mask[None, begin:end],
            sigma,
          )
        )
      return estep_lib.add_partial_sums(parts)

    self._sums[rotations] = sums
    return sums

  def partial_sums(self, images, sigma, rotations):
    """`estep.PartialSums` over all micrographs (one pass over the data).

    Args:
      images: float [B, L, L], the current estimates F_tau (B problems
        that share these micrographs).
      sigma: float [B] noise standard deviations.
      rotations: the `rotations.RotationSet`.

    Returns:
      `estep.PartialSums` with batch B, summed over every micrograph.
    """
    images = tf.convert_to_tensor(images, self._dtype)
    sigma = tf.reshape(tf.convert_to_tensor(sigma, self._dtype), [-1])
    if images.shape.rank != 3 or images.shape[-1] != self.image_size:
      raise ValueError(
        f"images must be [B, {self.image_size}, "
        f"{self.image_size}], got {images.shape}."
      )
    sums = self._micrograph_sums(rotations)
    uncached = [i for i in range(len(self.paths)) if i not in self._cache]
    uncached_set = set(uncached)
    total = None
    if uncached and all(i in self._spilled for i in uncached):
      # Spilled spectra are read a block at a time in this thread: a read
      # from the page cache costs a few percent of the block's E-step, less
      # than handing it over from a pipeline thread.
      for index in sorted(self._cache):
        total = _add(total, sums(images, *self._cache[index], sigma))
      blocks = self._blocks(uncached)
      if self._read_buffer is None:
        self._read_buffer = _aligned_zeros(
          [max(self._block_bytes(b) for b in blocks)], np.uint8, zero=False
        )
      for block in blocks:
        # `sums` has returned (eager, synchronous) before the next read.
        item = self._read_spilled(block, into=self._read_buffer)
        total = _add(total, sums(images, *item, sigma))
        del item
      batch = tf.shape(images)[0]
      return total._replace(
        num_patches=tf.broadcast_to(total.num_patches, [batch])
      )
    # The first streamed micrograph goes first, so that the pipeline reads
    # the second while the cached ones are summed.
    stream = iter(self._dataset(uncached)) if uncached else iter(())
    order = uncached[:1] + sorted(self._cache) + uncached[1:]
    for index in order:
      if index in uncached_set:
        # The pipeline reads and transforms the next micrograph meanwhile;
        # holding no look-ahead here keeps two micrographs in flight.
        item = next(stream)
        total = _add(total, sums(images, *item, sigma))
        if index in self._spilled:
          pass
        elif _nbytes(item) + self.cached_bytes <= self._cache_room():
          self._cache[index] = item
        elif self._spill:
          self._spill_item(index, item)
        del item
      else:
        total = _add(total, sums(images, *self._cache[index], sigma))
    batch = tf.shape(images)[0]
    return total._replace(
      num_patches=tf.broadcast_to(total.num_patches, [batch])
    )

  def statistics(self, images, sigma, rotations):
    """The E-step's `estep.Statistics` over all micrographs (eq. 14-16).

    Equal, up to rounding, to `estep.make_estep(rotations)` on the spectra
    of all micrographs' patches held in memory.

    Args:
      images: float [B, L, L].
      sigma: float [B].
      rotations: the `rotations.RotationSet`.

    Returns:
      `estep.Statistics` with s1, visibility [B, K, L, L] and
      log_likelihood [B].
    """
    parts = self.partial_sums(images, sigma, rotations)
    sigma = tf.reshape(tf.convert_to_tensor(sigma, self._dtype), [-1])
    return estep_lib.finish_statistics(rotations, parts, sigma)

  def clear_cache(self):
    """Drops the cached spectra and the scratch files."""
    self.close()


def _aligned_zeros(shape, dtype, zero=True):
  """An array whose data start on an `_ALIGN`-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = (np.zeros if zero else np.empty)(nbytes + _ALIGN, np.uint8)
  offset = (-raw.ctypes.data) % _ALIGN
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _complex(dtype):
  return tf.complex64 if tf.as_dtype(dtype) == tf.float32 else tf.complex128


def _nbytes(item):
  return sum(int(np.prod(t.shape)) * t.dtype.size for t in item)


def _add(total, parts):
  return parts if total is None else estep_lib.add_partial_sums([total, parts])
