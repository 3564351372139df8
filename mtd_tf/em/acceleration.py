"""Fewer EM iterations for M-steps that maximise Q, eq. (16)-(17).

EM is a fixed-point map F -> M(F) that converges linearly, slowly where the
likelihood is flat. Three accelerators use its iterates, all with a
safeguard that keeps EM's ascent property (the E-step computes log p at
the map's input, so checking a proposal costs no extra E-step).

The diagonal secant method (`secant`) is Newton's method for the fixed
point with the map's Jacobian J taken as diagonal in pixels, which in MTD
it nearly is: F' = F + f / (1 - r), f = M(F) - F, with each pixel's rate r
estimated from the last two accepted iterates (`_rates`), once two
estimates agree. A step that loses likelihood is discarded for the plain
EM point M(F), already computed.

Anderson acceleration (`anderson`; Walker and Ni 2011, with the
restarts and monotonicity control of Henderson and Varadhan 2019's
DAAREM) keeps the last m + 1 accepted iterates F_j and their residuals
f_j = M(F_j) - F_j, mixes them by least squares,

  gamma = argmin ||f_k - dF gamma||^2 + lambda ||gamma||^2,
  F' = F_k + f_k - (dX + dF) gamma,

(dX, dF: the columns F_{j+1} - F_j, f_{j+1} - f_j) and evaluates M at F',
one EM-map evaluation per iteration. If log p(F') is not finite or is
below log p(F_k), F' is discarded, the plain EM point M(F_k) (already
computed) is taken and the history restarts. The first `warmup`
iterations are plain EM steps (far from the fixed point the map is not
near linear and mixing loses more than it gains).

SQUAREM (Varadhan and Roland 2008, scheme S3) takes two
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

Near the fixed point EM is linear with rate the largest eigenvalue of its
Jacobian (the fraction of missing information); on the micrograph preset
the eigenvalues fill [0, 0.82], so no polynomial in J (Anderson, SQUAREM)
converges faster than the Chebyshev rate (1 - sqrt(1 - 0.82)) /
(1 + sqrt(1 - 0.82)) = 0.40 per evaluation against plain EM's 0.82. Those
eigenvalues are the rates of pixels (near 0.8 at the frame's corners, near
0 on the image's support), which the secant method takes one by one: 13
evaluations there against Anderson's 22 and plain EM's 49
(docs/scaling.md).

#### References
H. F. Walker and P. Ni, Anderson acceleration for fixed-point iterations,
SIAM J. Numer. Anal. 49 (2011).
N. C. Henderson and R. Varadhan, Damped Anderson acceleration with
restarts and monotonicity control for accelerating EM and EM-like
algorithms, J. Comput. Graph. Stat. 28 (2019).
R. Varadhan and C. Roland, Simple and globally convergent methods for
accelerating the convergence of any EM algorithm, Scand. J. Stat. 35 (2008).
"""

import time
import typing

import numpy as np
from scipy import ndimage

__all__ = [
  "METHODS",
  "AccelerationResult",
  "SquaremResult",
  "anderson",
  "squarem",
  "secant",
]

# The accelerators by name (`EMOptions.acceleration`).
METHODS = ("anderson", "secant", "squarem")


class AccelerationResult(typing.NamedTuple):
  """What `anderson` and `squarem` return.

  Attributes:
    estimate: float64 numpy [B, L, L], the last accepted point (or, per
      problem, the first evaluated point that reached the target).
    log_likelihood: float64 numpy [steps + 1, B], log p at each step's
      start (a SQUAREM cycle's, an Anderson iteration's accepted point;
      non-decreasing per problem; NaN once a problem stopped), then at the
      returned estimate.
    evaluations: EM-map evaluations in all (each is one E-step and one
      M-step: an iteration-equivalent).
    evaluations_to_target: float numpy [B], evaluations until the target
      log-likelihood was first seen (NaN: not reached).
    seconds_to_target: float numpy [B], wall time until then (NaN: not
      reached).
    accepted: bool numpy [steps, B], whether each step kept its
      extrapolated point (False: fell back to plain EM, or a plain step).
    seconds: wall time.
  """

  estimate: np.ndarray
  log_likelihood: np.ndarray
  evaluations: int
  evaluations_to_target: np.ndarray
  seconds_to_target: np.ndarray
  accepted: np.ndarray
  seconds: float


SquaremResult = AccelerationResult  # The name before Anderson acceleration.


def _norm(x):
  return np.sqrt(np.sum(x**2, axis=(1, 2)))  # [B]


def _start(init, max_evaluations, target_log_likelihood):
  """The checked float64 [B, L, L] start and the [B] targets (or None)."""
  current = np.array(init, np.float64)
  if current.ndim == 2:
    current = current[None]
  if current.ndim != 3 or not np.all(np.isfinite(current)):
    raise ValueError("init must be a finite array [B, L, L] or [L, L].")
  if int(max_evaluations) < 1:
    raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}.")
  target = (
    None
    if target_log_likelihood is None
    else np.broadcast_to(
      np.asarray(target_log_likelihood, np.float64), [current.shape[0]]
    )
  )
  return current, target


class _Targets:
  """Which problems still run, and when each first reached its target."""

  def __init__(self, target, batch):
    self.target = target  # None or float64 [B]
    self.active = np.ones(batch, bool)
    self.reached = np.full(batch, np.nan)
    self.seconds = np.full(batch, np.nan)
    self.started = time.perf_counter()

  def evaluate(self, em_map, points, evaluations):
    """One `em_map` call, as float64; marks running problems at the target.

    Returns:
      (M(F) [B, L, L], log p(F) [B], hit [B]).
    """
    mapped, loglik = em_map(points)
    mapped = np.asarray(mapped, np.float64)
    loglik = np.asarray(loglik, np.float64).reshape(len(self.active))
    return mapped, loglik, self.hits(loglik, evaluations)

  def hits(self, loglik, evaluations):
    """Marks running problems whose log p reached the target; returns them."""
    if self.target is None:
      return np.zeros_like(self.active)
    hit = self.active & np.isfinite(loglik) & (loglik >= self.target)
    self.reached[hit] = evaluations
    self.seconds[hit] = time.perf_counter() - self.started
    self.active &= ~hit
    return hit

  def result(self, em_map, estimate, rows, accepted, evaluations):
    """The `AccelerationResult`, with log p at the estimate as last row.

    That log-likelihood costs one more E-step, not counted as an iteration
    (plain EM's loop reports it the same way).
    """
    batch = len(self.active)
    rows = list(rows) + [
      np.asarray(em_map(estimate)[1], np.float64).reshape(batch)
    ]
    return AccelerationResult(
      estimate=estimate,
      log_likelihood=np.array(rows),
      evaluations=evaluations,
      evaluations_to_target=self.reached,
      seconds_to_target=self.seconds,
      accepted=np.array(accepted, bool).reshape(-1, batch),
      seconds=time.perf_counter() - self.started,
    )


def _kept(plain, mapped, loglik, last_loglik):
  """The safeguard: which evaluated points are kept, [B] bool.

  A plain EM point is kept (EM ascends); any other only if M at it and its
  log-likelihood are finite and it lost no likelihood against last_loglik.
  """
  finite = np.isfinite(loglik) & np.all(np.isfinite(mapped), axis=(1, 2))
  return plain | (finite & (loglik >= last_loglik))


def _mix(points, residuals, regularisation):
  """Anderson's extrapolation from one problem's history.

  Args:
    points: float64 [n, P], the accepted iterates F_j (oldest first).
    residuals: float64 [n, P], f_j = M(F_j) - F_j.
    regularisation: lambda relative to the mean squared column norm of dF
      (Tikhonov: keeps the mixing bounded when residuals are near
      collinear).

  Returns:
    float64 [P]: F' = F_n + f_n - (dX + dF) gamma.
  """
  d_points = np.diff(points, axis=0).T  # [P, n - 1]
  d_residuals = np.diff(residuals, axis=0).T  # [P, n - 1]
  gram = d_residuals.T @ d_residuals  # [n - 1, n - 1]
  scale = np.trace(gram) / len(gram)
  if not np.isfinite(scale) or scale <= 0:
    return points[-1] + residuals[-1]
  gamma = np.linalg.lstsq(
    gram + regularisation * scale * np.eye(len(gram)),
    d_residuals.T @ residuals[-1],
    rcond=None,
  )[0]
  return points[-1] + residuals[-1] - (d_points + d_residuals) @ gamma


def anderson(
  em_map,
  init,
  *,
  depth=5,
  warmup=8,
  regularisation=1e-10,
  max_evaluations=300,
  target_log_likelihood=None,
  tolerance=0.0,
):
  """Runs safeguarded Anderson acceleration over a batch of B problems.

  Each problem keeps its own history; one `em_map` call per iteration
  evaluates every running problem's next point (an Anderson proposal, or
  the plain EM point after a rejection or during warmup).

  Args:
    em_map: callable F [B, L, L] -> (M(F) [B, L, L], log p(F) [B]): one EM
      iteration from F and the log-likelihood at F.
    init: array [B, L, L] (or [L, L]), F(0).
    depth: m, how many differences of past iterates are mixed.
    warmup: the first `warmup` iterations are plain EM steps (their
      iterates fill the history).
    regularisation: Tikhonov lambda of the least squares, relative to the
      mean squared norm of the residual differences.
    max_evaluations: stop after this many calls of `em_map`.
    target_log_likelihood: None or [B]: a problem stops (its estimate is
      frozen) once an evaluated point reaches it; all stop when every
      problem has.
    tolerance: a problem also stops when an accepted step ||F_new - F||_F
      falls below this.

  Returns:
    `AccelerationResult` (one log_likelihood row and one accepted row per
    evaluation after the first).

  Raises:
    ValueError: on a non-finite init, a bad max_evaluations or depth.
  """
  current, target = _start(init, max_evaluations, target_log_likelihood)
  if int(depth) < 1 or int(warmup) < 0:
    raise ValueError(f"depth must be >= 1, warmup >= 0; got {depth}, {warmup}.")
  batch, shape = current.shape[0], current.shape[1:]
  targets = _Targets(target, batch)
  active = targets.active  # updated in place
  # The last accepted point per problem, M at it and log p at it.
  accepted_points = current.copy()  # [B, L, L]
  accepted_maps = np.zeros_like(current)
  accepted_loglik = np.full(batch, -np.inf)
  histories = [[] for _ in range(batch)]  # per problem: [(F_j, f_j)]
  plain = np.ones(batch, bool)  # whether `current` is a plain EM point
  rows, accepted = [], []
  evaluations = 0
  while np.any(active) and evaluations < int(max_evaluations):
    running = active.copy()
    evaluations += 1
    mapped, loglik, hit = targets.evaluate(em_map, current, evaluations)
    accepted_points[hit] = current[hit]
    keep = _kept(plain, mapped, loglik, accepted_loglik)
    if evaluations > 1:
      rows.append(np.where(running, accepted_loglik, np.nan))
      accepted.append(running & keep & ~plain)
    step = _norm(current - accepted_points)  # [B]
    following = current.copy()
    for b in np.flatnonzero(active):
      if keep[b]:
        accepted_points[b], accepted_maps[b] = current[b], mapped[b]
        accepted_loglik[b] = loglik[b]
        histories[b] = histories[b][-depth:] + [
          (current[b].ravel(), (mapped[b] - current[b]).ravel())
        ]
        if evaluations > 1 and step[b] < tolerance:
          active[b] = False
          continue
      else:
        histories[b] = histories[b][-1:]  # restart from the last accepted
      if keep[b] and evaluations > warmup and len(histories[b]) > 1:
        points, residuals = (np.array(h) for h in zip(*histories[b]))
        proposal = _mix(points, residuals, regularisation).reshape(shape)
        plain[b] = not np.all(np.isfinite(proposal))
        following[b] = accepted_maps[b] if plain[b] else proposal
      else:
        following[b], plain[b] = accepted_maps[b], True
    current = np.where(active[:, None, None], following, accepted_points)
  return targets.result(em_map, accepted_points, rows, accepted, evaluations)


def _rates(d_points, d_residuals, smoothing, max_rate):
  """Each pixel's EM rate, from one secant pair, smoothed over neighbours.

  Near the fixed point f(F) = M(F) - F moves as df = -(I - J) dF with J
  the EM map's Jacobian, nearly diagonal in pixels: a pixel's rate J_ii
  is the fraction of its information the hidden shifts and rotations
  take away (near the frame's edge, far from the image's support, up to
  0.8; inside it, about 0). It varies smoothly over the frame, so the
  per-pixel secant -df dF / dF^2 is averaged over a Gaussian window.

  Args:
    d_points: float64 [B, L, L], F_k - F_j.
    d_residuals: float64 [B, L, L], f_k - f_j.
    smoothing: the window's standard deviation in pixels.
    max_rate: the rates are clipped to [0, max_rate].

  Returns:
    float64 [B, L, L].
  """
  window = (0, smoothing, smoothing)  # no smoothing across problems
  slope = ndimage.gaussian_filter(
    -d_residuals * d_points, window, mode="nearest"
  )
  size = ndimage.gaussian_filter(d_points**2, window, mode="nearest")
  shrink = np.divide(slope, size, out=np.ones_like(size), where=size > 0)
  return np.clip(1.0 - shrink, 0.0, max_rate)  # [B, L, L]


def secant(
  em_map,
  init,
  *,
  smoothing=1.0,
  max_rate=0.95,
  agreement=0.1,
  max_evaluations=300,
  target_log_likelihood=None,
  tolerance=0.0,
):
  """Runs safeguarded diagonal secant acceleration over a batch of B problems.

  Newton's step for the fixed point of M is F + (I - J)^-1 f(F). Where J
  is nearly diagonal in pixels (`_rates`) that is F + f / (1 - r) with r
  the pixels' rates, each estimated from the last two accepted iterates:
  a pixel whose EM steps shrink by r per iteration gets the whole
  geometric series of its remaining steps at once. Unlike Anderson's or
  SQUAREM's mixing (polynomials in J, bounded by the Chebyshev rate of
  J's spectrum) the step adapts to every pixel's own rate.

  Steps are plain EM until the map is near linear: two consecutive rate
  estimates from plain steps agree (mean |r_k - r_(k-1)| below
  `agreement`); from then on every step is a secant step. A step that
  lost likelihood (or is not finite) is discarded, EM's point from the
  last accepted iterate is taken, and agreement must be seen again.

  Args:
    em_map: callable F [B, L, L] -> (M(F) [B, L, L], log p(F) [B]): one EM
      iteration from F and the log-likelihood at F.
    init: array [B, L, L] (or [L, L]), F(0).
    smoothing: the rate estimates' Gaussian window (pixels).
    max_rate: rates are clipped to [0, max_rate] (a step is at most
      1 / (1 - max_rate) times EM's).
    agreement: the mean absolute change of the rates below which the map
      is taken as near linear.
    max_evaluations: stop after this many calls of `em_map`.
    target_log_likelihood: None or [B]: a problem stops (its estimate is
      frozen) once an evaluated point reaches it; all stop when every
      problem has.
    tolerance: a problem also stops when an accepted step ||F_new - F||_F
      falls below this.

  Returns:
    `AccelerationResult` (one log_likelihood row and one accepted row per
    evaluation after the first).

  Raises:
    ValueError: on a non-finite init, a bad max_evaluations, smoothing,
      max_rate or agreement.
  """
  current, target = _start(init, max_evaluations, target_log_likelihood)
  if not (smoothing > 0 and 0 <= max_rate < 1 and agreement > 0):
    raise ValueError(
      "smoothing and agreement must be > 0 and max_rate in [0, 1); got "
      f"{smoothing}, {agreement}, {max_rate}."
    )
  batch = current.shape[0]
  targets = _Targets(target, batch)
  active = targets.active  # updated in place
  # The last accepted point per problem, M at it and log p at it.
  accepted_points = current.copy()  # [B, L, L]
  accepted_maps = np.zeros_like(current)
  accepted_loglik = np.full(batch, -np.inf)
  has_accepted = np.zeros(batch, bool)
  last_rates = np.zeros_like(current)  # [B, L, L]
  has_rates = np.zeros(batch, bool)
  engaged = np.zeros(batch, bool)
  plain = np.ones(batch, bool)  # whether `current` is a plain EM point
  rows, accepted = [], []
  evaluations = 0
  while np.any(active) and evaluations < int(max_evaluations):
    running = active.copy()
    evaluations += 1
    mapped, loglik, hit = targets.evaluate(em_map, current, evaluations)
    accepted_points[hit] = current[hit]
    keep = running & _kept(plain, mapped, loglik, accepted_loglik)
    if evaluations > 1:
      rows.append(np.where(running, accepted_loglik, np.nan))
      accepted.append(keep & ~plain)
    residuals = mapped - current  # [B, L, L]
    # The secant from the last accepted point.
    d_points = current - accepted_points  # [B, L, L]
    step = _norm(d_points)  # [B]
    rates = _rates(
      d_points,
      residuals - (accepted_maps - accepted_points),
      smoothing,
      max_rate,
    )
    fresh = keep & has_accepted
    agree = np.mean(np.abs(rates - last_rates), axis=(1, 2)) < agreement
    # Engaged once two estimates agree, until a step is rejected.
    engaged = np.where(keep, engaged | (fresh & has_rates & agree), False)
    linear = fresh & engaged
    last_rates = np.where(fresh[:, None, None], rates, last_rates)
    has_rates = np.where(keep, has_accepted, False)
    k = keep[:, None, None]
    accepted_points = np.where(k, current, accepted_points)
    accepted_maps = np.where(k, mapped, accepted_maps)
    accepted_loglik = np.where(keep, loglik, accepted_loglik)
    has_accepted |= keep
    if evaluations > 1:
      active &= ~(keep & (step < tolerance))
    proposal = current + residuals / (1.0 - rates)
    newton = linear & np.all(np.isfinite(proposal), axis=(1, 2))
    plain = ~newton
    following = np.where(newton[:, None, None], proposal, accepted_maps)
    current = np.where(active[:, None, None], following, accepted_points)
  return targets.result(em_map, accepted_points, rows, accepted, evaluations)


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
    `AccelerationResult` (one log_likelihood row per cycle).

  Raises:
    ValueError: on a non-finite init or a bad max_evaluations.
  """
  current, target = _start(init, max_evaluations, target_log_likelihood)
  batch = current.shape[0]
  targets = _Targets(target, batch)
  active = targets.active  # updated in place
  history, accepted = [], []
  evaluations = 0

  def evaluate(points):
    """One EM map call; records and freezes problems that reach the target."""
    nonlocal evaluations
    evaluations += 1
    mapped, loglik, hit = targets.evaluate(em_map, points, evaluations)
    current[hit] = points[hit]
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
    keep = _kept(False, stabilised, loglik_proposal, loglik1)
    new = np.where(keep[:, None, None], stabilised, second)
    step = _norm(new - current)
    current = np.where(active[:, None, None], new, current)
    accepted.append(keep & active)
    active &= ~(step < tolerance)
  return targets.result(em_map, current, history, accepted, evaluations)
