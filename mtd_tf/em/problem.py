"""A batch of EM problems, its checks, and what EM returns.

B independent problems share the image size L and run in one compiled loop
(`loop.py`); each has its own sigma, F(0), M-step and prior weight. The
checks here run before any data are touched, for every front end (local,
streamed, distributed).
"""

import dataclasses
import os
import typing

import numpy as np

from mtd_tf.base import validation
from mtd_tf.em import registry

__all__ = [
  "EMDivergedError",
  "EMResult",
  "ProblemBatch",
  "check_local_estimates",
  "check_resolution",
  "largest_square",
  "resolved_streams",
  "single",
  "too_large",
]


class EMDivergedError(ValueError):
  """A run whose log-likelihood or estimate became NaN or Inf."""


class EMResult(typing.NamedTuple):
  """What EM returns.

  Attributes:
    estimate: float numpy [L, L] (or [B, L, L] from `batched_em`).
    iterations: EM iterations run (int, or int [B]).
    log_likelihood: float64 numpy [iterations] (or [T, B], NaN after a
      problem stopped): the data log-likelihood of F(tau), tau = 0, 1, ...
    seconds: wall time of the compiled loop (tracing included on first use).
    sigma: float64 numpy [] (or [B]), the noise level of the last iteration:
      the given one, or with `EMOptions.estimate_sigma` EM's estimate
      (`mstep.noise_mstep`); None where the runner does not track it.
  """

  estimate: np.ndarray
  iterations: typing.Any
  log_likelihood: np.ndarray
  seconds: float
  sigma: typing.Any = None


@dataclasses.dataclass(frozen=True)
class ProblemBatch:
  """B independent EM problems that share the image size L (validated).

  Attributes:
    sigmas: float64 [B], noise standard deviations.
    inits: float64 [B, L, L], the initial estimates F(0).
    m_steps: B names from `mstep.M_STEPS`.
    prior_weights: float64 [B], factors on gamma(tau) (0: no prior).
  """

  sigmas: typing.Any
  inits: typing.Any
  m_steps: typing.Any
  prior_weights: typing.Any

  def __post_init__(self):
    sigmas = np.array(
      [validation.positive_finite(s, "sigma") for s in np.ravel(self.sigmas)],
      np.float64,
    )
    batch = len(sigmas)
    inits = np.asarray(self.inits, np.float64)
    if (
      inits.ndim != 3
      or inits.shape[0] != batch
      or (inits.shape[1] != inits.shape[2])
    ):
      raise ValueError(
        f"inits must have shape [B, L, L] with B = {batch}, got {inits.shape}."
      )
    if not np.all(np.isfinite(inits)):
      raise ValueError("inits contain NaN or Inf values.")
    m_steps = tuple(self.m_steps)
    names = tuple(registry.M_STEPS)
    if len(m_steps) != batch or any(m not in names for m in m_steps):
      raise ValueError(
        f"m_steps must be {batch} values from {names}, got {list(m_steps)}."
      )
    weights = np.asarray(self.prior_weights, np.float64)
    if (
      weights.shape != (batch,)
      or not np.all(np.isfinite(weights))
      or (not np.all(weights >= 0))
    ):
      raise ValueError("prior_weights must be B finite non-negative numbers.")
    object.__setattr__(self, "sigmas", sigmas)
    object.__setattr__(self, "inits", inits)
    object.__setattr__(self, "m_steps", m_steps)
    object.__setattr__(self, "prior_weights", weights)

  @property
  def size(self):
    """B."""
    return len(self.sigmas)

  @property
  def image_size(self):
    """L."""
    return self.inits.shape[1]

  def check_prior(self, prior):
    """Refuses M-steps the prior cannot serve (`mstep.needs_gaussian_prior`)."""
    registry.needs_gaussian_prior(self.m_steps, prior, self.prior_weights)
    return self


def check_local_estimates(options, where):
  """Refuses options estimated inside the local loop's state elsewhere.

  rho(l) and sigma live in the compiled loop's state, which a streamed or
  distributed E-step bypasses: refuse rather than silently keep them fixed.

  Args:
    options: `EMOptions`.
    where: what runs the E-step, for the message ("streamed micrographs").

  Raises:
    ValueError: estimate_shift_prior or estimate_sigma is on.
  """
  for name in ("estimate_shift_prior", "estimate_sigma"):
    if getattr(options, name):
      raise ValueError(
        f"{name} is not supported on {where}: hold the data in memory in "
        "one process (a larger memory budget) or leave it off."
      )


def resolved_streams(options):
  """The number of E-step streams: options.num_streams, or one per core."""
  if options.num_streams is not None:
    return int(options.num_streams)
  return max(1, min(os.cpu_count() or 1, 8))


# Rounding error of a float32 logit, in nats, above which the posterior
# weights (eq. 15) are noise: logits of size ||M_m||^2 / (2 sigma^2) carry
# errors of that size times 2^-24, and XLA may recompute them in a fused
# exp (overflowing to Inf).
_MAX_LOGIT_ROUNDING = 1.0
# Headroom below the dtype's largest number for the squares EM forms
# (||M_m||^2, ||R_k F||^2, sigma^2 and their sums and products with small
# factors such as 2 pi): a square above largest / _HEADROOM is refused.
_HEADROOM = 2.0**10


def largest_square(dtype):
  """The largest square (sigma^2, ||M_m||^2, ||F||^2) EM takes in dtype."""
  return float(np.finfo(dtype).max) / _HEADROOM


def too_large(
  dtype, sigma=None, squared_norm=None, image=None, image_name="the estimate"
):
  """Names what is too large for dtype's range, or returns None.

  Args:
    dtype: "float32" or "float64".
    sigma: a noise level.
    squared_norm: the largest ||M_m||^2 of the data.
    image: an estimate or F(0) [L, L] (non-finite ones are not judged).
    image_name: what image is, for the message ("init").

  Returns:
    A phrase ("sigma=1e+30 is too large for float32 (sigma^2 = 1e+60 ...)")
    with what to do, or None when everything fits.
  """
  limit = largest_square(dtype)
  fix = (
    "rescale the data (divide the measurement, sigma and any init by one "
    "factor)" + (" or use dtype='float64'" if dtype == "float32" else "")
  )
  if sigma is not None and not float(sigma) ** 2 <= limit:
    return (
      f"sigma={float(sigma):.3g} is too large for {dtype} (sigma^2 = "
      f"{float(sigma) ** 2:.3g} overflows past {limit:.3g}): {fix}."
    )
  if squared_norm is not None and not float(squared_norm) <= limit:
    reached = (
      f"reaches {float(squared_norm):.3g}, past {limit:.3g}"
      if np.isfinite(squared_norm)
      else f"overflows {dtype} (past {float(np.finfo(dtype).max):.3g})"
    )
    return (
      f"the data are too large for {dtype}: a patch's squared norm "
      f"||M_m||^2 {reached}: {fix}."
    )
  image = None if image is None else np.asarray(image, np.float64)
  if image is not None and np.all(np.isfinite(image)):
    square = float(np.sum(image**2))
    if not square <= limit:
      return (
        f"{image_name} is too large for {dtype}: its largest |value| is "
        f"{float(np.max(np.abs(image))):.3g} and ||F||^2 = {square:.3g}, "
        f"past {limit:.3g}: {fix}."
      )
  return None


def check_resolution(data, batch, options, groups=None):
  """Refuses, before EM, numbers the dtype cannot hold or resolve.

  Refuses, in this order: data, a sigma or an F(0) so large that their
  squares overflow options.dtype (`too_large`); a float32 sigma so small
  against the data that the E-step's logits are rounding noise. (EM's size
  is checked once by the front ends, `EMOptions.check_size`, before the
  spectra exist: not here, on every run of prepared spectra.)

  Args:
    data: `patches.PatchSpectra` of G problems.
    batch: the `ProblemBatch`.
    options: `EMOptions`.
    groups: None, or int [B] indices into the G problems of data.

  Raises:
    EMDivergedError: numbers too large for the dtype, or float32 logits
      whose rounding exceeds `_MAX_LOGIT_ROUNDING` nats for some problem.
  """
  largest = np.max(
    np.asarray(data.squared_norms, np.float64).reshape(
      len(data.squared_norms), -1
    ),
    axis=1,
  )  # [G]
  if groups is not None:
    largest = largest[np.asarray(groups)]
  sigmas = np.asarray(batch.sigmas, np.float64).reshape(-1)
  causes = [
    too_large(
      options.dtype,
      sigma=sigma,
      squared_norm=largest[b],
      image=batch.inits[b],
      image_name="init (F(0))",
    )
    for b, sigma in enumerate(sigmas)
  ]
  bad = [b for b, cause in enumerate(causes) if cause]
  if bad:
    # Name the problem only where the others do not share its cause.
    alike = len(set(causes)) == 1
    where = "" if alike else f"problem {bad[0]}: "
    raise EMDivergedError(where + causes[bad[0]])
  if options.dtype != "float32":
    return
  rounding = largest / (2 * sigmas**2) * 2.0**-24  # [B]
  bad = np.flatnonzero(rounding > _MAX_LOGIT_ROUNDING)
  if len(bad):
    sigma = sigmas[bad[0]]
    raise EMDivergedError(
      f"sigma={sigma:.3g} is too small for float32 against data whose "
      f"squared patch norms reach {largest[bad[0]]:.3g} (the E-step's "
      f"logits would carry rounding errors of {rounding[bad[0]]:.3g} "
      "nats): use dtype='float64' or a larger sigma."
    )


def single(result):
  """The single-problem form of a batch-of-one `EMResult`."""
  return EMResult(
    result.estimate[0],
    int(result.iterations[0]),
    result.log_likelihood[:, 0],
    result.seconds,
    None if result.sigma is None else float(result.sigma[0]),
  )
