"""The patch spectra of micrograph files, held within a memory budget.

The E-step sees the data only through the spectra of the zero-padded
patches, Z M_m of eq. (9), and their squared norms (eq. 15). `SpectraStore`
keeps a list of micrograph files and hands out their spectra laid out in
chunks (`micrograph_spectra.load_spectra`) for one pass of the E-step
(`SpectraStore.fold`), a unit at a time: a unit is a band of patch rows of
one grid of one micrograph, at most `UNIT_BYTES` of spectra.

- A `tf.data` pipeline reads and transforms the next unit while the
  caller sums the previous one: `IN_FLIGHT` units' spectra are in memory
  while streaming.
- What the budget leaves after what a pass holds besides (`_cache_room`)
  is a cache of units kept in memory between passes.
- The spectra of the other units are spilled to scratch files on the
  first pass (`spill_files.SpillFiles`) and read back on the next ones;
  with `spill=False` they are read and transformed again on every pass.
- Units are summed in index order, `spill_files.BLOCK_BYTES` at a time,
  whether read, cached or spilled: every pass adds the same sums in the
  same order, so a resumed run repeats an uninterrupted one bit for bit.

Peak memory therefore grows neither with the number of micrographs nor
with their size. Each micrograph's background level (`set_backgrounds`,
e.g. from `noise.estimate_noise`) is subtracted as it is read, as the
in-memory path subtracts it from its arrays.
"""

import numpy as np
import tensorflow as tf

from mtd_tf.em import micrograph_spectra
from mtd_tf.em import spill_files
from mtd_tf.model import io as io_lib
from mtd_tf.model import patches as patches_lib

__all__ = [
  "SpectraStore",
  "DEFAULT_MEMORY_BUDGET_BYTES",
  "IN_FLIGHT",
  "UNIT_BYTES",
]

# Bytes of data a pass holds at once (768 MiB): the units in flight, the
# read buffer, the E-step's copies of a block, a micrograph's pixels, and
# a cache of units in what is left (a 4088 x 4088 micrograph's spectra
# take 264 MiB at L = 28 in float32).
DEFAULT_MEMORY_BUDGET_BYTES = 768 << 20
# Units whose spectra are in memory while streaming: the one summed and
# the one the pipeline prepares.
IN_FLIGHT = 2
# The spectra of a unit at most (a band of at least one patch row): a
# quarter of a 4088 x 4088 micrograph's at L = 28, so what is in flight
# stays small against the budget whatever the micrographs' size.
UNIT_BYTES = 64 << 20
# Units of the budget left for what TensorFlow's allocator keeps of the
# units a pass frees (it does not hand them back at once): with none the
# recommended method's passes over the offset grids peaked 52 MiB above
# budget + 1 GiB on 4088 x 4088 micrographs, with one 1 MiB above.
ALLOCATOR_UNITS = 2


class SpectraStore:
  """Micrograph files and their chunked patch spectra, within a budget.

  An item is a unit's (or a block of its chunks') numpy arrays or tensors
  (spectra complex [C, S, 2L, L+1], squared norms float [C, S], mask float
  [C, S]); S is the unit's own chunk size (`chunk_size(index)`). A unit is
  a band of patch rows of a micrograph on one grid (eq. (9)'s, or an
  offset grid), its spectra at most `UNIT_BYTES` (or the budget's share),
  so that what is in flight stays small whatever the micrographs' size.

  Attributes:
    paths: the micrograph files, in order.
    image_size: L.
    dtype: tf.float32 or tf.float64, of the spectra.
    patch_counts: patches per micrograph, int numpy [num_micrographs].
    num_streams: the chunk loops each micrograph is laid out for (>= 1).
    backgrounds: float64 numpy [num_micrographs], the level subtracted
      from each micrograph's pixels (`set_backgrounds`; zeros by default).
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
    grids_per_axis=1,
  ):
    """Checks the files and counts their patches (no pixels are read).

    Args:
      paths: a path, a glob pattern, or a list of them (`io.expand_paths`).
      image_size: L.
      chunk_size: patches per chunk (about: see `chunk_size(index)`).
      dtype: tf.float32 or tf.float64 (or their names).
      memory_budget_bytes: bytes of data a pass holds at once, the
        `IN_FLIGHT` units being streamed included; what is left after
        those (`_cache_room`) is the cache kept between passes (0:
        nothing is cached).
      crop: drop trailing rows and columns beyond a multiple of L.
      num_streams: concurrent chunk loops per micrograph: each
        micrograph's chunk count is a multiple of it where possible.
      spill: spill the micrographs that are not cached to scratch files
        (False: read and transform them again every pass).
      spill_dir: parent folder of the scratch files (`SpillFiles`).
      grids_per_axis: each micrograph's patches on grids_per_axis^2 offset
        grids (`patches.offset_grid_patches`; 1: eq. (9)'s grid alone).

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
    self.dtype = tf.as_dtype(dtype)
    if self.dtype not in (tf.float32, tf.float64):
      raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
    if not memory_budget_bytes >= 0:
      raise ValueError(
        f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}."
      )
    self._budget = memory_budget_bytes
    self._crop = bool(crop)
    self.num_streams = max(int(num_streams), 1)
    self.grids_per_axis = int(grids_per_axis)
    patches_lib.grid_offsets(self.image_size, self.grids_per_axis)  # checks
    # (micrograph, grid, (first row, end row)) of each unit, its patches.
    self._units, self._unit_counts = self._count_units()
    self.patch_counts = np.bincount(
      [m for m, _, _ in self._units],
      weights=self._unit_counts,
      minlength=len(self.paths),
    ).astype(np.int64)  # [num_micrographs]
    self.backgrounds = np.zeros(len(self.paths))
    self.gain = 1.0  # `set_gain`
    self._cache = {}  # unit -> item
    self._spill = bool(spill)
    self._spilled = spill_files.SpillFiles(self.dtype, spill_dir)

  @property
  def num_patches(self):
    """D, the patches of all micrographs together (int)."""
    return int(self.patch_counts.sum())

  @property
  def cached_bytes(self):
    """Bytes of spectra held in memory now."""
    return sum(self.cached_micrograph_bytes())

  def cached_micrograph_bytes(self):
    """Bytes of each cached unit's item, in unit order (list)."""
    return [
      micrograph_spectra.item_bytes(self._cache[i]) for i in sorted(self._cache)
    ]

  @property
  def spilled_bytes(self):
    """Bytes of spectra in the scratch files."""
    return self._spilled.nbytes

  def set_backgrounds(self, backgrounds):
    """Sets the level subtracted from each micrograph (before any pass).

    Args:
      backgrounds: float [num_micrographs], e.g. `noise.estimate_noise`'s
        background of each file.

    Raises:
      ValueError: a wrong count, a non-finite level, or spectra already
        cached or spilled (they hold the old levels).
    """
    levels = np.asarray(backgrounds, np.float64).reshape(-1)
    if levels.shape != (len(self.paths),):
      raise ValueError(
        f"Got {levels.size} backgrounds for {len(self.paths)} micrographs."
      )
    if not np.all(np.isfinite(levels)):
      raise ValueError("backgrounds must be finite.")
    if self._cache or self._spilled.nbytes:
      raise ValueError(
        "Set the backgrounds before the first pass over the micrographs."
      )
    self.backgrounds = levels

  def set_gain(self, gain):
    """Divides every micrograph (background removed) by `gain` (> 0), the
    data's units per the prior's, before any pass."""
    gain = float(gain)
    if not 0 < gain < float("inf"):
      raise ValueError(f"gain must be positive and finite, got {gain}.")
    if self._cache or self._spilled.nbytes:
      raise ValueError("Set the gain before the first pass over the data.")
    self.gain = gain

  def chunk_size(self, index):
    """S of unit `index`: chunks that split it evenly into streams."""
    return patches_lib.balanced_chunk_size(
      int(self._unit_counts[index]), self._chunk_size, self.num_streams
    )

  def fold(self, fn, total=None):
    """Folds `fn` over every unit's spectra: one pass over the data.

    Streamed units are cached or spilled as the budget allows, once `fn`
    has seen them. Units go in index order, each a block of
    `spill_files.BLOCK_BYTES` at a time (`spill_files.block_ranges`),
    whether streamed, cached or spilled: every pass calls `fn` on the same
    blocks in the same order.

    Args:
      fn: `fn(total, item) -> total`; the item is a block of a unit, valid
        only during the call (a spilled block's buffer is reused for the
        next one).
      total: the initial value.

    Returns:
      the last `fn`'s value.
    """
    uncached = [i for i in range(len(self._units)) if i not in self._cache]
    if uncached and self._spilled.holds_all(uncached):
      return self._fold_spilled(fn, total)
    return self._fold_streamed(fn, total, uncached)

  def close(self):
    """Drops the cache and removes the scratch files."""
    self._spilled.close()
    self._cache.clear()

  def _unit_bytes(self):
    """The most spectra a unit may hold: `UNIT_BYTES`, or less where the
    budget is small (a tenth of it: see `_cache_room`)."""
    return max(1, min(UNIT_BYTES, self._budget // 10))

  def _count_units(self):
    """The units (micrograph, grid, rows) that hold patches, their counts.

    Each grid of each micrograph is cut into bands of whole patch rows
    whose spectra take at most `_unit_bytes` (at least one row a band),
    of as even a size as that allows.
    """
    grids = len(patches_lib.grid_offsets(self.image_size, self.grids_per_axis))
    per_patch = micrograph_spectra.spectra_bytes(1, self.image_size, self.dtype)
    units, counts = [], []
    self._pixel_bytes = 0  # the largest micrograph's, read as float32
    for index, path in enumerate(self.paths):
      for grid in range(grids):
        rows, cols = micrograph_spectra.grid_shape(
          path, self.image_size, self._crop, grid
        )
        if grid == 0 and rows * cols == 0:
          raise ValueError(
            f"A micrograph is smaller than L = {self.image_size}."
          )
        if grid == 0:
          self._pixel_bytes = max(
            self._pixel_bytes, 4 * rows * cols * self.image_size**2
          )
        if not rows * cols:  # a micrograph one patch high: no moved grids
          continue
        most = max(1, self._unit_bytes() // (cols * per_patch))  # rows
        bands = -(-rows // most)
        edges = np.linspace(0, rows, bands + 1).round().astype(int)
        for begin, end in zip(edges[:-1], edges[1:]):
          units.append((index, grid, (int(begin), int(end))))
          counts.append(int(end - begin) * cols)
    return units, np.array(counts, np.int64)

  @staticmethod
  def _fold_blocks(fn, total, item):
    """`fn` over an in-memory unit's item, block by block."""
    spectra, squared_norms, mask = item
    num_chunks = int(spectra.shape[0])
    chunk_bytes = micrograph_spectra.item_bytes([spectra]) // max(num_chunks, 1)
    for begin, end in spill_files.block_ranges(num_chunks, chunk_bytes):
      total = fn(
        total,
        (spectra[begin:end], squared_norms[begin:end], mask[begin:end]),
      )
    return total

  def _fold_spilled(self, fn, total):
    """`fold` when every unit is cached or spilled.

    Spilled spectra are read a block at a time in this thread: a read from
    the page cache costs a few percent of the block's E-step, less than
    handing it over from a pipeline thread.
    """
    for index in range(len(self._units)):
      if index in self._cache:
        total = self._fold_blocks(fn, total, self._cache[index])
      else:
        total = self._spilled.fold(fn, total, [index])
    return total

  def _fold_streamed(self, fn, total, uncached):
    """`fold` streaming the units `uncached` through the pipeline; the
    cached ones are summed in their place meanwhile."""
    stream = iter(self._dataset(uncached)) if uncached else iter(())
    streamed = set(uncached)
    for index in range(len(self._units)):
      if index in streamed:
        # The pipeline reads and transforms the next unit meanwhile;
        # holding no look-ahead here keeps two units in flight.
        item = next(stream)
        total = self._fold_blocks(fn, total, item)
        self._keep(index, item)
        del item
      else:
        total = self._fold_blocks(fn, total, self._cache[index])
    return total

  def _keep(self, index, item):
    """Caches a streamed micrograph if the budget allows, else spills it."""
    if index in self._spilled:
      return
    room = self._cache_room()
    if micrograph_spectra.item_bytes(item) + self.cached_bytes <= room:
      self._cache[index] = item
    elif self._spill:
      self._spilled.write(index, item)

  def _cache_room(self):
    """Bytes the cache may hold: the budget less what a pass holds besides
    (the units in flight and a copy, `ALLOCATOR_UNITS`, the read buffer,
    the E-step's copies of a block, a micrograph's pixels)."""
    largest = micrograph_spectra.spectra_bytes(
      max(
        -(-int(c) // self.chunk_size(i)) * self.chunk_size(i)
        for i, c in enumerate(self._unit_counts)
      ),
      self.image_size,
      self.dtype,
    )
    block = min(largest, spill_files.BLOCK_BYTES)
    buffer = block if self._spill else 0
    # The units in flight and the pipeline's copy of the next one (numpy to
    # tensor), the allocator's, the read buffer, the block the E-step copies
    # (to a tensor, then a part per stream), a micrograph's pixels.
    return (
      self._budget
      - (IN_FLIGHT + 1 + ALLOCATOR_UNITS) * largest
      - buffer
      - 2 * block
      - self._pixel_bytes
    )

  def _load(self, index):
    """Reads unit `index`: the numpy item of `load_spectra`."""
    index = int(index)
    micrograph, grid, rows = self._units[index]
    return micrograph_spectra.load_spectra(
      self.paths[micrograph],
      self.image_size,
      self.chunk_size(index),
      self.dtype,
      self._crop,
      float(self.backgrounds[micrograph]),
      self.grids_per_axis,
      grid=grid,
      gain=self.gain,
      rows=rows,
    )

  def _dataset(self, indices):
    """A `tf.data` pipeline of the items of micrographs `indices`."""
    size = self.image_size
    dtype = self.dtype
    indices = np.asarray(indices, np.int64)

    def read(index):
      spectra, squared_norms, mask = tf.numpy_function(
        self._load,
        [index],
        [micrograph_spectra.complex_dtype(dtype), dtype, dtype],
      )
      spectra = tf.ensure_shape(
        spectra, [None, None, 2 * size, size + 1]
      )  # [C, S, 2L, L+1]
      return spectra, squared_norms, mask

    # A sequential map and one prefetched element: `IN_FLIGHT` micrographs.
    return tf.data.Dataset.from_tensor_slices(indices).map(read).prefetch(1)
