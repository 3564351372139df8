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

import numpy as np
import tensorflow as tf

from mtd_tf import priors
from mtd_tf.base import validation
from mtd_tf.em import estep as estep_lib
from mtd_tf.em import streaming
from mtd_tf.em.accelerated import accelerated
from mtd_tf.em.accelerated import uses_acceleration
from mtd_tf.em.front_ends import collect_patches
from mtd_tf.em.loop import LoopSpec
from mtd_tf.em.loop import build_em_loop
from mtd_tf.em.options import EMOptions
from mtd_tf.em.problem import ProblemBatch
from mtd_tf.em.problem import check_local_estimates
from mtd_tf.em.problem import single
from mtd_tf.em.runner import run_loop
from mtd_tf.model import patches as patches_lib
from mtd_tf.model import rotations as rotations_lib

__all__ = ["distributed_em"]


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
  # rho and sigma live in the local loop's state; the distributed E-step
  # sums partial statistics that do not carry them.
  check_local_estimates(options, "distributed workers")
  options.check_size(size)
  rotations = rotations_lib.rotation_set(size, options.num_rotations)
  if isinstance(measurements, streaming.StreamingData):
    return _streaming_em(
      strategy, measurements, batch, prior, options, rotations
    )
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
  """The `LoopSpec` of a worker's loop: one problem, one M-step."""
  return LoopSpec(
    rotations=rotations,
    kinds=(options.m_step,),
    prior=prior,
    gradient_steps=int(options.gradient_steps),
    gamma=options.gamma,
    statistics=statistics,
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
  if len(strategy.extended.worker_devices) != 1:
    raise ValueError(
      "Streaming under a strategy needs one replica per worker (e.g. "
      "MultiWorkerMirroredStrategy on CPUs); shard the files across "
      "workers with streaming.shard."
    )
  sigma = tf.constant(batch.sigmas, data.dtype)

  def statistics(state):
    # This worker's files, then the sum over workers.
    local = _to_real(data.partial_sums(state.images, sigma, rotations))
    per_replica = strategy.run(lambda *fields: fields, args=tuple(local))
    total = _all_reduce(strategy, per_replica)
    return tuple(
      estep_lib.finish_statistics(rotations, _from_real(total), sigma)
    )

  loop = build_em_loop(_spec(rotations, prior, options, "precomputed"))
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
