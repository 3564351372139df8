"""The gain between a measurement's units and a prior's: data = s * F.

A score prior knows images in its own units (MNIST digits in [0, 1]); a
micrograph comes in detector counts. Eq. (1) is linear in F: with the
background removed (`noise.estimate_noise`) a measurement in other units
is M = s M', sigma = s sigma', and EM without a prior is equivariant (its
posterior weights, eq. 14-15, depend on M / sigma only), so its estimate
on M is s times the one on M'. Nothing but the prior fixes s: without a
prior an estimate is in the data's units.

The estimate of s (`estimate_gain`): z, a short EM without a prior
(closed-form M-step, eq. 16, from the measurement's highest-energy windows,
`starts.window_starts`; the start of highest log-likelihood), in each of
the K orientations EM cannot tell apart (eq. 11), centred where the prior's
data set puts its images (`gauge.centre`, which a scale does not move).
EM leaves white noise in z, which the VP-SDE (eq. 6, kernel eq. 8) models:
z = c u with u ~ p_t, the prior diffused to time t, is s F plus noise of
sd s sigma_t / alpha(t), with s = alpha(t) c (`scale_of_image`). (c, t)
and the orientation maximise the likelihood of z,

    l(c, t) = log p_t(z / c) - d log c,      d = L^2.

In log c its derivative is -(u . s_t(u) + d), u = z / c, s_t the prior's
score (eq. 6-8): c*(t) is the root of u . s_t(u) = -d (for any density
E[u . grad log p(u)] = -d), found by a bracketing grid and bisection on
log c. In t, by the Fokker-Planck equation of eq. (6),
d/dt log p_t(u) = beta(t) / 2 (d + u . s_t + div s_t + ||s_t||^2), which
at c*(t) is beta(t) / 2 (div s_t + ||s_t||^2), Stein's identity (div s_t
by Hutchinson's estimator): > 0 where z is noisier than p_t. The profile
l(c*(t), t) is integrated over a grid of t, and its maximum, interpolated
where the Stein residual changes sign, gives t and s. The orientations
are compared by l at their maxima, anchored at the largest t by the line
integral of the score between them (log p_t(b) - log p_t(a)).

When s is not to be used (`GainEstimate.reliable`): where z is mostly
EM's noise (the likelihood peaks at the largest time tried, or less than
`MIN_SIGNAL` of z's energy is image: the scale found is then the noise's),
and for a prior whose score does not reach the standard normal's, -u, at
t = 1 (the VP-SDE's end, alpha(1) = 0.0066): its time dependence is not a
diffusion's (the shipped gaussian_fc is off by 2.3 ||u|| there, trained on
N(mu, I) alone), so z's noise cannot be told from the image; s is then read
at t_prior and returned for information. A prior with an exact Gaussian
score -(F - mu) (`gaussian_mean`) is diffused exactly, p_t =
N(alpha(t) mu, I): s is then the least-squares coefficient
(z . mu) / ||mu||^2 wherever z is noisier than p_{t_prior}, and the root
of d s^2 + alpha^2 (z . mu) s - alpha^2 ||z||^2 = 0 at t_prior where not.

Measured (simulated measurements plus a level of 7, background removed,
sigma estimated, K = 4, seeds 1-9; s / g, the gain found over the true
one; the data times 1e-2, 40 and 1e3 give the same s / g as gain 1 to
5e-5, EM being equivariant):
- MNIST (mnist_unet, the shipped test digits): SNR 0.5, 1, 2, 5: 0.90-1.08,
  0.95-1.01, 0.96-1.01, 0.95-1.01 (medians 0.98-1.00), all reliable;
  SNR 0.25: 1 of 9 reliable (1.43; the others 0.90-6.2, not used); SNR
  0.1: none reliable (0.18-1.84). The simpler estimator, ||z|| matched to
  the typical norm of MNIST digits (9.3), was off by 0.60-1.54 at SNR
  0.5-5 and 1.04-3.70 below: digits differ in mass by a factor 2, and EM's
  noise adds to the norm. 3.4-4.7 s an estimate at L = 28 on 2 CPU cores
  shared with another job (10 s the first, tracing the score).
- Gaussian (L = 5, draws of N(mu, I), the shipped mu, the exact prior):
  SNR 10, 5: 0.92-1.07, 0.89-1.04, all reliable; SNR 2: 0.76-0.91 (7 of 9
  reliable); SNR 1: 1 of 9 (0.63), SNR 0.5: none. Here EM's estimate is
  distorted, not merely noisy, below SNR 5, and one draw of 25 pixels fixes
  its scale to about 5 %. The norm matched to E||F||^2 = ||mu||^2 + d did
  better at low SNR (0.78-1.17 throughout), but needs a moment of the
  prior that no score gives. gaussian_fc (not a diffusion's score: never
  reliable): 0.90-1.15 at SNR 5-10, 0.98-1.99 at SNR 0.5-1.
In all 144 measurements at gain 1 the gain found was either within a
factor 2 of 1 or not reliable: `reconstruction` leaves such data as they
are.

Not detected: a negative gain (inverted contrast, as in cryo-EM).
"""

import typing

import numpy as np
import tensorflow as tf

from mtd_tf import em
from mtd_tf.model import rotations as rotations_lib
from mtd_tf.recovery import gauge as gauge_lib
from mtd_tf.recovery import starts as starts_lib

__all__ = [
  "GainError",
  "GainEstimate",
  "UNIT_FACTOR",
  "T_MAX",
  "NUM_TIMES",
  "MIN_SIGNAL",
  "ITERATIONS",
  "NUM_WINDOWS",
  "scale_of_image",
  "estimate_gain",
]

# A gain within this factor of 1 is taken for 1 by a reconstruction: data
# already in the prior's units (the simulator's) are left as they are.
UNIT_FACTOR = 2.0
# The diffusion times tried, geometric from the prior's t_prior to T_MAX:
# at t = 0.5 z's noise sigma_t / alpha(t) is 3.4 prior units, beyond what
# a no-prior EM leaves at SNR 0.5 (0.2-0.4 on MNIST).
T_MAX = 0.5
NUM_TIMES = 12
# The least fraction of image in z for its scale to be used.
MIN_SIGNAL = 0.25
# The no-prior EM: iterations and window starts. Its norm moves by < 1 %
# from 10 to 20 iterations (MNIST, SNR 0.5-5).
ITERATIONS = 10
NUM_WINDOWS = 3
# log c is bracketed on base +- _SPAN (base: the rms of z) in _GRID
# points, then bisected _BISECTIONS times (to 2e-4 in log c).
_SPAN = 6.0
_GRID = 17
_BISECTIONS = 12
# Hutchinson probes of div s_t per image, and images per score call.
_PROBES = 2
_BATCH = 256
# A score whose mean ||s_1(u) + u|| / ||u|| on N(0, I) draws is above this
# was not trained across diffusion times (mnist_unet: 0.01).
_END_TOLERANCE = 0.1
# Gauss-Legendre nodes of the line integrals between orientations.
_NODES = 8


class GainError(ValueError):
  """No gain can be estimated (an estimate of zero, or no root)."""


class GainEstimate(typing.NamedTuple):
  """The scale s of data = s * (prior units), and what it was found from.

  Attributes:
    gain: float s > 0.
    time: float t, the diffusion time at which z is typical under the
      prior (its t_prior where the time dependence is not used).
    noise: float sigma_t / alpha(t) at that time: z's noise in the
      prior's units, as the prior sees it.
    signal: float, the fraction of z's energy that is image, 1 - d
      noise^2 / ||z / s||^2 (<= 0: z is all noise; 1 where the prior's
      time dependence is not used).
    reliable: whether s is to be used (module docstring); why not, in
      `note`.
    note: str, why s is not reliable ("" where it is).
    estimate: float64 [L, L], z in the data's units, in the orientation
      chosen (and centred where the prior's convention says).
  """

  gain: float
  time: float
  noise: float
  signal: float
  reliable: bool
  note: str
  estimate: np.ndarray


def _alpha(prior, t):
  """alpha(t) float64 of the prior's VP-SDE (eq. 8), t float [N]."""
  t = np.atleast_1d(np.asarray(t, np.float32))
  return np.asarray(prior.sde.alpha(tf.constant(t)), np.float64).reshape(-1)


class _Score:
  """The prior's score for the estimate, float64 numpy in and out.

  Attributes:
    timed: whether the time dependence is used (module docstring).
  """

  def __init__(self, prior):
    self.prior = prior
    mean = prior.gaussian_mean
    self.mu = None if mean is None else np.asarray(mean, np.float64)
    self.timed = self.mu is not None or self._reaches_normal()

  def __call__(self, u, t):
    """s_t(u) float64 [N, L, L] at u [N, L, L], t [N]."""
    if self.mu is not None:  # N(alpha(t) mu, I), eq. 8
      return -(u - _alpha(self.prior, t)[:, None, None] * self.mu)
    out = []
    for begin in range(0, len(u), _BATCH):
      x = tf.constant(u[begin : begin + _BATCH], tf.float32)
      times = tf.constant(t[begin : begin + _BATCH], tf.float32)
      out.append(np.asarray(self.prior(x, times), np.float64))
    return np.concatenate(out)

  def _reaches_normal(self):
    size = int(self.prior.image_size)
    u = np.random.default_rng(0).standard_normal((4, size, size))
    gap = self(u, np.ones(4)) + u  # [4, L, L]
    ratio = np.linalg.norm(gap.reshape(4, -1), axis=1) / np.linalg.norm(
      u.reshape(4, -1), axis=1
    )
    return bool(np.mean(ratio) < _END_TOLERANCE)

  def divergence(self, u, t, sigma_t, seed):
    """div s_t(u) float64 [N] by Hutchinson's estimator.

    Rademacher probes through automatic differentiation of the prior; a
    prior TensorFlow cannot differentiate gets central differences of
    step 1e-2 sigma_t.
    """
    if self.mu is not None:
      return np.full(len(u), -float(u[0].size))
    rng = np.random.default_rng(seed)
    probes = rng.choice([-1.0, 1.0], size=(_PROBES,) + u.shape[1:])
    many = np.repeat(u, _PROBES, 0)  # [N P, L, L]
    vs = np.tile(probes, (len(u), 1, 1))  # [N P, L, L]
    times = np.repeat(t, _PROBES)  # [N P]
    quad = []
    for begin in range(0, len(many), _BATCH):
      part = slice(begin, begin + _BATCH)
      quad.append(self._quadratic(many[part], vs[part], times[part]))
    quad = np.concatenate(quad)
    if not np.all(np.isfinite(quad)):
      step = 1e-2 * np.repeat(sigma_t, _PROBES)[:, None, None]
      ahead = self(many + step * vs, times)
      behind = self(many - step * vs, times)
      quad = np.sum(vs * (ahead - behind) / (2 * step), axis=(1, 2))
    return quad.reshape(len(u), _PROBES).mean(1)

  def _quadratic(self, u, v, t):
    """v . (ds/du) v per image [n], NaN where TensorFlow has no gradient."""
    x = tf.constant(u, tf.float32)
    probe = tf.constant(v, tf.float32)
    try:
      with tf.GradientTape() as tape:
        tape.watch(x)
        projected = tf.reduce_sum(
          probe * self.prior(x, tf.constant(t, tf.float32))
        )
      jvp = tape.gradient(projected, x)
    except (TypeError, ValueError, LookupError, tf.errors.OpError):
      jvp = None
    if jvp is None:
      return np.full(len(u), np.nan)
    return np.sum(np.asarray(jvp, np.float64) * v, axis=(1, 2))


def _radial(score, u, t):
  """u . s_t(u) + d per image: float64 [N] (> 0 where u is too small)."""
  return np.sum(u * score(u, t), axis=(1, 2)) + u[0].size


def _roots(score, z, t):
  """c* float64 [N]: the root of u . s_t(u) = -d, u = z / c, per pair.

  Args:
    score: a `_Score`.
    z: float64 [N, L, L], t: float64 [N]: N (image, time) pairs.

  Where several roots lie on the grid the one of highest likelihood (the
  integral of -(u . s + d) over log c) is taken; NaN where there is none.
  """
  num = len(z)
  base = 0.5 * np.log(np.mean(z**2, axis=(1, 2)))  # [N]
  grid = base[:, None] + np.linspace(-_SPAN, _SPAN, _GRID)  # [N, P] log c
  u = z[:, None] / np.exp(grid)[:, :, None, None]  # [N, P, L, L]
  g = _radial(score, u.reshape((-1,) + z.shape[1:]), np.repeat(t, _GRID))
  g = g.reshape(num, _GRID)
  # The log-likelihood along log c, up to a constant per pair.
  steps = (g[:, 1:] + g[:, :-1]) / 2 * np.diff(grid, axis=1)  # [N, P-1]
  profile = -np.concatenate([np.zeros((num, 1)), np.cumsum(steps, 1)], 1)
  low, high = np.zeros(num), np.zeros(num)
  found = np.zeros(num, bool)
  for i in range(num):
    # A maximum: g changes from < 0 (u too large) to >= 0.
    ups = np.flatnonzero((g[i, :-1] < 0) & (g[i, 1:] >= 0))
    if ups.size:
      j = ups[np.argmax(profile[i, ups])]
      low[i], high[i], found[i] = grid[i, j], grid[i, j + 1], True
  for _ in range(_BISECTIONS):
    middle = (low + high) / 2
    g = _radial(score, z / np.exp(middle)[:, None, None], t)
    low, high = np.where(g < 0, middle, low), np.where(g < 0, high, middle)
  return np.where(found, np.exp((low + high) / 2), np.nan)


def _log_ratio(score, a, b, t):
  """log p_t(b) - log p_t(a) [N]: the line integral of the score."""
  nodes, weights = np.polynomial.legendre.leggauss(_NODES)
  lam = (nodes + 1) / 2  # [Q] on [0, 1]
  path = a[:, None] + lam[None, :, None, None] * (b - a)[:, None]  # [N, Q]
  flat = path.reshape((-1,) + a.shape[1:])
  s = score(flat, np.repeat(t, _NODES)).reshape(path.shape)
  along = np.sum(s * (b - a)[:, None], axis=(2, 3))  # [N, Q]
  return along @ (weights / 2)


def _best_time(times, scales, residual, profile):
  """(t, s, grid index) at the profile's maximum, interpolated in t.

  Between the grid points where the Stein residual changes from > 0 to
  <= 0 beside the maximum, t and log s are linear in the residual.
  """
  best = int(np.argmax(profile))
  for i in (best, best - 1):
    if 0 <= i < len(times) - 1 and residual[i] > 0 >= residual[i + 1]:
      w = residual[i] / (residual[i] - residual[i + 1])
      log_s = (1 - w) * np.log(scales[i]) + w * np.log(scales[i + 1])
      return (1 - w) * times[i] + w * times[i + 1], float(np.exp(log_s)), best
  return times[best], float(scales[best]), best


def _scale_of_candidates(candidates, prior, t_max, num_times, seed):
  """`GainEstimate` of the most likely of candidates [R, L, L]."""
  z = np.asarray(candidates, np.float64)
  if not np.all(np.isfinite(z)) or not np.any(z):
    raise GainError(
      "The estimate without a prior is zero or not finite: no scale can be "
      "read from it."
    )
  score = _Score(prior)
  num, d = len(z), z[0].size
  t_min = float(prior.t_prior)
  if score.timed and t_min < t_max:
    times = np.geomspace(t_min, t_max, int(num_times))
  else:
    times = np.array([t_min])
  steps = len(times)
  pairs_t = np.tile(times, num)  # [R T]
  pairs_z = np.repeat(z, steps, 0)  # [R T, L, L]
  c = _roots(score, pairs_z, pairs_t)  # [R T]
  # A candidate without a root at some time is left out.
  kept = np.all(np.isfinite(c.reshape(num, steps)), axis=1)  # [R]
  if not kept.any():
    raise GainError(
      "The prior's score finds no scale at which the estimate without a "
      "prior is typical (u . s_t(u) never reaches -L^2)."
    )
  c = np.where(np.isfinite(c), c, 1.0)
  alpha = _alpha(prior, times)  # [T]
  sigma_t = np.sqrt(np.maximum(1.0 - alpha**2, 0.0))
  u = pairs_z / c[:, None, None]  # [R T, L, L]
  if steps > 1:
    stein = score.divergence(u, pairs_t, np.tile(sigma_t, num), seed)
    stein = stein + np.sum(score(u, pairs_t) ** 2, axis=(1, 2))
    stein = stein.reshape(num, steps)  # div s + ||s||^2
  else:
    stein = np.zeros((num, 1))
  sde = prior.sde
  beta = sde.beta_min + (sde.beta_max - sde.beta_min) * times  # [T]
  slope = beta / 2 * stein  # [R, T] d l(c*(t), t) / dt
  profile = np.concatenate(
    [
      np.zeros((num, 1)),
      np.cumsum((slope[:, 1:] + slope[:, :-1]) / 2 * np.diff(times), 1),
    ],
    1,
  )  # [R, T], l(c*(t), t) - l(c*(t_min), t_min)
  c = c.reshape(num, steps)
  # Each candidate's likelihood at its best grid time, anchored at the
  # largest time T (against the first candidate kept, by the line
  # integral): l_r(t) = l_r(T) + profile_r(t) - profile_r(T).
  anchor_u = u.reshape((num, steps) + z.shape[1:])[:, -1]  # [R, L, L]
  first = int(np.flatnonzero(kept)[0])
  anchor = -d * np.log(c[:, -1]) + _log_ratio(
    score,
    np.repeat(anchor_u[first : first + 1], num, 0),
    anchor_u,
    np.full(num, times[-1]),
  )  # [R]
  likelihood = anchor + profile.max(axis=1) - profile[:, -1]
  winner = int(np.argmax(np.where(kept, likelihood, -np.inf)))
  # The residual in units of d / sigma_t^2, where it is of order 1.
  residual = stein[winner] * sigma_t**2 / d
  t, s, best = _best_time(times, alpha * c[winner], residual, profile[winner])
  alpha_t = float(np.interp(t, times, alpha))
  noise = float(np.sqrt(max(1.0 - alpha_t**2, 0.0)) / alpha_t)
  signal = float(1.0 - d * noise**2 / np.sum((z[winner] / s) ** 2))
  if not score.timed:
    note = (
      "the prior's score is not a diffusion's across t (it does not reach "
      "N(0, I)'s at t = 1), so EM's noise cannot be told from the image"
    )
  elif best == steps - 1 or signal < MIN_SIGNAL:
    note = (
      f"EM's estimate without the prior is mostly noise (image "
      f"{max(signal, 0.0):.0%} of its energy): the data's SNR is too low"
    )
  else:
    note = ""
  return GainEstimate(s, float(t), noise, signal, not note, note, z[winner])


def scale_of_image(
  image, prior, *, num_rotations=1, t_max=T_MAX, num_times=NUM_TIMES, seed=0
):
  """The scale s with image = s * (an image of the prior, plus noise).

  The maximum-likelihood (c, t) of image = c u, u ~ p_t, s = alpha(t) c,
  over the image's rotations of Phi (module docstring).

  Args:
    image: float [L, L] in the data's units (e.g. EM's estimate without a
      prior), in the prior's position where the prior fixes one.
    prior: a `priors.Prior` for L x L images.
    num_rotations: K: the rotations of Phi (eq. 11) tried (1: the image
      as it is); each is centred where the prior's convention says.
    t_max: the largest diffusion time tried.
    num_times: how many times are tried, geometric from prior.t_prior.
    seed: seed of the Hutchinson probes.

  Returns:
    `GainEstimate` (its estimate: the rotation of the image chosen).

  Raises:
    GainError: an image of zeros or not finite, or one for which the
      likelihood has no maximum in c.
  """
  z = np.asarray(image, np.float64)  # [L, L]
  turned = rotations_lib.rotate_all(z, int(num_rotations))  # [K, L, L]
  target = gauge_lib.convention_centre(prior)
  if target is not None:
    turned = gauge_lib.centre(turned, target)
  return _scale_of_candidates(turned, prior, t_max, num_times, seed)


def _windows(measurements, size, count):
  """Up to `count` window starts float64 [W, L, L] over the micrographs."""
  found = []
  for array in measurements:
    if len(found) >= count:
      break
    found.extend(starts_lib.window_starts(array, size, count - len(found)))
  return np.stack(found)


def estimate_gain(
  measurements,
  image_size,
  sigma,
  prior,
  *,
  num_rotations=4,
  iterations=ITERATIONS,
  num_windows=NUM_WINDOWS,
  chunk_size=64,
  dtype="float32",
  seed=0,
):
  """The gain s of measurements in other units than the prior's: M = s M'.

  Args:
    measurements: float array [H, W] or a list of them (micrographs that
      share one image), background removed (zero-mean noise around the
      copies), in the data's units.
    image_size: L.
    sigma: the noise sd in the same units.
    prior: a `priors.Prior` for L x L images.
    num_rotations: K, of the no-prior EM and of the orientations tried.
    iterations: the no-prior EM's iterations.
    num_windows: its starts (`starts.window_starts`).
    chunk_size, dtype: as `em.EMOptions`.
    seed: seed of the Hutchinson probes.

  Returns:
    `GainEstimate`: divide the measurements and sigma by its gain to have
    them in the prior's units.

  Raises:
    GainError: no gain can be read (`scale_of_image`).
    ValueError: bad measurements (as `em.batched_em`).
  """
  size = int(image_size)
  arrays = measurements if isinstance(measurements, list) else [measurements]
  inits = _windows(arrays, size, int(num_windows))  # [W, L, L]
  options = em.EMOptions(
    m_step="closed_form",
    max_iterations=int(iterations),
    num_rotations=int(num_rotations),
    chunk_size=chunk_size,
    dtype=dtype,
    progress_every=0,
  )
  found = em.batched_em(
    [arrays],
    size,
    [float(sigma)] * len(inits),
    inits=inits,
    m_steps=[options.m_step] * len(inits),
    options=options,
    groups=[0] * len(inits),
  )
  history = np.asarray(found.log_likelihood).reshape(-1, len(inits))
  last = np.full(len(inits), -np.inf)
  for w in range(len(inits)):
    finite = history[np.isfinite(history[:, w]), w]
    if finite.size:
      last[w] = finite[-1]
  z = np.asarray(found.estimate, np.float64)[int(np.argmax(last))]
  return scale_of_image(z, prior, num_rotations=num_rotations, seed=seed)
