"""SQUAREM: fewer EM iterations for M-steps that maximise Q, eq. (16)-(17).

EM is a fixed-point map F -> M(F) that converges linearly, slowly where the
likelihood is flat. SQUAREM (Varadhan and Roland 2008, scheme S3) takes two
EM steps F1 = M(F0), F2 = M(F1), extrapolates along them,

  r = F1 - F0,  v = F2 - F1 - r,  alpha = min(-||r|| / ||v||, -1),
  F' = F0 - 2 alpha r + alpha^2 v,

and stabilises with one more EM step from F'. The log-likelihood of F'
comes with that step (the E-step computes it), so the safeguard costs
nothing: if log p(F') is not finite or is below log p(F1), the cycle falls
back to F2, the plain EM point. Either way the next start's log-likelihood
is at least that of F1, hence of F0: the ascent property of EM holds for
the accelerated sequence. alpha = -1 gives F' = F2 exactly.

This holds for the exact maximisers (the closed-form M-step) and, closely,
for the preconditioned M-step; the gradient M-step of eq. (18) with a
small step is not a maximiser and gains little.

#### References
R. Varadhan and C. Roland, Simple and globally convergent methods for
accelerating the convergence of any EM algorithm, Scand. J. Stat. 35 (2008).
"""

import dataclasses
import time
import typing

import numpy as np

__all__ = ["SquaremResult", "squarem", "prepared_em_map"]


class SquaremResult(typing.NamedTuple):
  """What `squarem` returns.

  Attributes:
    estimate: float64 numpy [B, L, L], the last accepted point (or, per
      problem, the first evaluated point that reached the target).
    log_likelihood: float64 numpy [cycles + 1, B], log p at each cycle's
      start (non-decreasing per problem; NaN once a problem stopped), then
      at the returned estimate.
    evaluations: EM-map evaluations in all (each is one E-step and one
      M-step: an iteration-equivalent).
    evaluations_to_target: float numpy [B], evaluations until the target
      log-likelihood was first seen (NaN: not reached).
    seconds_to_target: float numpy [B], wall time until then (NaN: not
      reached).
    accepted: bool numpy [cycles, B], whether each cycle kept its
      extrapolated point (False: fell back to plain EM).
    seconds: wall time.
  """

  estimate: np.ndarray
  log_likelihood: np.ndarray
  evaluations: int
  evaluations_to_target: np.ndarray
  seconds_to_target: np.ndarray
  accepted: np.ndarray
  seconds: float


def _norm(x):
  return np.sqrt(np.sum(x**2, axis=(1, 2)))  # [B]


def squarem(
  em_map,
  init,
  *,
  max_evaluations=300,
  target_log_likelihood=None,
  tolerance=0.0,
):
  """Runs SQUAREM (scheme S3) with the ascent safeguard over a batch.

  Args:
    em_map: callable F [B, L, L] -> (M(F) [B, L, L], log p(F) [B]): one EM
      iteration from F and the log-likelihood at F (what one iteration of
      the EM loop computes anyway).
    init: array [B, L, L] (or [L, L]), F(0).
    max_evaluations: stop after this many calls of `em_map` (a cycle that
      has begun finishes; at most 2 calls more).
    target_log_likelihood: None or [B]: a problem stops (its estimate is
      frozen) once an evaluated point reaches it; all stop when every
      problem has.
    tolerance: a problem also stops when its step ||F_new - F0||_F falls
      below this.

  Returns:
    `SquaremResult`.

  Raises:
    ValueError: on a non-finite init or a bad max_evaluations.
  """
  start_time = time.perf_counter()
  current = np.array(init, np.float64)
  if current.ndim == 2:
    current = current[None]
  if current.ndim != 3 or not np.all(np.isfinite(current)):
    raise ValueError("init must be a finite array [B, L, L] or [L, L].")
  if int(max_evaluations) < 1:
    raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}.")
  batch = current.shape[0]
  target = (
    None
    if target_log_likelihood is None
    else np.broadcast_to(np.asarray(target_log_likelihood, np.float64), [batch])
  )
  active = np.ones(batch, bool)
  reached = np.full(batch, np.nan)
  seconds_to_target = np.full(batch, np.nan)
  history, accepted = [], []
  evaluations = 0

  def evaluate(points):
    """One EM map call; records and freezes problems that reach the target."""
    nonlocal evaluations
    mapped, loglik = em_map(points)
    evaluations += 1
    mapped = np.asarray(mapped, np.float64)
    loglik = np.asarray(loglik, np.float64).reshape(batch)
    if target is not None:
      hit = active & np.isfinite(loglik) & (loglik >= target)
      reached[hit] = evaluations
      seconds_to_target[hit] = time.perf_counter() - start_time
      current[hit] = points[hit]
      active[hit] = False
    return mapped, loglik

  while np.any(active) and evaluations < int(max_evaluations):
    running = active.copy()
    first, loglik0 = evaluate(current)  # F1 = M(F0)
    history.append(np.where(running, loglik0, np.nan))
    if not np.any(active):
      break
    second, loglik1 = evaluate(first)  # F2 = M(F1)
    if not np.any(active):
      break
    r = first - current  # [B, L, L]
    v = second - first - r
    norm_v = _norm(v)
    alpha = -_norm(r) / np.where(norm_v > 0, norm_v, 1.0)  # [B]
    alpha = np.where(norm_v > 0, np.minimum(alpha, -1.0), -1.0)
    a = alpha[:, None, None]
    proposal = current - 2 * a * r + a**2 * v  # F'
    proposal = np.where(np.isfinite(proposal), proposal, second)
    stabilised, loglik_proposal = evaluate(proposal)  # M(F'), log p(F')
    # The safeguard: keep the extrapolation only if it did not lose
    # likelihood against the plain EM steps it skipped.
    keep = (
      np.isfinite(loglik_proposal)
      & (loglik_proposal >= loglik1)
      & np.all(np.isfinite(stabilised), axis=(1, 2))
    )
    new = np.where(keep[:, None, None], stabilised, second)
    step = _norm(new - current)
    current = np.where(active[:, None, None], new, current)
    accepted.append(keep & active)
    active &= ~(step < tolerance)

  # The log-likelihood of the returned estimate (one more E-step, not
  # counted as an iteration: plain EM's loop reports it the same way).
  final_loglik = em_map(current)[1]
  history.append(np.asarray(final_loglik, np.float64).reshape(batch))
  return SquaremResult(
    estimate=current,
    log_likelihood=np.array(history),
    evaluations=evaluations,
    evaluations_to_target=reached,
    seconds_to_target=seconds_to_target,
    accepted=np.array(accepted, bool).reshape(-1, batch),
    seconds=time.perf_counter() - start_time,
  )


def prepared_em_map(data, batch, prior, options):
  """An `em_map` from the library's compiled EM loop on precomputed spectra.

  The one adapter between SQUAREM and `em.py`'s prepared data: one
  iteration of `em.run_prepared` from F returns M(F) and the log-likelihood
  at F. (`em.EMOptions(acceleration="squarem")` runs SQUAREM inside `em`.)

  Args:
    data, batch, prior, options: as `em.run_prepared` (batch's inits are
      replaced by F at each call; options.acceleration is not used).

  Returns:
    callable F [B, L, L] -> (M(F) [B, L, L], log p(F) [B]).
  """
  from mtd_tf import em  # pylint: disable=g-import-not-at-top

  plain = dataclasses.replace(
    options, acceleration="none", tolerance=0.0, progress_every=0
  )

  def em_map(images):
    problems = dataclasses.replace(batch, inits=np.asarray(images, np.float64))
    result = em.run_prepared(data, problems, prior, plain, max_iterations=1)
    return result.estimate, result.log_likelihood[0]

  return em_map
