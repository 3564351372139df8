"""Approximate EM with the E-step spread over a `tf.distribute.Strategy`.

The E-step's statistics (eq. 16 reduced to S1, V and the log-likelihood)
are sums over patches, so disjoint sets of patches can be processed on
different devices and worker processes and all-reduced with a sum. Every
replica holds a share of the patches' spectra; every EM iteration each
replica runs the compiled streaming pass (`estep.make_partial_sums`) on its
share, the partial sums are all-reduced (`strategy.reduce(SUM)`), and every
worker then takes the same M-step, so all workers hold the same estimate.

- `tf.distribute.MirroredStrategy()`: all local GPUs (or logical CPUs).
- `tf.distribute.MultiWorkerMirroredStrategy()`: several processes or
  machines, configured by `TF_CONFIG`; each worker passes its own
  micrographs.

At data-set scale each worker streams its own share of the micrograph files
from disk (`streaming.StreamingData(streaming.shard(paths, num_workers,
worker_index))`, bounded memory per worker): every iteration each worker
sums its files' `PartialSums`, the sums are all-reduced across workers, and
every worker takes the same M-step. The result equals the one-process
in-memory run up to rounding.
"""

import os

import numpy as np
import tensorflow as tf

from mtd_tf import priors
from mtd_tf.base import validation
from mtd_tf.em import checkpoints
from mtd_tf.em import estep as estep_lib
from mtd_tf.em import streaming
from mtd_tf.em.accelerated import accelerated
from mtd_tf.em.accelerated import uses_acceleration
from mtd_tf.em.front_ends import collect_patches
from mtd_tf.em.loop import LoopSpec
from mtd_tf.em.loop import build_em_loop
from mtd_tf.em.loop import precomputed_data
from mtd_tf.em.options import EMOptions
from mtd_tf.em.problem import ProblemBatch
from mtd_tf.em.problem import check_local_estimates
from mtd_tf.em.problem import single
from mtd_tf.em.runner import run_loop
from mtd_tf.model import patches as patches_lib
from mtd_tf.model import rotations as rotations_lib

__all__ = ["distributed_em", "ShardedData", "checkpointer"]


def _to_real(parts):
  """All-reduce friendly form: the complex spectrum as (re, im) pairs."""
  return parts._replace(
    s1_hat=tf.stack(
      [tf.math.real(parts.s1_hat), tf.math.imag(parts.s1_hat)], axis=-1
    )
  )


def _from_real(parts):
  return parts._replace(
    s1_hat=tf.complex(parts.s1_hat[..., 0], parts.s1_hat[..., 1])
  )


def distributed_em(
  strategy,
  measurements,
  image_size,
  sigma,
  *,
  init,
  prior=None,
  options=EMOptions(),
  crop=False,
):
  """Approximate EM whose E-step runs on every replica of `strategy`.

  Args:
    strategy: a `tf.distribute.Strategy` (Mirrored or MultiWorkerMirrored).
    measurements: this worker's measurement(s): an array [H, W], a list
      of micrographs, or a `streaming.StreamingData` of this worker's files
      (streamed from disk every iteration; one replica per worker). Under
      MultiWorkerMirroredStrategy every worker passes its own share; all
      shares together are the data.
    image_size: L.
    sigma: the noise level shared by all measurements.
    init: [L, L], F(0) (the same on every worker).
    prior: None or a `priors.Prior` (gradient or preconditioned M-steps, or
      closed form with an exact Gaussian prior; bare score functions are
      refused: wrap them in priors.ScorePrior).
    options: `EMOptions`; options.m_step picks the M-step.
    crop: crop measurement sides to multiples of L.

  Returns:
    `EMResult` with estimate [L, L], iterations (int) and
    log_likelihood [iterations] of all the data.

  Raises:
    ValueError: on bad input.
    em.EMDivergedError: the log-likelihood or the estimate became NaN or Inf.
  """
  size = int(image_size)
  init = validation.image_array(init, "init")
  if init.shape[0] != size:
    raise ValueError(f"init must be {size} x {size}, got {init.shape}.")
  if prior is not None:
    prior = priors.as_prior(prior, size)
  batch = ProblemBatch(
    [sigma], init[None], [options.m_step], [1.0 if prior is not None else 0.0]
  ).check_prior(prior)
  options.check_size(size)
  rotations = rotations_lib.rotation_set(size, options.num_rotations)
  if isinstance(measurements, streaming.StreamingData):
    return _streaming_em(
      strategy, measurements, batch, prior, options, rotations
    )
  # rho and sigma by EM need the streamed (precomputed) E-step: the
  # in-memory replicas' custom statistics do not carry them.
  check_local_estimates(options, "in-memory distributed workers")
  patch_set = collect_patches(measurements, size, crop)
  statistics_fn = _replica_statistics(strategy, patch_set, options, rotations)
  loop = build_em_loop(
    _spec(rotations, prior, options, "custom"), statistics_fn
  )
  # Fixed segment lengths: every worker makes the same sequence of calls.
  result = run_loop(loop, (), batch, prior, options, adaptive=False)
  return single(result)


def _all_reduce(strategy, per_replica):
  """The sum over replicas and workers of per-replica `PartialSums`."""
  return estep_lib.PartialSums(
    *[
      strategy.reduce(tf.distribute.ReduceOp.SUM, field, axis=None)
      for field in per_replica
    ]
  )


def _sum_over_workers(strategy, value):
  """The sum of a tensor (or numpy array) over every worker's replica."""
  per_replica = strategy.run(lambda v: tf.identity(v), args=(value,))
  return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def _worker_index(strategy):
  """This worker's index in the cluster (0 in a one-worker strategy)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_id = getattr(resolver, "task_id", None) if resolver else None
  return int(task_id or 0)


class ShardedData:
  """This worker's streamed micrographs, summed over every worker.

  The `streaming.StreamingData` of this worker's share of the files
  (`streaming.shard`), seen as the whole data set: each E-step pass sums
  this worker's files and all-reduces the sums (and the patch energy and
  count) across workers, so every worker takes the same M-step. It offers
  what EM's streamed path uses (`precomputed`, `regrid`, `window_starts`),
  so the recommended method (`recovery.multistart_em`) runs on it as on
  one process's `StreamingData`.

  Attributes:
    strategy: the `tf.distribute.Strategy` (one replica per worker).
    data: this worker's `streaming.StreamingData`.
    worker_index: this worker's index (0 holds the first file).
  """

  def __init__(self, strategy, data):
    if len(strategy.extended.worker_devices) != 1:
      raise ValueError(
        "Streaming under a strategy needs one replica per worker (e.g. "
        "MultiWorkerMirroredStrategy on CPUs); shard the files across "
        "workers with streaming.shard."
      )
    self.strategy = strategy
    self.data = data
    self.worker_index = _worker_index(strategy)

  @property
  def image_size(self):
    return self.data.image_size

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def grids_per_axis(self):
    return self.data.grids_per_axis

  @property
  def num_patches(self):
    """D of all workers' files together (int)."""
    return int(
      _sum_over_workers(
        self.strategy, tf.constant(float(self.data.num_patches), tf.float64)
      ).numpy()
    )

  def partial_sums(self, images, sigma, rotations, log_rho=None):
    """`estep.PartialSums` of every worker's files (one pass each)."""
    local = _to_real(self.data.partial_sums(images, sigma, rotations, log_rho))
    per_replica = self.strategy.run(lambda *fields: fields, args=tuple(local))
    return _from_real(_all_reduce(self.strategy, per_replica))

  def precomputed(self, images, sigma, rotations, log_rho=None):
    """The `loop.Precomputed` of one iteration over every worker's files."""
    total = self.partial_sums(images, sigma, rotations, log_rho)
    energy = _sum_over_workers(
      self.strategy, tf.constant(self.data.patch_energy(), tf.float64)
    )
    sigma = tf.reshape(tf.convert_to_tensor(sigma, self.dtype), [-1])
    return precomputed_data(rotations, total, sigma, energy, log_rho)

  def patch_sum(self):
    """sum_m sum(M_m) over every worker's patches (float)."""
    return float(
      _sum_over_workers(
        self.strategy, tf.constant(self.data.patch_sum(), tf.float64)
      ).numpy()
    )

  def regrid(self, grids_per_axis):
    """Every worker's files on grids_per_axis^2 offset grids."""
    return ShardedData(self.strategy, self.data.regrid(grids_per_axis))

  def from_first_worker(self, value, shape):
    """Worker 0's value, on every worker (an all-reduce).

    Args:
      value: a callable returning float [*shape] (called on worker 0 only).
      shape: its shape, the same on every worker.

    Returns:
      float64 numpy [*shape].
    """
    mine = (
      np.asarray(value(), np.float64)
      if self.worker_index == 0
      else np.zeros(shape)
    )
    return _sum_over_workers(
      self.strategy, tf.constant(mine, tf.float64)
    ).numpy()

  def first_micrograph(self):
    """This worker's first micrograph (worker 0's: the data set's first)."""
    return self.data.first_micrograph()

  def close(self):
    self.data.close()


def checkpointer(
  strategy, directory, key, every=checkpoints.DEFAULT_EVERY, resume=False
):
  """A worker's `checkpoints.Checkpointer` for a multi-worker run.

  Each worker saves to its own folder, directory/worker_<index>, at the
  same iterations as the others (by iteration count alone: seconds differ
  between workers). With resume the workers start from the newest
  checkpoint they all hold: a worker killed between two saves may hold one
  fewer, and each keeps the previous one.

  Args:
    strategy: the `tf.distribute.Strategy`.
    directory: the run's checkpoint folder (shared or per machine).
    key: the run's `checkpoints.fingerprint` (the same on every worker).
    every: iterations between checkpoints.
    resume: continue from the checkpoint.

  Returns:
    `checkpoints.Checkpointer`; use it in `callbacks.active` around the run.
  """
  folder = os.path.join(
    os.fspath(directory), f"worker_{_worker_index(strategy)}"
  )
  number = None
  if resume:
    mine = checkpoints.latest_number(folder)
    workers = strategy.num_replicas_in_sync
    mean = (
      float(_sum_over_workers(strategy, tf.constant(float(mine), tf.float64)))
      / workers
    )
    # Saves are one number apart at most: the floor of the mean is the
    # newest number every worker holds (each keeps two).
    number = int(np.floor(mean + 1e-9))
    if number < 1:
      raise checkpoints.CheckpointError(
        f"--resume: not every worker has a checkpoint in {directory}; run "
        "without --resume to start afresh."
      )
  return checkpoints.Checkpointer(
    folder, key, every, every_seconds=None, resume=resume, number=number
  )


def _replica_statistics(strategy, patch_set, options, rotations):
  """statistics_fn(images, sigma) of patches held by this worker's replicas.

  Args:
    strategy: the `tf.distribute.Strategy`.
    patch_set: float [D, L, L], this worker's patches, split evenly over its
      local replicas.
    options: `EMOptions` (chunk_size, dtype).
    rotations: the `RotationSet`.

  Returns:
    A callable (images [1, L, L], sigma [1]) -> `estep.Statistics` of all
    workers' patches.
  """
  num_local = len(strategy.extended.worker_devices)
  shards = np.array_split(patch_set, num_local)
  if any(len(shard) == 0 for shard in shards):
    raise ValueError(
      f"{len(patch_set)} patches cannot be shared by "
      f"{num_local} local replicas; use fewer devices."
    )
  # One "batch" element per local replica, padded to a common chunk count.
  data = patches_lib.patch_spectra(
    shards, options.chunk_size, tf.as_dtype(options.dtype)
  )
  partial_sums = estep_lib.make_partial_sums(rotations)

  def shard_of(field):
    def value_fn(context):
      local = context.replica_id_in_sync_group % num_local
      return tf.identity(field[local : local + 1])

    return strategy.experimental_distribute_values_from_function(value_fn)

  spectra = shard_of(data.spectra)
  squared_norms = shard_of(data.squared_norms)
  mask = shard_of(data.mask)

  def statistics_fn(images, sigma_b):
    def replica_fn(spec, norms, msk):
      return _to_real(partial_sums(images, spec, norms, msk, sigma_b))

    per_replica = strategy.run(replica_fn, args=(spectra, squared_norms, mask))
    total = _all_reduce(strategy, per_replica)
    return estep_lib.finish_statistics(rotations, _from_real(total), sigma_b)

  return statistics_fn


def _spec(rotations, prior, options, statistics):
  """The `LoopSpec` of a worker's loop: one problem, one M-step (rho and
  sigma by EM on streamed shares, whose E-step is precomputed)."""
  estimates = {}
  if statistics == "precomputed":
    estimates = dict(
      estimate_shift_prior=options.estimate_shift_prior,
      estimate_sigma=options.estimate_sigma,
    )
  return LoopSpec(
    rotations=rotations,
    kinds=(options.m_step,),
    prior=prior,
    gradient_steps=int(options.gradient_steps),
    gamma=options.gamma,
    statistics=statistics,
    **estimates,
  )


def _streaming_em(strategy, data, batch, prior, options, rotations):
  """`distributed_em` on this worker's streamed micrographs."""
  if data.image_size != rotations.image_size:
    raise ValueError(
      f"The streamed data have L = {data.image_size}, not "
      f"image_size = {rotations.image_size}."
    )
  if data.dtype.name != options.dtype:
    raise ValueError(
      f"The streamed data are {data.dtype.name} but "
      f"options.dtype is {options.dtype}."
    )
  sharded = ShardedData(strategy, data)
  spec = _spec(rotations, prior, options, "precomputed")

  def statistics(state):
    # This worker's files, then the sum over workers; rho and sigma are the
    # state's (EM's own where estimated, the same on every worker).
    log_rho = state.log_rho if spec.estimate_shift_prior else None
    return sharded.precomputed(state.images, state.sigma, rotations, log_rho)

  loop = build_em_loop(spec)
  if uses_acceleration(options, batch, prior):
    # Every worker must pick the same accelerator: from all workers' patches.
    per_replica = strategy.run(
      lambda: tf.constant(float(data.num_patches), tf.float64)
    )
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    result = accelerated(
      lambda problems, plain: run_loop(
        loop, (), problems, prior, plain, 1, adaptive=False, data_fn=statistics
      ),
      batch,
      options,
      None,
      num_patches=int(total.numpy()),
    )
  else:
    result = run_loop(
      loop, (), batch, prior, options, adaptive=False, data_fn=statistics
    )
  return single(result)
