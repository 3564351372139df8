"""Out-of-core E-step: micrographs streamed from disk, eq. (14)-(16).

The E-step's statistics are sums over patches (`estep.PartialSums`), so
they can be accumulated one micrograph at a time. `StreamingData` keeps a
list of micrograph files (.mrc, .npy, .npz; see `io.load_measurement`) in a
`spectra_store.SpectraStore`, which hands out each micrograph's chunked
patch spectra within a memory budget (streamed through a `tf.data`
pipeline, cached, or spilled to scratch files), and sums them with the
compiled chunk-over-streams loop (`chunk_streams.stream_partial_sums` of
`estep.make_partial_sums`) while the pipeline prepares the next
micrograph. Peak memory therefore does not grow with the number of
micrographs. `shard` gives each of several workers its share of the files.
"""

import numpy as np
import tensorflow as tf

from mtd_tf.em import chunk_streams
from mtd_tf.em import estep as estep_lib
from mtd_tf.em import loop as loop_lib
from mtd_tf.em import micrograph_spectra
from mtd_tf.em import spectra_store
from mtd_tf.em.micrograph_spectra import spectra_bytes
from mtd_tf.em.spectra_store import DEFAULT_MEMORY_BUDGET_BYTES
from mtd_tf.em.spectra_store import IN_FLIGHT
from mtd_tf.model import io as io_lib

__all__ = [
  "StreamingData",
  "shard",
  "spectra_bytes",
  "DEFAULT_MEMORY_BUDGET_BYTES",
  "IN_FLIGHT",
]


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


class StreamingData:
  """Micrographs on disk that share one image, as input of the E-step.

  Attributes:
    paths: the micrograph files, in order.
    image_size: L.
    dtype: tf.float32 or tf.float64, of the spectra and statistics.
    num_patches: D, the patches of all micrographs together (int).
    patch_counts: patches per micrograph, int numpy [num_micrographs].
    cached_bytes: bytes of spectra held in memory now.
    spilled_bytes: bytes of spectra in the scratch files.
    store: the `spectra_store.SpectraStore` of the micrographs' spectra.
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
      grids_per_axis: each micrograph's patches on grids_per_axis^2 offset
        grids (`patches.offset_grid_patches`, the composite likelihood of
        the recommended method; 1: eq. (9)'s grid alone).

    Raises:
      ValueError: on a bad size, chunk size, dtype, budget, or a micrograph
        whose sides are not multiples of L (without crop).
      FileNotFoundError: on a missing file or a pattern matching nothing.
    """
    self.store = spectra_store.SpectraStore(
      paths,
      image_size,
      chunk_size=chunk_size,
      dtype=dtype,
      memory_budget_bytes=memory_budget_bytes,
      crop=crop,
      num_streams=num_streams,
      spill=spill,
      spill_dir=spill_dir,
      grids_per_axis=grids_per_axis,
    )
    # What `regrid` needs to open the same files on other grids.
    self._settings = dict(
      image_size=image_size,
      chunk_size=chunk_size,
      dtype=dtype,
      memory_budget_bytes=memory_budget_bytes,
      crop=crop,
      num_streams=num_streams,
      spill=spill,
      spill_dir=spill_dir,
    )
    self._sums = {}  # compiled per-micrograph sums, per RotationSet
    # sum_m ||M_m||^2 and sum_m sum(M_m), known after the first pass.
    self._energy = None
    self._sum = None

  @property
  def grids_per_axis(self):
    """Patch grids per axis of each micrograph (1: eq. (9)'s grid)."""
    return self.store.grids_per_axis

  @property
  def backgrounds(self):
    """float64 numpy [num_micrographs], the level removed from each file."""
    return self.store.backgrounds

  def set_backgrounds(self, backgrounds):
    """`SpectraStore.set_backgrounds`: before the first pass."""
    self.store.set_backgrounds(backgrounds)

  @property
  def gain(self):
    """The data's units per the prior's; the pixels are divided by it."""
    return self.store.gain

  def set_gain(self, gain):
    """`SpectraStore.set_gain`: before the first pass."""
    self.store.set_gain(gain)

  def regrid(self, grids_per_axis):
    """The same micrographs on grids_per_axis^2 offset grids.

    A new `StreamingData` with this one's settings and backgrounds (its
    own cache and scratch files, within the same budget: close this one
    first when it is no longer needed).
    """
    data = StreamingData(
      self.paths, grids_per_axis=grids_per_axis, **self._settings
    )
    data.set_backgrounds(self.backgrounds)
    data.set_gain(self.gain)
    return data

  def first_micrograph(self):
    """The first micrograph's pixels as EM sees them: float64 [H, W].

    Its background removed and, with crop, trimmed to a multiple of L
    (e.g. for `starts.window_starts`).
    """
    grids = micrograph_spectra.patch_grids(
      self.paths[0],
      self.image_size,
      self._settings["crop"],
      float(self.backgrounds[0]),
      gain=self.gain,
      grid=0,
    )
    rows, size, cols, _ = grids[0].shape
    return np.asarray(grids[0], np.float64).reshape(rows * size, cols * size)

  @property
  def paths(self):
    """The micrograph files, in order (list of str)."""
    return self.store.paths

  @property
  def image_size(self):
    """L (int)."""
    return self.store.image_size

  @property
  def dtype(self):
    """tf.float32 or tf.float64."""
    return self.store.dtype

  @property
  def num_patches(self):
    """D, the patches of all micrographs together (int)."""
    return self.store.num_patches

  @property
  def patch_counts(self):
    """Patches per micrograph, int64 numpy [num_micrographs]."""
    return self.store.patch_counts

  @property
  def cached_bytes(self):
    """Bytes of spectra held in memory now."""
    return self.store.cached_bytes

  @property
  def spilled_bytes(self):
    """Bytes of spectra in the scratch files."""
    return self.store.spilled_bytes

  def partial_sums(self, images, sigma, rotations, log_rho=None):
    """`estep.PartialSums` over all micrographs (one pass over the data).

    Args:
      images: float [B, L, L], the current estimates F_tau (B problems
        that share these micrographs).
      sigma: float [B] noise standard deviations.
      rotations: the `rotations.RotationSet`.
      log_rho: None (uniform shifts, eq. 14) or float [B, 2L, 2L], the log
        shift prior of each problem.

    Returns:
      `estep.PartialSums` with batch B, summed over every micrograph.
    """
    images = self._checked_images(images)  # [B, L, L]
    sigma = self._sigma(sigma)  # [B]
    if log_rho is not None:
      log_rho = tf.convert_to_tensor(log_rho, self.dtype)  # [B, 2L, 2L]
    sums = self._micrograph_sums(rotations)
    energy = None if self._energy is not None else []
    pixel_sum = []

    def add(total, item):
      if energy is not None:
        # Taken on the first pass (`patch_energy`, `patch_sum`).
        energy.append(_energy(item))
        pixel_sum.append(_patch_sum(item))
      return _add(total, sums(images, *item, sigma, log_rho))

    total = self.store.fold(add)
    if energy is not None:
      self._energy = float(tf.add_n(energy))
      self._sum = float(tf.add_n(pixel_sum))
    # Every problem saw every patch.
    batch = tf.shape(images)[0]
    return total._replace(
      num_patches=tf.broadcast_to(total.num_patches, [batch])
    )  # num_patches [B]

  def patch_energy(self):
    """sum_m ||M_m||^2 over every patch (float; known after the first
    pass, else one pass that also takes `patch_sum`)."""
    self._take_totals()
    return self._energy

  def patch_sum(self):
    """sum_m sum(M_m) over every patch (float; as `patch_energy`): each
    patch's sum is its spectrum's zero frequency."""
    self._take_totals()
    return self._sum

  def _take_totals(self):
    if self._energy is None:
      energies, sums = [], []

      def take(total, item):
        energies.append(_energy(item))
        sums.append(_patch_sum(item))

      self.store.fold(take)
      self._energy = float(tf.add_n(energies))
      self._sum = float(tf.add_n(sums))

  def precomputed(self, images, sigma, rotations, log_rho=None):
    """The `loop.Precomputed` data of one EM iteration (one pass).

    Args:
      images, sigma, rotations, log_rho: as `partial_sums`.

    Returns:
      `loop.Precomputed` with batch B: the statistics of eq. (14)-(16),
      the shift posterior (rho's M-step) and the patch energy and count
      (sigma's M-step).
    """
    parts = self.partial_sums(images, sigma, rotations, log_rho)
    return loop_lib.precomputed_data(
      rotations, parts, self._sigma(sigma), self.patch_energy(), log_rho
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
    return estep_lib.finish_statistics(rotations, parts, self._sigma(sigma))

  def close(self):
    """Drops the cache and removes the scratch files."""
    self.store.close()

  def clear_cache(self):
    """Drops the cached spectra and the scratch files."""
    self.close()

  def _checked_images(self, images):
    """images as a tensor of `dtype`, [B, L, L]; ValueError otherwise."""
    images = tf.convert_to_tensor(images, self.dtype)
    if images.shape.rank != 3 or images.shape[-1] != self.image_size:
      raise ValueError(
        f"images must be [B, {self.image_size}, "
        f"{self.image_size}], got {images.shape}."
      )
    return images

  def _sigma(self, sigma):
    """sigma as a tensor of `dtype`, [B]."""
    return tf.reshape(tf.convert_to_tensor(sigma, self.dtype), [-1])

  def _micrograph_sums(self, rotations):
    """The compiled sum of one micrograph's item, kept per RotationSet."""
    sums = self._sums.get(rotations)
    if sums is None:
      sums = _micrograph_sums(rotations, self.store.num_streams)
      self._sums[rotations] = sums
    return sums


def _micrograph_sums(rotations, num_streams):
  """Builds the sum over one micrograph's chunks, `num_streams` loops.

  Returns:
    A `tf.function` `sums(images, spectra, squared_norms, mask, sigma,
    log_rho=None)`: images float [B, L, L], one micrograph's item (spectra
    complex [C, S, 2L, L+1], squared norms and mask float [C, S]), sigma
    float [B], log_rho None or float [B, 2L, 2L]; returning `estep.PartialSums` with batch B (num_patches [1]).
  """
  partial_sums = estep_lib.make_partial_sums(rotations)

  @tf.function(reduce_retracing=True)
  def sums(images, spectra, squared_norms, mask, sigma, log_rho=None):
    # One micrograph feeds all B problems: batch 1 broadcasts.
    parts = chunk_streams.stream_partial_sums(
      partial_sums,
      num_streams,
      images,
      spectra[None],  # [1, C, S, 2L, L+1]
      squared_norms[None],  # [1, C, S]
      mask[None],  # [1, C, S]
      sigma,
      log_rho=log_rho,
    )
    return estep_lib.add_partial_sums(parts)

  return sums


def _energy(item):
  """sum_m ||M_m||^2 of one item (mask * squared norms), float64 []."""
  return tf.reduce_sum(
    tf.cast(item[1], tf.float64) * tf.cast(item[2], tf.float64)
  )


def _patch_sum(item):
  """sum_m sum(M_m) of one item (mask * zero frequency), float64 []."""
  return tf.reduce_sum(
    tf.cast(item[2], tf.float64)
    * tf.cast(tf.math.real(item[0][..., 0, 0]), tf.float64)
  )


def _add(total, parts):
  """total + parts (`estep.PartialSums`); parts when total is None."""
  return parts if total is None else estep_lib.add_partial_sums([total, parts])
