"""The registry of M-steps (eq. 16-18) and the properties callers read.

A new M-step is a function `(images [B, L, L], stats, mstep.MStepInputs) ->
[B, L, L]` and one `register_m_step` call. Everything that depends on an
M-step reads its entry here: `EMOptions` and `ProblemBatch` validate names,
the prior check refuses M-steps that need an exact Gaussian prior, "auto"
acceleration takes M-steps that maximise Q, the divergence message names
the step size, and the tools' `--m_step` choices list the registry.

The module loads no TensorFlow: tools define their flags from it. The
built-in steps are named by import path and load on first call.
"""

import dataclasses
import importlib
import typing

__all__ = ["MStep", "M_STEPS", "register_m_step", "needs_gaussian_prior"]


@dataclasses.dataclass(frozen=True)
class MStep:
  """One registered M-step and the properties that checks and tools read.

  Attributes:
    fn: (images [B, L, L], `estep.Statistics`, `mstep.MStepInputs`) ->
      [B, L, L], or "module:function" naming one (loaded on first call).
    description: one line for the tools' help.
    maximises_q: the step maximises Q + gamma log p (or nearly): EM with it
      is a fixed-point map that "auto" acceleration extrapolates.
    needs_gaussian_prior: with a prior weighted above 0 the step needs the
      prior's exact Gaussian mean (`Prior.gaussian_mean`), as the closed
      form does.
    step_size: the name of the `EMOptions` field that sizes the step (its
      divergence advice names it), or None.
  """

  fn: typing.Union[typing.Callable, str]
  description: str
  maximises_q: bool = False
  needs_gaussian_prior: bool = False
  step_size: typing.Optional[str] = None

  def function(self):
    """The M-step's callable (a "module:function" name imported now).

    Call it outside traced code: AutoGraph would try to convert the import
    machinery.
    """
    if isinstance(self.fn, str):
      module, _, name = self.fn.partition(":")
      return getattr(importlib.import_module(module), name)
    return self.fn

  def __call__(self, images, stats, inputs):
    return self.function()(images, stats, inputs)


# Name -> `MStep`, in registration order.
M_STEPS = {}


def register_m_step(name, fn, description, **properties):
  """Adds an M-step to `M_STEPS` under `name`; returns its `MStep`.

  Args:
    name: the name options and flags use (`EMOptions.m_step`).
    fn: (images [B, L, L], stats, `mstep.MStepInputs`) -> [B, L, L],
      traceable by `tf.function` (and by XLA where no prior is used).
    description: one line for help texts.
    **properties: `MStep` fields (maximises_q, needs_gaussian_prior,
      step_size).

  Raises:
    ValueError: the name is taken or not an identifier.
  """
  if not str(name).isidentifier():
    raise ValueError(f"An M-step name must be an identifier, got {name!r}.")
  if name in M_STEPS:
    raise ValueError(f"An M-step named {name!r} is already registered.")
  step = MStep(fn, description, **properties)
  M_STEPS[name] = step
  return step


def needs_gaussian_prior(m_steps, prior, weights):
  """Refuses M-steps that need an exact Gaussian prior with another prior.

  Args:
    m_steps: the M-step names of B problems.
    prior: None or a `priors.Prior`.
    weights: B prior weights (0: that problem uses no prior).

  Raises:
    ValueError: one line naming the M-step and what to use instead.
  """
  if prior is None or prior.gaussian_mean is not None:
    return
  for name, weight in zip(m_steps, weights):
    if M_STEPS[name].needs_gaussian_prior and weight > 0:
      others = [n for n, s in M_STEPS.items() if not s.needs_gaussian_prior]
      raise ValueError(
        f"A learned score prior has no {name.replace('_', '-')} M-step: use "
        "m_step="
        + " or ".join(repr(n) for n in others)
        + " (only a prior with an exact Gaussian score has one)."
      )


register_m_step(
  "closed_form",
  "mtd_tf.em.mstep:closed_form_mstep",
  "the exact maximiser of Q (the MAP with an exact Gaussian prior)",
  maximises_q=True,
  needs_gaussian_prior=True,
)
register_m_step(
  "gradient",
  "mtd_tf.em.mstep:gradient_mstep",
  "eq. (18): gradient steps of fixed size learning_rate (the paper's)",
  step_size="learning_rate",
)
register_m_step(
  "preconditioned",
  "mtd_tf.em.mstep:preconditioned_mstep",
  "gradient steps scaled by the curvature of Q and the prior's",
  maximises_q=True,
)
