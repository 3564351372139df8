"""The methods of reconstruction, defined once for experiments and tools.

A method is an M-step (`em.registry.M_STEPS`), whether the score prior
enters (eq. 17-18) and whether the recommended machinery runs (several
starts, pruning, selection, the gauge: `recommended.multistart_em`). The
experiment driver (`--methods`) and `mtd-reconstruct` (`--method`) both
read this registry, so a new method is one `register_method` call.

The module loads no TensorFlow: tools define their flags from it.
"""

import dataclasses
import typing

from mtd_tf.em import registry as m_step_registry

__all__ = [
  "Method",
  "METHODS",
  "PAPER_METHODS",
  "register_method",
  "get",
  "for_prior",
  "em_options",
]


@dataclasses.dataclass(frozen=True)
class Method:
  """One method of reconstruction.

  Attributes:
    name: the name flags and results use.
    description: one line for help texts.
    m_step: its M-step, a name in `em.registry.M_STEPS`.
    uses_prior: whether the prior's score enters the M-step.
    multistart: runs `recommended.multistart_em` (several starts, pruning,
      selection, gauge) with `recommended.recommended_options`; else
      Algorithm 1 from one start.
    without_prior: the method a reconstruction runs when no prior is given
      (None: this one).
  """

  name: str
  description: str
  m_step: str
  uses_prior: bool
  multistart: bool = False
  without_prior: typing.Optional[str] = None


# Name -> `Method`, in registration order.
METHODS = {}


def register_method(name, description, m_step, uses_prior, **properties):
  """Adds a method to `METHODS`; returns it.

  Raises:
    ValueError: a taken name or an unknown M-step.
  """
  if name in METHODS:
    raise ValueError(f"A method named {name!r} is already registered.")
  if m_step not in m_step_registry.M_STEPS:
    raise ValueError(
      f"Unknown M-step {m_step!r}: register it first "
      "(mtd_tf.em.register_m_step)."
    )
  method = Method(name, description, m_step, bool(uses_prior), **properties)
  METHODS[name] = method
  return method


def get(name):
  """The registered `Method` called name; ValueError naming the choices."""
  method = METHODS.get(name)
  if method is None:
    raise ValueError(
      f"Unknown method {name!r}: use one of {', '.join(METHODS)}."
    )
  return method


def for_prior(name, has_prior):
  """The method a reconstruction runs: `name`, or its `without_prior`."""
  method = get(name)
  if method.uses_prior and not has_prior and method.without_prior:
    return get(method.without_prior)
  return method


def em_options(
  method, options, image_size, estimate_sigma=False, continuous=False
):
  """The EM and recovery options a method runs with.

  Args:
    method: a `Method`.
    options: `EMOptions` (Table I's, or the user's).
    image_size: L.
    estimate_sigma: a multistart method refines sigma by EM
      (`EMOptions.estimate_sigma`): where the true sigma is not known.
    continuous: the copies are turned by any angle (the gauge then puts
      a multistart method's estimate upright at any angle).

  Returns:
    (`EMOptions`, `recommended.RecoveryOptions` or None).
  """
  if not method.multistart:
    return options, None
  # Deferred: the recommended method loads TensorFlow; the registry does not.
  from mtd_tf.recovery import recommended  # pylint: disable=g-import-not-at-top

  em_opts, recovery_opts = recommended.recommended_options(
    options, image_size, continuous
  )
  em_opts = dataclasses.replace(em_opts, estimate_sigma=bool(estimate_sigma))
  return em_opts, recovery_opts


register_method(
  "no_prior",
  "Algorithm 1 without the prior: Table I's gradient steps (the paper's "
  "baseline).",
  "gradient",
  False,
)
register_method(
  "prior",
  "Algorithm 1 (the paper): gradient steps of mu with the prior weighted by "
  "gamma(tau), Table I.",
  "gradient",
  True,
  without_prior="no_prior",
)
register_method(
  "no_prior_closed_form",
  "the exact maximiser of Q, iterated.",
  "closed_form",
  False,
)
register_method(
  "prior_preconditioned",
  "steps scaled by the exact curvature of Q and the prior's.",
  "preconditioned",
  True,
  without_prior="no_prior_closed_form",
)
register_method(
  "paper",
  "Algorithm 1 from one start (Table I): the gradient M-step with a prior, "
  "the exact one without.",
  "gradient",
  True,
  without_prior="no_prior_closed_form",
)
register_method(
  "recommended",
  "several starts, pruning, the prior annealed, rho (and sigma where not "
  "given) by EM, selection by the log-likelihood and the prior's gauge "
  "(preconditioned M-step; docs/recommended.md).",
  "preconditioned",
  True,
  multistart=True,
  without_prior="recommended_no_prior",
)
register_method(
  "recommended_no_prior",
  "the recommended machinery without the prior (closed-form M-step).",
  "closed_form",
  False,
  multistart=True,
)

# The paper's four methods: the default of an experiment.
PAPER_METHODS = (
  "no_prior",
  "prior",
  "no_prior_closed_form",
  "prior_preconditioned",
)
