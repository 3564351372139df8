"""Options of Algorithm 1 and the prior weight schedule gamma(tau) of eq. (18).

`EMOptions` is checked when it is made, so a bad option fails with one line
before any data is read; `EMOptions.check_size` then compares what EM would
hold for L x L images (the rotation operators, the E-step's chunk buffers)
with what TensorFlow and the machine can hold. Defaults come from Table I
(`table1.py`). Each field declares its help (`base.fields.option`), which
the tools' flags read; the module loads no TensorFlow.
"""

import dataclasses
import math
import numbers
import typing

import numpy as np

from mtd_tf.base import memory
from mtd_tf.base import table1
from mtd_tf.base import validation
from mtd_tf.base.fields import option
from mtd_tf.em import registry

__all__ = [
  "EMOptions",
  "gamma_schedule",
  "t_values",
  "ACCELERATIONS",
  "constant_gamma",
  "resolve_t_prior",
  "parse_gamma",
  "CHUNK_PAIRS",
  "chunk_size_for",
]


# EM acceleration: none (Algorithm 1 as published), anderson, secant and
# squarem (with the ascent safeguard, `acceleration.py`), auto
# (closed-form or preconditioned M-steps with a constant prior weight:
# secant from 4 patches per image pixel, squarem below; `em.auto_accelerator`).
ACCELERATIONS = ("none", "anderson", "secant", "squarem", "auto")
SHIFT_PRIORS = (False, True, "free", "occupancy")
# (patch, rotation) pairs per E-step chunk by default: 64 patches at
# Table I's K = 4. The chunk's tensors are [S, K, 2L, 2L], so a finer grid
# of angles takes fewer patches per chunk: with 64 at K = 16 each tensor
# outgrows the caches and the E-step ran 20 % slower on 2 cores.
CHUNK_PAIRS = 256
# The VP-SDE's diffusion time runs over (0, 1] (eq. 6): the score of the
# prior exists there only.
T_MAX = 1.0
# `model.rotations.TENSOR_LIMIT_BYTES`, written out because importing that
# module loads TensorFlow; tests/test_limits.py checks they agree.
TENSOR_LIMIT_BYTES = 2**31 - 1
# `model.rotations.TAPS`, likewise: input pixels per output pixel of a turn.
TAPS = 16
# Tensors of a chunk's size [chunk, K, 2L, 2L] the E-step holds at once
# (`estep`: the complex cross-spectra, the correlation, the logits, their
# exponentials, the weights and their complex spectra; XLA fuses some).
ESTEP_BUFFERS = 6


@dataclasses.dataclass(frozen=True)
class EMOptions:
  """Options of Algorithm 1 (defaults: Table I where it applies).

  Attributes:
    num_rotations: K, rotations in Phi (eq. 11).
    max_iterations: T, EM iterations at most.
    tolerance: stop when ||F(tau+1) - F(tau)||_F falls below it.
    learning_rate: mu of eq. (18), gradient M-step only.
    gradient_steps: N inner steps per gradient or preconditioned M-step.
    m_step: the M-step of `approximate_em` and `distributed_em`, a name
      from the registry `registry.M_STEPS` (built in: "closed_form",
      "gradient", "preconditioned").
    t_prior: diffusion time at which the prior's score is evaluated, in
      (0, 1] (the VP-SDE's time); None: the prior's own t_prior.
    gamma: prior weight schedule: "linear" (tau / T), "constant:V", or a
      callable (tau, T) -> scalar tensor, both float tensors.
    chunk_size: patches per E-step chunk (bounds memory; the tools take
      `chunk_size_for(K)`).
    dtype: "float32" or "float64".
    progress_every: log a progress line (log-likelihood, change, seconds
      per iteration, ETA) every this many iterations; 0 logs nothing.
    prior_curvature: c, the curvature of -log p used by the preconditioned
      M-step; None: the prior's `curvature(t_prior)`.
    num_streams: concurrent E-step chunk streams (None: one per core, at
      most 8).
    t_schedule: None (the score at t_prior every iteration) or
      "geometric:T0" (0 < T0 <= 1): the prior annealed, its diffusion time
      going geometrically from T0 at the first iteration down to t_prior
      at the last, the curvature c(t) of the preconditioned M-step
      following it (`t_values`).
    acceleration: "none" (Algorithm 1 as published: one iteration is one
      E-step and one M-step), "anderson" (Anderson acceleration),
      "secant" (per-pixel secant steps) or "squarem" (SQUAREM), all with
      the ascent safeguard and needing a constant gamma
      (`acceleration.py`), or "auto" (where it helps: closed-form or
      preconditioned M-steps and no prior or a constant gamma; secant
      from 4 patches per image pixel, squarem below,
      `em.auto_accelerator`; otherwise none). Accelerated, max_iterations counts
      EM-map evaluations and tolerance applies to the step between
      accepted points (a whole SQUAREM cycle).
    estimate_shift_prior: estimate the shift prior rho(l) by EM instead of
      the paper's uniform 1 / (2L)^2 (eq. 14): False (uniform), True or
      "free" (rho updated after each E-step to the mean posterior shift
      mass, (2L)^2 numbers) or "occupancy" (one number, the probability of
      an empty patch, the other shifts equally likely:
      `em.occupancy_shift_prior`); local, non-streamed E-steps only, and no
      acceleration.
    estimate_sigma: estimate the noise level by EM too: the given sigma is
      the start, and after each M-step sigma^2 becomes the expected
      residual per pixel at the new F (`mstep.noise_mstep`; an ECM step);
      local, non-streamed E-steps only, and no acceleration.
  """

  num_rotations: int = option(
    table1.NUM_ROTATIONS, "K, rotations in Phi (eq. 11).", kind="integer"
  )
  max_iterations: int = option(
    table1.MAX_ITERATIONS, "T, EM iterations at most.", kind="integer"
  )
  tolerance: float = option(
    table1.TOLERANCE, "Stop when ||F(t+1) - F(t)||_F < this.", kind="float"
  )
  learning_rate: float = option(
    table1.LEARNING_RATE, "mu of eq. (18) (gradient M-step).", kind="float"
  )
  gradient_steps: int = option(
    table1.GRADIENT_STEPS,
    "Gradient steps per gradient or preconditioned M-step.",
    kind="integer",
  )
  m_step: str = option(
    "closed_form",
    "The M-step, a name from the registry mtd_tf.em.M_STEPS.",
    kind="enum",
    choices=lambda: tuple(registry.M_STEPS),
  )
  t_prior: typing.Optional[float] = option(
    None,
    "Diffusion time of the prior's score, in (0, 1] (default: the prior's own, "
    f"{table1.T_PRIOR} for the shipped ones).",
    kind="float",
  )
  gamma: typing.Any = option(
    "constant:1",
    "Prior weight schedule gamma(tau): linear | linear:V | constant:V.",
    kind="string",
  )
  chunk_size: int = option(
    CHUNK_PAIRS // 4, "Patches per E-step chunk.", kind="integer"
  )
  dtype: str = option(
    "float32", "Precision.", kind="enum", choices=("float32", "float64")
  )
  progress_every: int = option(
    0,
    "Log progress (rates and ETA) every this many iterations (0: never).",
    kind="integer",
  )
  prior_curvature: typing.Optional[float] = option(
    None,
    "Curvature of -log p in the preconditioned M-step (default: the "
    "prior's at its t).",
    kind="float",
  )
  num_streams: typing.Optional[int] = option(
    None,
    "Concurrent E-step chunk streams (default: one per core).",
    kind="integer",
  )
  t_schedule: typing.Optional[str] = option(
    None,
    "Annealing of the prior's time: geometric:T0 (from T0 in (0, 1] down "
    "to t_prior).",
    kind="string",
  )
  acceleration: str = option(
    "none",
    "EM acceleration: auto (for M-steps that maximise Q without a "
    "time-dependent gamma: secant from 4 patches per image pixel, else "
    "squarem), anderson, secant, squarem, or none (the paper's iterations).",
    kind="enum",
    choices=("auto", "anderson", "secant", "squarem", "none"),
  )
  estimate_shift_prior: typing.Union[bool, str] = False
  estimate_sigma: bool = option(
    False,
    "Estimate the noise level by EM too (an ECM step after each M-step).",
    kind="bool",
  )

  def __post_init__(self):
    self.validate()

  def validate(self):
    """Raises ValueError naming the first bad option; returns self."""
    for name, least in (
      ("num_rotations", 1),
      ("max_iterations", 0),
      ("gradient_steps", 1),
      ("chunk_size", 1),
      ("progress_every", 0),
    ):
      value = getattr(self, name)
      if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < least
      ):
        raise ValueError(
          f"{name} must be an integer >= {least}, got {value!r}."
        )
    if (
      isinstance(self.tolerance, bool)
      or not isinstance(self.tolerance, numbers.Real)
      or not self.tolerance >= 0
    ):
      raise ValueError(f"tolerance must be >= 0, got {self.tolerance!r}.")
    validation.positive_finite(self.learning_rate, "learning_rate")
    if self.m_step not in registry.M_STEPS:
      raise ValueError(
        f"m_step must be one of {tuple(registry.M_STEPS)}, got {self.m_step!r}."
      )
    if self.t_prior is not None:
      validation.positive_finite(self.t_prior, "t_prior")
      if not self.t_prior <= T_MAX:
        raise ValueError(
          f"t_prior must be in (0, {T_MAX:g}], the VP-SDE's diffusion time, "
          f"got {self.t_prior!r}: use a small time such as {table1.T_PRIOR}."
        )
    if self.num_streams is not None and (
      isinstance(self.num_streams, bool)
      or not isinstance(self.num_streams, numbers.Integral)
      or self.num_streams < 1
    ):
      raise ValueError(
        f"num_streams must be an integer >= 1, got {self.num_streams!r}."
      )
    if self.prior_curvature is not None:
      validation.positive_finite(self.prior_curvature, "prior_curvature")
    if self.dtype not in ("float32", "float64"):
      raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}.")
    parse_gamma(self.gamma)
    if self.t_schedule is not None:
      t_values(self.t_schedule, 0.01, 2)
    if self.estimate_shift_prior not in SHIFT_PRIORS:
      raise ValueError(
        "estimate_shift_prior must be False, True, 'free' or 'occupancy', "
        f"got {self.estimate_shift_prior!r}."
      )
    if not isinstance(self.estimate_sigma, bool):
      raise ValueError(
        f"estimate_sigma must be True or False, got {self.estimate_sigma!r}."
      )
    if self.acceleration not in ACCELERATIONS:
      raise ValueError(
        f"acceleration must be one of {ACCELERATIONS}, got "
        f"{self.acceleration!r}."
      )
    return self

  def memory_bytes(self, image_size, num_streams=1):
    """{what: bytes} EM holds at once for L x L images, besides the data.

    Args:
      image_size: L.
      num_streams: concurrent E-step chunk streams (`num_streams`
        resolved).

    Returns:
      {"rotation operators": the taps of the K sparse operators, K L^2
      TAPS (int32 index, float64 weight and its copy in `dtype`) (only for
      a K other than 1, 2 and 4: quarter turns need none), "E-step
      buffers": ESTEP_BUFFERS tensors [chunk_size, K, 2L, 2L] per stream}.
    """
    size, count = int(image_size), int(self.num_rotations)
    itemsize = 4 if self.dtype == "float32" else 8
    parts = {}
    if count not in (1, 2, 4):
      parts["rotation operators"] = count * size**2 * TAPS * (12 + itemsize)
    parts["E-step buffers"] = (
      ESTEP_BUFFERS
      * max(int(num_streams), 1)
      * int(self.chunk_size)
      * count
      * (2 * size) ** 2
      * itemsize
    )
    return parts

  def check_size(self, image_size, num_streams=1, available_bytes=None):
    """Refuses, before any work, an EM too large for TensorFlow or memory.

    Args:
      image_size: L.
      num_streams: concurrent E-step chunk streams.
      available_bytes: the memory to fit in (default:
        `memory.memory_budget(held=True)`, a fraction of what is
        available and what this process holds: the check may run again
        during a run, on memory the run itself holds).

    Returns:
      self.

    Raises:
      ValueError: one line with the sizes: the rotation operators exceed
        the 2 GiB TensorFlow holds in one tensor, or everything exceeds the
        memory budget.
    """
    size, count = int(image_size), int(self.num_rotations)
    # The largest constant of the graph: the taps' weights [K, L^2, TAPS].
    operators = count * size**2 * TAPS * 8
    if count not in (1, 2, 4) and operators > TENSOR_LIMIT_BYTES:
      most = TENSOR_LIMIT_BYTES // (size**2 * TAPS * 8)
      raise ValueError(
        f"num_rotations={count} needs {count} rotation operators of "
        f"{size}^2 x {TAPS} taps, {memory.format_bytes(operators)}, more "
        "than the 2 GiB TensorFlow holds in one tensor: use "
        f"num_rotations <= {most} (4 is the paper's)."
      )
    parts = self.memory_bytes(size, num_streams)
    needed = sum(parts.values())
    budget = memory.memory_budget(available_bytes, held=True)
    if budget is not None and needed > budget:
      detail = " and ".join(
        f"{memory.format_bytes(v)} of {k}" for k, v in parts.items()
      )
      raise ValueError(
        f"EM with num_rotations={count} on {size} x {size} images needs "
        f"about {memory.format_bytes(needed)} ({detail}) but this "
        f"machine can give it {memory.format_bytes(budget)} "
        f"({memory.budget_source(available_bytes)}): use "
        "fewer rotations or a smaller chunk_size."
      )
    return self


def resolve_t_prior(t_prior, prior):
  """The diffusion time of the prior's score: the one home of its fallbacks.

  Args:
    t_prior: the time asked for (`EMOptions.t_prior`, a flag), or None.
    prior: None or a `priors.Prior`.

  Returns:
    float: t_prior if given, else the prior's own `t_prior`, else Table I's.
  """
  if t_prior is not None:
    return float(t_prior)
  if prior is not None:
    return float(prior.t_prior)
  return float(table1.T_PRIOR)


def t_values(spec, t_prior, total):
  """The diffusion time of the prior's score at iterations 0..total-1.

  Args:
    spec: None (t_prior throughout) or "geometric:T0" (from T0 down to
      t_prior, geometrically: the score is smooth at large t and sharp at
      small t, so the prior first pulls towards the broad shape of the data
      and later towards its details).
    t_prior: the final time.
    total: T.

  Returns:
    float64 numpy [max(total, 1)].

  Raises:
    ValueError: on a malformed spec, or a T0 outside the VP-SDE's (0, 1].
  """
  count = max(int(total), 1)
  if spec is None:
    return np.full(count, float(t_prior))
  kind, _, arg = str(spec).strip().lower().partition(":")
  try:
    start = float(arg)
  except ValueError:
    start = float("nan")
  if kind != "geometric" or not math.isfinite(start) or start <= 0:
    raise ValueError(
      f"Unknown t_schedule {spec!r}: use None or 'geometric:T0' with "
      f"0 < T0 <= {T_MAX:g}."
    )
  if start > T_MAX:
    raise ValueError(
      f"t_schedule {spec!r} starts at T0={start:g}, outside the VP-SDE's "
      f"diffusion time (0, {T_MAX:g}]: use a T0 such as 0.5."
    )
  fraction = np.arange(count) / max(count - 1, 1)
  return np.exp(
    (1 - fraction) * math.log(start) + fraction * math.log(float(t_prior))
  )


def constant_gamma(spec):
  """Whether a gamma spec is constant in tau (a number or "constant:V")."""
  if callable(spec):
    return False
  if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
    return True
  return str(spec).strip().lower().partition(":")[0] == "constant"


def parse_gamma(spec):
  """Checks a prior-weight schedule spec; returns (kind, scale).

  Args:
    spec: as `gamma_schedule` (a callable gives ("callable", None)).

  Returns:
    ("linear" | "constant" | "callable", float scale or None).

  Raises:
    ValueError: on an unknown or malformed spec.
  """
  if callable(spec):
    return "callable", None
  if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
    value = float(spec)
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"gamma must be finite and >= 0, got {value}.")
    return "constant", value
  text = str(spec).strip().lower()
  kind, _, arg = text.partition(":")
  try:
    scale = float(arg) if arg else 1.0
  except ValueError:
    raise ValueError(
      f"Malformed gamma schedule {spec!r}: use 'linear', 'linear:V' or "
      "'constant:V' with V a number."
    ) from None
  if not math.isfinite(scale) or scale < 0:
    raise ValueError(f"gamma scale must be finite and >= 0, got {scale}.")
  if kind not in ("linear", "constant"):
    raise ValueError(
      f"Unknown gamma schedule {spec!r}: use 'linear', 'linear:V' or "
      "'constant:V'."
    )
  return kind, scale


def gamma_schedule(spec):
  """Parses a prior-weight schedule gamma(tau) of eq. (17)-(18).

  Args:
    spec: "linear" (tau / T, Table I for MNIST), "linear:V" (V tau / T),
      "constant:V" (V; Table I for Gaussian is constant:1), a number, or a
      callable (tau, T) -> scalar tensor.

  Returns:
    A callable (tau, T) -> scalar, on float tensors.

  Raises:
    ValueError: on an unknown spec.
  """
  kind, scale = parse_gamma(spec)
  if kind == "callable":
    return spec
  # Deferred: the options (and the tools' flags) load without TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if kind == "linear":
    return lambda tau, total: scale * tau / tf.maximum(total, 1.0)
  return lambda tau, total: tf.cast(scale, tau.dtype)


def chunk_size_for(num_rotations):
  """The default patches per E-step chunk for K rotations: `CHUNK_PAIRS` / K.

  64 at Table I's K = 4 (`EMOptions`' default), 16 at K = 16.

  Args:
    num_rotations: K >= 1.

  Returns:
    int >= 1.
  """
  return max(1, CHUNK_PAIRS // max(1, int(num_rotations)))
