"""The accelerators (`acceleration.py`) over the compiled EM loop.

EM is a fixed-point map F -> M(F); an accelerator calls it one iteration at
a time. Which runs: `EMOptions.acceleration`, "auto" resolved from the
M-steps' registry (`mstep.MStep.maximises_q`) and the amount of data
(`auto_accelerator`).
"""

import dataclasses
import time

import numpy as np

from mtd_tf.em import acceleration
from mtd_tf.em import registry
from mtd_tf.em.loop import log_progress
from mtd_tf.em.loop import raise_pending_interrupt
from mtd_tf.em.options import constant_gamma
from mtd_tf.em.problem import EMResult

__all__ = [
  "uses_acceleration",
  "auto_accelerator",
  "accelerated",
  "AUTO_SECANT_PATCHES_PER_PIXEL",
]

# "auto" takes the secant method from this many patches per image pixel
# (D >= 4 L^2): with that much data EM is near linear soon and its
# Jacobian near diagonal in pixels. Measured (EM-map evaluations to plain
# EM's 100-iteration log-likelihood, MNIST digits): 4088^2 (27 patches per
# pixel) secant 13, Anderson 22, SQUAREM 25; 2044^2 (6.8) 20-23 against
# 22-27; 1036^2 (1.7) 41-51 against SQUAREM's 30-36 (docs/scaling.md).
AUTO_SECANT_PATCHES_PER_PIXEL = 4


def uses_acceleration(options, batch, prior):
  """Whether an accelerator runs: options.acceleration, "auto" resolved.

  "auto" accelerates M-steps that maximise Q (`MStep.maximises_q`: closed
  form and preconditioned) when the objective does not change with tau: no
  prior, or a constant gamma. The gradient M-step of eq. (18) takes small
  steps that extrapolation gains little from.

  Raises:
    ValueError: an explicit accelerator with a prior weighted
      by a gamma that changes with tau (extrapolation needs one fixed
      objective).
  """
  if (
    options.acceleration == "none"
    or options.estimate_shift_prior
    or options.estimate_sigma
  ):
    # (The accelerators' one-iteration runs would restart rho and sigma.)
    return False
  # An annealed prior (t_schedule) changes the objective with tau too.
  time_dependent = prior is not None and (
    not constant_gamma(options.gamma) or options.t_schedule is not None
  )
  if options.acceleration != "auto":
    if time_dependent:
      raise ValueError(
        f"acceleration={options.acceleration!r} needs a constant gamma and "
        f"no t_schedule, got gamma={options.gamma!r}, "
        f"t_schedule={options.t_schedule!r}: use gamma='constant:V' or "
        "acceleration='none'."
      )
    return True
  return not time_dependent and all(
    registry.M_STEPS[m].maximises_q for m in batch.m_steps
  )


def auto_accelerator(num_patches, image_size):
  """The accelerator "auto" runs for D patches of an L x L image."""
  enough = num_patches >= AUTO_SECANT_PATCHES_PER_PIXEL * image_size**2
  return "secant" if enough else "squarem"


def accelerated(one_iteration, batch, options, max_iterations, num_patches):
  """The accelerator over one-iteration runs of the loop.

  options.acceleration "anderson", "secant" or "squarem" runs that
  function of `acceleration`; "auto" `auto_accelerator`'s choice for the
  fewest patches of any problem (docs/scaling.md compares them).

  Args:
    one_iteration: (ProblemBatch, EMOptions) -> `EMResult` of one plain
      EM iteration from the batch's inits.
    batch: the `ProblemBatch`.
    options: `EMOptions` (max_iterations counts EM-map evaluations).
    max_iterations: overrides options.max_iterations.
    num_patches: the fewest patches D of any problem (int).

  Returns:
    `EMResult`: iterations are EM-map evaluations (each one E-step and one
    M-step), log_likelihood has one row per step (a SQUAREM cycle, an
    Anderson iteration; at its start, non-decreasing) and a last row at the
    returned estimate.
  """
  total = int(
    options.max_iterations if max_iterations is None else max_iterations
  )
  plain = dataclasses.replace(options, progress_every=0, tolerance=0.0)
  last = {}
  start = time.perf_counter()
  started = time.time()

  def em_map(images):
    problems = dataclasses.replace(batch, inits=np.asarray(images, np.float64))
    result = one_iteration(problems, plain)
    last["result"] = result
    last["count"] = last.get("count", 0) + 1
    every = int(options.progress_every)
    if every and last["count"] % every == 0:
      log_progress(
        last["count"],
        total,
        result.log_likelihood[0, 0],
        np.nan,
        batch.size,
        batch.size,
        started,
      )
      raise_pending_interrupt()  # a Ctrl-C during the line, as it came
    return result.estimate, result.log_likelihood[0]

  if total == 0:
    return EMResult(
      batch.inits.copy(),
      np.zeros(batch.size, int),
      np.zeros((0, batch.size)),
      0.0,
      batch.sigmas.copy(),
    )
  try:
    name = options.acceleration
    if name == "auto":
      name = auto_accelerator(num_patches, batch.inits.shape[-1])
    accelerator = getattr(acceleration, name)
    result = accelerator(
      em_map,
      batch.inits,
      max_evaluations=total,
      tolerance=float(options.tolerance),
    )
  except KeyboardInterrupt as err:
    done = last.get("result")
    if done is not None:
      err.partial_result = EMResult(
        done.estimate,
        np.full(batch.size, last["count"]),
        done.log_likelihood,
        time.perf_counter() - start,
        batch.sigmas.copy(),
      )
    raise
  return EMResult(
    result.estimate,
    np.full(batch.size, result.evaluations),
    result.log_likelihood,
    result.seconds,
    batch.sigmas.copy(),
  )
