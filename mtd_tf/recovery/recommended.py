"""The recommended reconstruction: several starts, pruning, selection, gauge.

EM (Algorithm 1) climbs to the nearest mode of its objective, and its output
position and orientation are arbitrary (`gauge.py`). `multistart_em` runs
S starts of each of P problems side by side in one batched EM
(`em.batched_em`'s groups: the starts share their measurement's patch
spectra), with the preconditioned M-step (`mstep.preconditioned_mstep`),
which converges in tens of iterations instead of the hundreds of the
paper's fixed-step gradient ascent:

  1. starts: the given start (the paper's), the `num_windows` highest-energy
     windows of the measurement (`starts.window_starts`) and
     `num_prior_draws` probability-flow draws from the prior
     (`sampling.sample_images`);
  2. all starts run `prune_at` iterations on eq. (9)'s patch grid; the
     `keep` best of each problem by the selection objective go on,
     re-batched (so pruned starts cost nothing), to `max_iterations` in
     all, gamma(tau) of eq. (18) continuing where it was, on the patches of
     `grids_per_axis`^2 offset grids (`patches.offset_grid_patches`: a
     composite likelihood, its data term divided by the number of grids);
     with `em.EMOptions.estimate_sigma` the survivors' sigma is EM's own
     estimate from here on (`mstep.noise_mstep`);
  3. the start with the highest objective wins (`starts.select`): the data
     log-likelihood (eq. 13), or with selection="map" the log-likelihood
     plus gamma(T) log p(F), log p differences between the starts of a
     problem being the line integral of the prior's score (eq. 6-8)
     between them (exact for a Gaussian prior, whose MAP objective it then
     is);
  4. the winner is put in the prior's data-set gauge (`gauge.apply_convention`
     when the prior has a `convention`; off with gauge=False); with
     gauge_at_prune the survivors of step 2 are gauged too, so the prior
     sees them in its own convention for the rest of the run (better than
     at the end only on MNIST at every SNR, seeds 1 and 2).

Measured numbers: docs/recommended.md.
"""

import dataclasses
import typing

from absl import logging
import numpy as np
import tensorflow as tf

from mtd_tf import em as em_lib
from mtd_tf import priors as priors_lib
from mtd_tf.em import callbacks
from mtd_tf.em import distributed
from mtd_tf.em import front_ends
from mtd_tf.em import options as em_options_lib
from mtd_tf.em import streaming
from mtd_tf.em.options import gamma_schedule
from mtd_tf.priors import sampling
from mtd_tf.recovery import gauge as gauge_lib
from mtd_tf.recovery import starts as starts_lib

__all__ = [
  "RecoveryOptions",
  "MultiStartResult",
  "multistart_em",
  "log_prior_differences",
  "make_starts",
  "recommended_options",
  "RECOMMENDED_ITERATIONS",
  "RECOMMENDED_T_SCHEDULE",
  "RECOMMENDED_GRIDS_PER_AXIS",
  "RECOMMENDED_DENSE_GRID_WEIGHT",
]

# EM iterations of the recommended method: the preconditioned M-step
# converges in tens of iterations where the paper's fixed-step gradient
# ascent needs Table I's 100 (docs/recommended.md).
RECOMMENDED_ITERATIONS = 40
# The prior annealed from t = 0.3 down to its t_prior (`em_options.t_values`):
# on MNIST at SNR 0.1 it brought the error from 0.95 / 0.91 to 0.80 / 0.70
# (seeds 1 / 2), the other SNRs unchanged within 0.05; starting at t = 1
# was no better on average (docs/recommended.md).
RECOMMENDED_T_SCHEDULE = "geometric:0.3"
# Patch grids per axis of the composite likelihood after pruning
# (`patches.offset_grid_patches`): 2 (four grids, offsets of L / 2), or every
# offset (L per axis) where that is cheap (L^2 <= 64). Measured in
# docs/recommended.md.
RECOMMENDED_GRIDS_PER_AXIS = 2
# The prior's weight against the composite likelihood of every offset grid,
# as a fraction of their number (`RecoveryOptions.composite_weight`): grids
# one pixel apart see nearly the same patches, so they are not L^2
# independent copies of the data. On N(mu, I) data (L = 5, 25 grids) 0.6
# lowered the error at SNR 1 by 2-6 % on every one of 12 seeds, SNR 5 and 10
# unchanged within 3 %; the four grids L / 2 apart keep 1 (MNIST at SNR 1
# was 10-16 % worse with 0.6 on 4 seeds). docs/recommended.md.
RECOMMENDED_DENSE_GRID_WEIGHT = 0.6


@dataclasses.dataclass(frozen=True)
class RecoveryOptions:
  """Options of `multistart_em` (defaults: the recommended method).

  Attributes:
    num_windows: highest-energy windows of the measurement used as starts.
    num_prior_draws: probability-flow draws from the prior used as starts
      (0 without a prior).
    prune_at: iteration after which trailing starts are dropped (0: never).
    keep: starts per problem kept after prune_at.
    selection: "log_likelihood" or "map" (see the module docstring).
    gauge: put the winners in the prior's convention (when it has one).
    gauge_at_prune: also put the surviving starts in the convention after
      pruning, so that the prior sees them in its own gauge for the rest of
      the run (measured: docs/recommended.md).
    seed: seed of the prior draws.
    position_sd: the returned winners' centre-of-mass uncertainty in
      pixels (`gauge.centre`): near the convention's half-pixel boundary
      the two whole-pixel positions are mixed (0: whole pixels only).
      `gauge.POSITION_SD` in the recommended method: a digit on the
      boundary is put half in either place instead of a whole pixel off
      half the time (docs/recommended.md). The gauge at the prune point
      always uses whole pixels.
    position_sd_factor: > 0: the returned winners' position_sd is this
      multiple of their centre-of-mass standard error
      (`gauge.centre_of_mass_sd`: sigma, the estimate, and the copies the
      data hold), instead of position_sd: the hedge narrows as the data
      grow. `gauge.POSITION_SD_FACTOR` in the recommended method.
    half_turn_sd: > 0 hedges the returned winners' orientation where the
      prior cannot settle it (`gauge.fix_gauge`, `gauge.aligned_mix`; for
      the score-norm proxy, the uncertainty against the half turn; 0: the
      prior's best orientation alone). `gauge.HALF_TURN_SD` in the
      recommended method. The gauge at the prune point always picks one
      orientation.
    grids_per_axis: patch grids per axis (`patches.offset_grid_patches`):
      after the prune point EM maximises the composite likelihood of the
      patches of all per_axis^2 grids, its data term divided by their number
      (each pixel is counted that many times), i.e. the prior weighted that
      many times (times composite_weight); until then eq. (9)'s grid alone.
    composite_weight: the prior's weight against the composite likelihood
      as a fraction of the number of grids (1: the grids as independent
      data; `RECOMMENDED_DENSE_GRID_WEIGHT` where every offset is a grid).
    orientation_angles: 0: the gauge tries the quarter turns of Phi; n > 0:
      n angles on [0, 2 pi) (`gauge.ORIENTATION_ANGLES` for copies turned
      by any angle, where EM's estimate may stand at any angle).
  """

  num_windows: int = 3
  num_prior_draws: int = 0
  prune_at: int = 0
  keep: int = 2
  selection: str = "log_likelihood"
  gauge: bool = True
  gauge_at_prune: bool = False
  seed: int = 0
  grids_per_axis: int = 1
  composite_weight: float = 1.0
  position_sd: float = 0.0
  half_turn_sd: float = 0.0
  orientation_angles: int = 0
  position_sd_factor: float = 0.0

  def __post_init__(self):
    for name in (
      "num_windows",
      "num_prior_draws",
      "prune_at",
      "seed",
      "orientation_angles",
    ):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if isinstance(self.grids_per_axis, bool) or int(self.grids_per_axis) < 1:
      raise ValueError(
        f"grids_per_axis must be >= 1, got {self.grids_per_axis!r}."
      )
    if not float(self.composite_weight) > 0:
      raise ValueError(
        f"composite_weight must be > 0, got {self.composite_weight}."
      )
    for name in ("position_sd", "half_turn_sd", "position_sd_factor"):
      if not float(getattr(self, name)) >= 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if int(self.keep) < 1:
      raise ValueError(f"keep must be >= 1, got {self.keep}.")
    if self.selection not in ("log_likelihood", "map"):
      raise ValueError(
        f"selection must be 'log_likelihood' or 'map', got {self.selection!r}."
      )


def recommended_options(options, image_size, continuous=False):
  """(`em.EMOptions`, `RecoveryOptions`) of the recommended method.

  Args:
    options: `em.EMOptions` whose K, gamma, t_prior, tolerance, dtype and
      chunking are kept; the M-step becomes the preconditioned one, T
      becomes `RECOMMENDED_ITERATIONS` and the prior is annealed
      (`RECOMMENDED_T_SCHEDULE`).
    image_size: L; prior draws are used as starts only where they are
      cheap (L^2 <= 64: one probability-flow solve per draw).
    continuous: the copies are turned by any angle: the gauge puts the
      estimate upright among `gauge.ORIENTATION_ANGLES` angles.
  """
  # SQUAREM is off: pruning continues the starts at a given tau, and the
  # annealed prior changes the objective with tau.
  em_options = dataclasses.replace(
    options,
    m_step="preconditioned",
    max_iterations=RECOMMENDED_ITERATIONS,
    t_schedule=RECOMMENDED_T_SCHEDULE,
    acceleration="none",
    estimate_shift_prior="occupancy",
  )
  size = int(image_size)
  dense = size**2 <= 64  # every offset a grid, prior draws as starts
  return em_options, RecoveryOptions(
    num_windows=3,
    num_prior_draws=4 if dense else 0,
    prune_at=RECOMMENDED_ITERATIONS // 4,
    keep=1,
    selection="log_likelihood",
    gauge_at_prune=True,
    position_sd_factor=gauge_lib.POSITION_SD_FACTOR,
    half_turn_sd=gauge_lib.HALF_TURN_SD,
    grids_per_axis=size if dense else RECOMMENDED_GRIDS_PER_AXIS,
    composite_weight=RECOMMENDED_DENSE_GRID_WEIGHT if dense else 1.0,
    orientation_angles=gauge_lib.ORIENTATION_ANGLES if continuous else 0,
  )


def _grid_weight(per_axis, composite_weight):
  """The prior's weight against the composite likelihood of per_axis^2 grids.

  Each grid sees every pixel once, so the composite log-likelihood counts
  the data per_axis^2 times; the prior is weighted per_axis^2 times
  composite_weight (1: the grids as independent data).
  """
  grids = int(per_axis) ** 2
  return 1.0 if grids == 1 else grids * float(composite_weight)


class MultiStartResult(typing.NamedTuple):
  """What `multistart_em` returns.

  Attributes:
    estimate: float64 [P, L, L], the winners, in the prior's gauge.
    raw_estimate: float64 [P, L, L], the winners before the gauge.
    winner: int [P], which start of its problem won (0: the given start).
    objective: float64 [S_total], the selection objective of every start
      (NaN for pruned starts).
    groups: int [S_total], the problem of every start.
    iterations: int [P], iterations of the winner.
    problem_iterations: int, EM iterations summed over all starts (the
      cost).
    seconds: wall time of the EM loops.
    sigma: float64 [P], the winners' noise level at the end: the given
      one, or EM's estimate with `em.EMOptions.estimate_sigma`.
    position_sd: float64 [P], the centre-of-mass uncertainty the gauge
      hedged each winner's position by (`RecoveryOptions.position_sd` or
      `position_sd_factor`; 0: whole pixels).
  """

  estimate: np.ndarray
  raw_estimate: np.ndarray
  winner: np.ndarray
  objective: np.ndarray
  groups: np.ndarray
  iterations: np.ndarray
  problem_iterations: int
  seconds: float
  sigma: np.ndarray
  position_sd: np.ndarray


def make_starts(measurement, image_size, init, num_windows, draws=None):
  """The starts of one problem (init, windows, draws): float64 [S, L, L].

  The windows come from the problem's first micrograph (read from disk for
  a `streaming.StreamingData`).
  """
  size, num = int(image_size), int(num_windows)
  parts = [np.asarray(init, np.float64)[None]]
  if isinstance(measurement, distributed.ShardedData):
    if num:
      # Worker 0 holds the data set's first file; every worker starts alike.
      parts.append(
        measurement.from_first_worker(
          lambda: _cycled(
            starts_lib.window_starts(measurement.first_micrograph(), size, num),
            num,
          ),
          (num, size, size),
        )
      )
  elif num:
    if isinstance(measurement, streaming.StreamingData):
      first = measurement.first_micrograph()
    elif isinstance(measurement, (list, tuple)):
      first = measurement[0]
    else:
      first = measurement
    parts.append(starts_lib.window_starts(first, size, num))
  if draws is not None and len(draws):
    parts.append(np.asarray(draws, np.float64))
  return np.concatenate(parts)


def _cycled(windows, num):
  """num windows [num, L, L]: those found, repeated if there were fewer."""
  return np.resize(windows, (num,) + windows.shape[1:])


def _start_labels(groups, members):
  """The names of starts for EM's callbacks (`callbacks.labelled`).

  Args:
    groups: int [S], the problem of every start (ascending).
    members: int [B], the starts of a run.

  Returns:
    B labels "start i" (i: the start within its problem, as
    `MultiStartResult.winner` counts), or "<problem>/start i" with several
    problems, each named by the enclosing `callbacks.labelled` block (one
    label per problem) or by its index.
  """
  groups, members = np.asarray(groups), np.asarray(members)
  first = np.searchsorted(groups, groups)  # [S] its problem's first start
  num = int(groups.max()) + 1 if groups.size else 0
  names = callbacks.current_labels()
  if names is None or len(names) != num:
    names = None if num == 1 else [str(p) for p in range(num)]
  local = members - first[members]  # [B]
  if names is None:
    return [f"start {i}" for i in local]
  return [f"{names[groups[m]]}/start {i}" for m, i in zip(members, local)]


def _is_streamed(measurement):
  """Whether a problem's data are streamed (one pass per iteration)."""
  return isinstance(
    measurement, (streaming.StreamingData, distributed.ShardedData)
  )


def log_prior_differences(prior, images, reference, t, num_points=8):
  """log p_t(F) - log p_t(G) by the line integral of the score (eq. 6-8).

  log p(F) - log p(G) = int_0^1 s(G + u (F - G), t) . (F - G) du, by the
  midpoint rule with `num_points` nodes (exact for a Gaussian prior, whose
  score is linear).

  Args:
    prior: a `priors.Prior`.
    images: float [B, L, L], F.
    reference: float [B, L, L], G.
    t: diffusion time.
    num_points: quadrature nodes.

  Returns:
    float64 [B].
  """
  images = np.asarray(images, np.float64)
  reference = np.asarray(reference, np.float64)
  step = images - reference  # [B, L, L]
  total = np.zeros(len(images))
  for i in range(int(num_points)):
    u = (i + 0.5) / num_points
    x = tf.constant(reference + u * step, tf.float32)
    score = np.asarray(
      prior(x, tf.fill([len(images)], tf.constant(float(t), tf.float32))),
      np.float64,
    )
    total += np.sum(score * step, axis=(1, 2)) / num_points
  return total


def _last_finite(history):
  """The last finite value of each column of [T, B] (NaN when none)."""
  out = np.full(history.shape[1], np.nan)
  for b in range(history.shape[1]):
    finite = np.flatnonzero(np.isfinite(history[:, b]))
    if len(finite):
      out[b] = history[finite[-1], b]
  return out


def _objective(log_likelihood, estimates, groups, prior, weight, t, selection):
  """The selection objective of every start [B]."""
  if selection == "log_likelihood" or prior is None or weight <= 0:
    return log_likelihood
  objective = np.array(log_likelihood, np.float64)
  # log p differences relative to the first start of each problem.
  first = {}
  for b, g in enumerate(groups):
    first.setdefault(int(g), b)
  reference = estimates[[first[int(g)] for g in groups]]
  return objective + weight * log_prior_differences(
    prior, estimates, reference, t
  )


def _prior_draws(prior, num, size, recovery):
  """num lists of probability-flow draws used as starts, or Nones."""
  draws = [None] * num
  if prior is None or not recovery.num_prior_draws:
    return draws
  count = int(recovery.num_prior_draws)
  try:
    images, _ = sampling.sample_images(prior, num * count, recovery.seed)
    return list(np.asarray(images, np.float64).reshape(num, count, size, size))
  except tf.errors.InvalidArgumentError as err:
    # The ODE solver gives up when the score is not finite.
    raise em_lib.EMDivergedError(
      "the prior returned NaN or Inf scores while drawing starts from "
      "it: check the prior (or run without it)."
    ) from err
  except sampling.SamplingError as err:
    # A prior the sampler cannot use (a score that ignores t): the other
    # start families remain.
    logging.warning("No prior draws as starts: %s", err)
    return draws


@dataclasses.dataclass
class _Starts:
  """Every start of every problem, as EM leaves them (S starts in all)."""

  groups: np.ndarray  # int [S], the problem of each start
  estimates: np.ndarray  # float64 [S, L, L]
  sigmas: np.ndarray  # float64 [S]
  log_likelihood: np.ndarray  # float64 [S], NaN until a start has run
  iterations: np.ndarray  # int [S]
  alive: np.ndarray  # int [S'], the starts still running
  seconds: float = 0.0
  cost: int = 0  # EM iterations summed over starts

  def record(self, members, result):
    """Takes a run of `members`' result (its last finite log-likelihood)."""
    self.estimates[members] = result.estimate
    self.sigmas[members] = result.sigma
    last = _last_finite(result.log_likelihood)
    self.log_likelihood[members] = np.where(
      np.isfinite(last), last, self.log_likelihood[members]
    )
    self.iterations[members] += np.asarray(result.iterations)
    self.seconds += result.seconds
    self.cost += int(np.sum(result.iterations))


class _StartRunner:
  """Runs a subset of the starts from tau = begin to end on one grid family.

  The spectra of each grid family (`RecoveryOptions.grids_per_axis`) are
  made once, when first needed, and shared by all starts of a problem. A
  problem streamed from disk (`streaming.StreamingData`, one problem) runs
  all its starts through one pass over the micrographs per iteration; its
  other grid families are opened with `StreamingData.regrid`, the family
  in use before being closed, so that one family's spectra are held at a
  time within the budget.
  """

  def __init__(
    self, measurements, size, starts, prior, m_step, options, recovery
  ):
    self._measurements = measurements
    self._size = size
    self._starts = starts
    self._prior = prior
    self._m_step = m_step
    self._options = options
    self._recovery = recovery
    self._data = {}  # grids per axis -> `patches.PatchSpectra`

  @property
  def streamed(self):
    return _is_streamed(self._measurements[0])

  def close(self):
    """Closes the streamed grid families this runner opened (not the
    caller's) and lets go of the in-memory spectra."""
    if self.streamed:
      for data in self._data.values():
        if data is not self._measurements[0]:
          data.close()
    self._data = {}

  def _streamed_data(self, per_axis):
    """The problem's micrographs on per_axis^2 grids, the others closed."""
    given = self._measurements[0]
    if per_axis not in self._data:
      for data in self._data.values():
        data.close()  # the given one stays usable: a later pass re-reads
      self._data = {
        per_axis: (
          given if given.grids_per_axis == per_axis else given.regrid(per_axis)
        )
      }
    return self._data[per_axis]

  def __call__(self, members, begin, end, per_axis, options=None):
    # EM's callbacks (TensorBoard's curves) see the starts by name.
    with callbacks.labelled(_start_labels(self._starts.groups, members)):
      return self._run(members, begin, end, per_axis, options)

  def _run(self, members, begin, end, per_axis, options=None):
    options = options or self._options
    if self.streamed:
      return self._run_streamed(members, begin, end, per_axis, options)
    if per_axis not in self._data:
      patch_sets = [
        em_lib.collect_patches(m, self._size, False, per_axis)
        for m in self._measurements
      ]
      # Chunks as for the P problems alone: with the S-fold batch a chunk
      # of one patch per problem is slower (measured 2.6 vs 1.9 s per
      # iteration for 120 starts of MNIST).
      self._data[per_axis] = front_ends.prepare_spectra(
        patch_sets, self._options, share=len(self._measurements)
      )
    result = em_lib.run_prepared(
      self._data[per_axis],
      self._batch(members, per_axis),
      self._prior,
      options,
      max_iterations=end,
      groups=self._starts.groups[members],
      start_iteration=begin,
    )
    self._starts.record(members, result)
    return result

  def _batch(self, members, per_axis):
    # The composite likelihood of G grids counts each pixel G times.
    scale = (self._prior is not None) * _grid_weight(
      per_axis, self._recovery.composite_weight
    )
    return em_lib.ProblemBatch(
      self._starts.sigmas[members],
      self._starts.estimates[members],
      [self._m_step] * len(members),
      [scale] * len(members),
    )

  def _run_streamed(self, members, begin, end, per_axis, options):
    result = front_ends.run_streaming(
      self._streamed_data(per_axis),
      self._batch(members, per_axis),
      self._prior,
      options,
      max_iterations=end,
      start_iteration=begin,
    )
    self._starts.record(members, result)
    return result


def _measurement_sum(measurement):
  """The sum of a problem's pixels (float): an array, a list of them, or
  streamed micrographs (their patches' sum, counted once per grid)."""
  if _is_streamed(measurement):
    return measurement.patch_sum() / measurement.grids_per_axis**2
  if isinstance(measurement, (list, tuple)):
    return float(sum(np.sum(m, dtype=np.float64) for m in measurement))
  return float(np.sum(measurement, dtype=np.float64))


def _centre_of_mass_sd(measurements, estimates, sigmas):
  """`gauge.centre_of_mass_sd` of each problem's winner, float64 [P]."""
  copies = [
    gauge_lib.copies_in_data(_measurement_sum(m), x)
    for m, x in zip(measurements, estimates)
  ]
  return np.asarray(
    gauge_lib.centre_of_mass_sd(estimates, sigmas, copies), np.float64
  ).reshape(len(estimates))


def _prune(starts, run, prior, options, recovery, weight, t_prior):
  """Phase 1: every start on eq. (9)'s grid to the prune point, then the
  best `keep` of each problem survive (in the prior's gauge, if asked)."""
  # sigma's M-step waits for the survivors: the starts are far from any
  # mode before the prune point, and the residual they leave would
  # inflate sigma and change which starts survive.
  run(
    starts.alive,
    0,
    int(recovery.prune_at),
    1,
    dataclasses.replace(options, estimate_sigma=False),
  )
  objective = _objective(
    starts.log_likelihood,
    starts.estimates,
    starts.groups,
    prior,
    weight,
    t_prior,
    recovery.selection,
  )
  starts.alive = np.flatnonzero(
    starts_lib.prune(objective, starts.groups, recovery.keep)
  )
  if recovery.gauge_at_prune and recovery.gauge and prior is not None:
    # In the loop: the prior sees the survivors in its own convention.
    starts.estimates[starts.alive] = gauge_lib.apply_convention(
      starts.estimates[starts.alive],
      prior,
      options.num_rotations,
      angles=recovery.orientation_angles,
    )


def _select(starts, prior, recovery, weight, t_prior):
  """The winner of each problem among the survivors: (objective [S], int [P])."""
  alive = starts.alive
  final = np.full(len(starts.groups), np.nan)
  final[alive] = _objective(
    starts.log_likelihood[alive],
    starts.estimates[alive],
    starts.groups[alive],
    prior,
    weight,
    t_prior,
    recovery.selection,
  )
  _, winners = starts_lib.select(final, starts.groups)
  return final, winners


def multistart_em(
  measurements,
  image_size,
  sigmas,
  *,
  inits,
  prior=None,
  m_step="preconditioned",
  options=em_lib.EMOptions(),
  recovery=RecoveryOptions(),
):
  """Several starts per problem, pruned, selected and gauged (module doc).

  Stages: the starts (the given one, windows, prior draws), phase 1 on eq.
  (9)'s grid to the prune point (`_prune`), phase 2 of the survivors on
  every offset grid, the selection (`_select`) and the gauge.

  Args:
    measurements: list of P items, each an array [H, W] or a list of such
      micrographs sharing one image; or one `streaming.StreamingData` or
      `distributed.ShardedData` (P = 1: every start streams the
      micrographs, one pass per iteration; sharded, every worker passes
      its own share and all end with the same result).
    image_size: L.
    sigmas: P noise standard deviations.
    inits: float [P, L, L], each problem's given start (the paper's).
    prior: None or a `priors.Prior`.
    m_step: the M-step of every start (`em.M_STEPS`).
    options: `em.EMOptions` (max_iterations = T in all).
    recovery: `RecoveryOptions`.

  Returns:
    `MultiStartResult`.
  """
  size = int(image_size)
  num = len(measurements)
  if num > 1 and any(_is_streamed(m) for m in measurements):
    raise ValueError(
      "Streamed micrographs run as one problem: give multistart_em one "
      "StreamingData or ShardedData."
    )
  if prior is not None:
    prior = priors_lib.as_prior(prior, size)
  inits = np.asarray(inits, np.float64)
  if inits.shape != (num, size, size):
    raise ValueError(
      f"inits must have shape {(num, size, size)}, got {inits.shape}."
    )
  draws = _prior_draws(prior, num, size, recovery)
  per_problem = [
    make_starts(m, size, init, recovery.num_windows, d)
    for m, init, d in zip(measurements, inits, draws)
  ]
  groups = np.concatenate(
    [np.full(len(s), p) for p, s in enumerate(per_problem)]
  )  # [S]
  sigmas = np.asarray(sigmas, np.float64).reshape(num)
  starts = _Starts(
    groups=groups,
    estimates=np.concatenate(per_problem),  # [S, L, L]
    # EM's own estimate after the prune point with options.estimate_sigma.
    sigmas=sigmas[groups].copy(),
    log_likelihood=np.full(len(groups), np.nan),
    iterations=np.zeros(len(groups), int),
    alive=np.arange(len(groups)),
  )
  run = _StartRunner(
    measurements, size, starts, prior, m_step, options, recovery
  )
  total = int(options.max_iterations)
  t_prior = em_options_lib.resolve_t_prior(options.t_prior, prior)
  final_gamma = float(
    gamma_schedule(options.gamma)(
      tf.constant(float(total), tf.float64),
      tf.constant(float(total), tf.float64),
    )
  )
  weight = (1.0 if prior is not None else 0.0) * final_gamma
  # All starts run on eq. (9)'s grid until the prune point; the survivors
  # go on with the composite likelihood of every grid (4 grids for 4 starts
  # would cost 4x per iteration where most starts are dropped anyway).
  per_axis = int(recovery.grids_per_axis)
  begin = 0
  try:
    if 0 < int(recovery.prune_at) < total:
      _prune(starts, run, prior, options, recovery, weight, t_prior)
      begin = int(recovery.prune_at)
    run(starts.alive, begin, total, per_axis)
  finally:
    run.close()
  final, winners = _select(
    starts,
    prior,
    recovery,
    weight * _grid_weight(per_axis, recovery.composite_weight),
    t_prior,
  )
  raw = starts.estimates[winners]
  gauged = raw
  position_sd = np.full(num, float(recovery.position_sd))
  if recovery.gauge and prior is not None:
    if recovery.position_sd_factor > 0:
      position_sd = recovery.position_sd_factor * _centre_of_mass_sd(
        measurements, raw, starts.sigmas[winners]
      )
    gauged = gauge_lib.apply_convention(
      raw,
      prior,
      options.num_rotations,
      position_sd=position_sd,
      half_turn_sd=recovery.half_turn_sd,
      angles=recovery.orientation_angles,
    )
  first = np.searchsorted(groups, np.arange(num))
  return MultiStartResult(
    estimate=np.asarray(gauged, np.float64),
    raw_estimate=raw,
    winner=winners - first,
    objective=final,
    groups=groups,
    iterations=starts.iterations[winners],
    problem_iterations=starts.cost,
    seconds=starts.seconds,
    sigma=starts.sigmas[winners],
    position_sd=position_sd,
  )
