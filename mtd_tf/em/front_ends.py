"""The ways into EM: one problem, a batch, prepared spectra, streamed files.

`approximate_em` is Algorithm 1 for one image; `batched_em` runs B
independent problems as one compiled graph execution (several starts of one
problem share its patch spectra); `run_prepared` and `run_streaming` run
the loop on spectra computed once or on micrographs streamed from disk.
Each checks its inputs (`problem.py`), builds or reuses the compiled loop
(`loop.py`) and runs it (`runner.py`), through an accelerator where one
applies (`accelerated.py`).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mtd_tf import priors as priors_lib
from mtd_tf.base import validation
from mtd_tf.em import streaming
from mtd_tf.em.accelerated import accelerated
from mtd_tf.em.accelerated import uses_acceleration
from mtd_tf.em.loop import LoopSpec
from mtd_tf.em.loop import compiled_loop
from mtd_tf.em.options import EMOptions
from mtd_tf.em.problem import ProblemBatch
from mtd_tf.em.problem import check_resolution
from mtd_tf.em.problem import resolved_streams
from mtd_tf.em.problem import single
from mtd_tf.em.runner import batch_kinds
from mtd_tf.em.runner import run_loop
from mtd_tf.model import patches as patches_lib
from mtd_tf.model import rotations as rotations_lib

__all__ = [
  "approximate_em",
  "batched_em",
  "collect_patches",
  "loop_for",
  "prepared_em_map",
  "prepare_spectra",
  "run_prepared",
  "run_streaming",
]


def collect_patches(measurements, image_size, crop, grids_per_axis=1):
  """Patches of one measurement or of several sharing one image.

  With grids_per_axis > 1, those of every offset grid of each measurement
  (`patches.offset_grid_patches`).

  Returns:
    float [D, L, L].
  """
  if not isinstance(measurements, (list, tuple)):
    measurements = [measurements]
  if not measurements:
    raise ValueError("Got an empty list of measurements.")
  return np.concatenate(
    [
      patches_lib.offset_grid_patches(m, image_size, grids_per_axis, crop)
      for m in measurements
    ]
  )


def _check_groups(groups, count):
  if groups is None:
    return None
  groups = np.asarray(groups)
  if (
    groups.ndim != 1
    or not np.issubdtype(groups.dtype, np.integer)
    or len(groups) == 0
    or groups.min() < 0
    or groups.max() >= count
  ):
    raise ValueError(
      f"groups must be B integers in [0, {count}), got {groups.tolist()}."
    )
  return groups


def batched_em(
  measurements,
  image_size,
  sigmas,
  *,
  inits,
  m_steps,
  prior=None,
  prior_weights=None,
  options=EMOptions(),
  crop=False,
  groups=None,
):
  """Runs B independent EM problems as one compiled graph execution.

  Args:
    measurements: list of B items (G with groups), each an array [H, W] or
      a list of such arrays (micrographs sharing one image).
    image_size: L.
    sigmas: B noise standard deviations.
    inits: array [B, L, L], the initial estimates F(0).
    m_steps: B names from `mstep.M_STEPS` (options.m_step is not used).
    prior: None or a `priors.Prior` (`priors.load_prior`,
      `priors.GaussianPrior`, ...); `priors.as_prior` checks it.
    prior_weights: B non-negative factors on gamma(tau) (0 = no prior for
      that problem); default 1 where a prior is given.
    options: `EMOptions`.
    crop: crop measurement sides to multiples of L.
    groups: None, or B indices into measurements: problem b is EM on
      measurements[groups[b]] (several starts of one problem share its
      patch spectra; the results equal those of B separate copies).

  Returns:
    `EMResult` with estimate [B, L, L], iterations [B], log_likelihood
    [T', B] (T' the iterations of the longest run).

  Raises:
    ValueError: on bad measurements, sigmas, inits, m_steps, prior or
      options.
    EMDivergedError: the log-likelihood or an estimate became NaN or Inf.
    KeyboardInterrupt: with ``partial_result``, an `EMResult` of the last
      finished iteration.
  """
  size = int(image_size)
  if len(measurements) == 0:
    raise ValueError("batched_em needs at least one measurement.")
  groups = _check_groups(groups, len(measurements))
  batch = len(measurements) if groups is None else len(groups)
  patch_sets = [collect_patches(m, size, crop) for m in measurements]
  for g, patches in enumerate(patch_sets):
    if len(patches) < 2:
      # One patch fixes no shift (eq. 9 places copies across neighbours),
      # and XLA's E-step cannot take it.
      raise ValueError(
        f"Measurement {g} holds {len(patches)} patch of {size} x {size}: EM "
        f"needs at least 2 x 2 (sides >= {2 * size}); give a larger "
        "measurement or a smaller image_size."
      )
  if np.size(sigmas) != batch:
    raise ValueError(f"Got {np.size(sigmas)} sigmas for {batch} measurements.")
  if np.shape(inits) != (batch, size, size):
    raise ValueError(
      f"inits must have shape {(batch, size, size)}, got {np.shape(inits)}."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, size)
  if prior is None or prior_weights is None:
    prior_weights = [0.0 if prior is None else 1.0] * batch
  problems = ProblemBatch(sigmas, inits, m_steps, prior_weights)
  problems.check_prior(prior)
  # Before the spectra: an EM too large for memory is refused with its sizes.
  options.check_size(size, resolved_streams(options))
  data = prepare_spectra(patch_sets, options, share=batch)
  return run_prepared(data, problems, prior, options, groups=groups)


def prepare_spectra(patch_sets, options, share):
  """Patch spectra of G problems, in chunks that `share` problems split.

  A chunk holds about options.chunk_size patches in all: each of the
  `share` problems that run together gets its part.

  Args:
    patch_sets: G float arrays [D_g, L, L].
    options: `EMOptions` (chunk_size, dtype, num_streams).
    share: the number of problems a chunk's patches are shared by.

  Returns:
    `patches.PatchSpectra` in options.dtype.
  """
  dtype = tf.float32 if options.dtype == "float32" else tf.float64
  chunk = patches_lib.balanced_chunk_size(
    max(len(p) for p in patch_sets),
    max(1, -(-int(options.chunk_size) // int(share))),
    resolved_streams(options),
  )
  return patches_lib.patch_spectra(patch_sets, chunk, dtype)


def loop_for(dtype, image_size, batch, prior, options, **spec):
  """The prior a batch uses (or None) and the `LoopSpec` of its loop.

  Args:
    dtype: the dtype of the data (must be options.dtype).
    image_size: L.
    batch: the `ProblemBatch`.
    prior: None or a `priors.Prior`.
    options: `EMOptions`.
    **spec: further `LoopSpec` fields (num_streams, statistics, ...).

  Returns:
    (prior or None, `LoopSpec`).
  """
  if tf.as_dtype(dtype).name != options.dtype:
    raise ValueError(
      f"The data are {tf.as_dtype(dtype).name} but options.dtype is "
      f"{options.dtype}: compute them in options.dtype."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, image_size)
  used = prior if batch.prior_weights.any() else None
  batch.check_prior(used)
  loop_spec = LoopSpec(
    rotations=rotations_lib.rotation_set(image_size, options.num_rotations),
    kinds=batch_kinds(batch),
    prior=used,
    gradient_steps=int(options.gradient_steps),
    gamma=options.gamma,
    **spec,
  )
  return used, loop_spec


def run_prepared(
  data,
  batch,
  prior,
  options,
  max_iterations=None,
  *,
  groups=None,
  start_iteration=0,
):
  """Runs the compiled EM loop on precomputed patch spectra.

  `batched_em` validates its input, computes the spectra once and calls
  this; benchmarks and the recommended method call it repeatedly on the
  same `patches.PatchSpectra`.

  Args:
    data: `patches.PatchSpectra` of B problems, in options.dtype.
    batch: the `ProblemBatch`.
    prior: None or a `priors.Prior`.
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.
    groups: None (data holds B problems), or int [B] indices into the G
      problems of data.
    start_iteration: tau of the first iteration (gamma(tau) of eq. 18
      continues from there: a run resumed after pruning).

  Returns:
    `EMResult`.
  """
  used, spec = loop_for(
    data.squared_norms.dtype,
    data.image_size,
    batch,
    prior,
    options,
    num_streams=resolved_streams(options),
    estimate_shift_prior=options.estimate_shift_prior,
    estimate_sigma=options.estimate_sigma,
  )
  loop = compiled_loop(spec)
  check_resolution(data, batch, options, groups)
  arrays = (data.spectra, data.squared_norms, data.mask)
  if groups is not None:
    arrays += (tf.constant(np.asarray(groups), tf.int32),)

  def run(problems, run_options, iterations=max_iterations):
    return run_loop(
      loop,
      arrays,
      problems,
      used,
      run_options,
      iterations,
      start_iteration=start_iteration,
      kinds=spec.kinds,
    )

  if start_iteration == 0 and uses_acceleration(options, batch, used):
    counts = np.asarray(data.num_patches)
    return accelerated(
      lambda problems, plain: run(problems, plain, 1),
      batch,
      options,
      max_iterations,
      num_patches=int(np.min(counts if groups is None else counts[groups])),
    )
  return run(batch, options)


def prepared_em_map(data, batch, prior, options):
  """EM as a map F -> (M(F), log p(F)) on precomputed spectra.

  One iteration of `run_prepared` from F returns M(F) and the
  log-likelihood at F: the map the accelerators of `acceleration.py` take.

  Args:
    data, batch, prior, options: as `run_prepared` (batch's inits are
      replaced by F at each call; options.acceleration is not used).

  Returns:
    callable F [B, L, L] -> (M(F) [B, L, L], log p(F) [B]).
  """
  plain = dataclasses.replace(
    options, acceleration="none", tolerance=0.0, progress_every=0
  )

  def em_map(images):
    problems = dataclasses.replace(batch, inits=np.asarray(images, np.float64))
    result = run_prepared(data, problems, prior, plain, max_iterations=1)
    return result.estimate, result.log_likelihood[0]

  return em_map


def run_streaming(
  data, batch, prior, options, max_iterations=None, *, start_iteration=0
):
  """Runs EM on micrographs streamed from disk (`streaming.StreamingData`).

  Every iteration streams all micrographs through the compiled E-step
  (`StreamingData.statistics`, peak memory bounded by its budget) and then
  runs the compiled loop's M-step and bookkeeping for one iteration on those
  statistics; the statistics add over micrographs exactly as in memory, so
  the result equals `run_prepared` on the same patches up to rounding.

  Args:
    data: `streaming.StreamingData` in options.dtype, shared by the B
      problems of `batch`.
    batch: the `ProblemBatch`.
    prior: None or a `priors.Prior`.
    options: `EMOptions`.
    max_iterations: overrides options.max_iterations.
    start_iteration: tau of the first iteration (as `run_prepared`).

  Returns:
    `EMResult`.
  """
  options.check_size(data.image_size)
  used, spec = loop_for(
    data.dtype,
    data.image_size,
    batch,
    prior,
    options,
    statistics="precomputed",
    estimate_shift_prior=options.estimate_shift_prior,
    estimate_sigma=options.estimate_sigma,
  )
  loop = compiled_loop(spec)

  def statistics(state):
    # rho and sigma of the state: EM's own where they are estimated.
    log_rho = state.log_rho if spec.estimate_shift_prior else None
    return data.precomputed(state.images, state.sigma, spec.rotations, log_rho)

  def run(problems, run_options, iterations=max_iterations):
    return run_loop(
      loop,
      (),
      problems,
      used,
      run_options,
      iterations,
      start_iteration=start_iteration,
      data_fn=statistics,
      kinds=spec.kinds,
    )

  if start_iteration == 0 and uses_acceleration(options, batch, used):
    return accelerated(
      lambda problems, plain: run(problems, plain, 1),
      batch,
      options,
      max_iterations,
      num_patches=int(data.num_patches),
    )
  return run(batch, options)


def approximate_em(
  measurements,
  image_size,
  sigma,
  *,
  init,
  options=EMOptions(),
  prior=None,
  crop=False,
):
  """Approximate EM for one image (Algorithm 1; no prior by default).

  Args:
    measurements: array [H, W] (sides multiples of L), a list of such
      micrographs that share one image and one sigma, or a
      `streaming.StreamingData` (micrographs streamed from disk every
      iteration in bounded memory: `run_streaming`).
    image_size: L.
    sigma: noise standard deviation.
    init: array [L, L], F(0).
    options: `EMOptions`; options.m_step picks the M-step from
      `mstep.M_STEPS`: "closed_form" (exact maximiser of Q, or the MAP with
      an exact Gaussian prior), "gradient" (eq. 18, the paper's fixed step
      mu), "preconditioned" (steps scaled by the curvature of Q and the
      prior's), or one registered by the caller.
    prior: None or a `priors.Prior`.
    crop: crop sides to multiples of L instead of raising.

  Returns:
    `EMResult` with estimate [L, L], iterations (int) and log_likelihood
    [iterations].

  Raises:
    ValueError: on bad input, with a message that says what to change.
    EMDivergedError: the log-likelihood or the estimate became NaN or Inf.
    KeyboardInterrupt: with ``partial_result`` (the last finished
      iteration, in this single-problem form).
  """
  size = int(image_size)
  init = validation.image_array(init, "init")
  if init.shape[0] != size:
    raise ValueError(
      f"init must be {image_size} x {image_size}, got {init.shape}."
    )
  try:
    if isinstance(measurements, streaming.StreamingData):
      if measurements.image_size != size:
        raise ValueError(
          f"The streamed data have L = {measurements.image_size}, not "
          f"image_size = {image_size}."
        )
      if prior is not None:
        prior = priors_lib.as_prior(prior, size)
      problems = ProblemBatch(
        [sigma], init[None], [options.m_step], [0.0 if prior is None else 1.0]
      ).check_prior(prior)
      result = run_streaming(measurements, problems, prior, options)
    else:
      result = batched_em(
        [measurements],
        size,
        [sigma],
        inits=init[None],
        m_steps=[options.m_step],
        prior=prior,
        options=options,
        crop=crop,
      )
  except KeyboardInterrupt as err:
    partial = getattr(err, "partial_result", None)
    if partial is not None:
      err.partial_result = single(partial)
    raise
  return single(result)
