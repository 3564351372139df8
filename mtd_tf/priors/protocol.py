"""The prior contract of the M-step (eq. 17-18) and the checks every caller
runs on a prior before using it.

Algorithm 1's M-step ascends gamma(tau) log p(F) with the prior's score
s(F, t) = grad_F log p_t(F) at the diffusion time t_prior (eq. 18), where
p_t is the marginal of the VP-SDE of eq. (6) (kernel eq. 8). `Prior` lists
everything the rest of the package reads from a prior (EM, the recommended
method, the gauge, sampling); `as_prior` refuses, in one line naming what
is missing, any object that does not provide it. Implementations:
`GaussianPrior` (gaussian.py), `ScorePrior` (score.py), `SavedModelPrior`
(saved_model.py); any other class with these members works as well.
"""

import typing

import numpy as np
import tensorflow as tf

from mtd_tf.priors import sde as sde_lib

__all__ = [
  "PriorError",
  "Prior",
  "MEMBERS",
  "missing_members",
  "as_prior",
  "check_image_size",
  "broadcast_time",
]


class PriorError(ValueError):
  """A prior folder or prior object that cannot be used, with what to do."""


@typing.runtime_checkable
class Prior(typing.Protocol):
  """What the package needs from a prior (docs/conventions.md).

  Calling it: ``prior(x, t)`` with x float32 [B, L, L] images F in image
  units and t float32 [B] or a scalar (broadcast) returns the score
  s(F, t) = grad_F log p_t(F), float32 [B, L, L] (eq. 6-8); it must work
  inside a `tf.function` (the EM loop is one compiled graph).

  Who reads what: the EM loop the score, t_prior, gaussian_mean and
  curvature; the recommended method and the gauge convention and
  orientation_classifier; the pipelines kind, metadata and image_size; the
  sampler sde, scale and offset. Priors from `load_prior` also carry
  ``path``, their folder.

  Attributes:
    image_size: int L; images are L x L.
    t_prior: float, the diffusion time at which the M-step evaluates the
      score by default (eq. 18; table1.T_PRIOR unless an export says
      otherwise).
    kind: str, the data family ("gaussian", "mnist", ...; `kinds`), which
      picks Table I's gamma through `table1.gamma_for`.
    metadata: dict, JSON-serialisable (prior.json for exports).
    gaussian_mean: float numpy [L, L] mu when the score is exactly
      -(F - mu) at every t (the M-step then has a closed form, and the ODE
      sampler refuses it); otherwise None.
    convention: the gauge of the prior's data set (`gauge.fix_gauge`): a
      dict with "centre_of_mass" ([row, col] floats) and "orientation"
      ("upright": the orientation the prior finds most plausible), or None
      when the data set fixes neither (prior.json "convention", else the
      kind's, `kinds.convention_of`).
    orientation_classifier: None, or a callable x float32 [B, L, L] ->
      logits float32 [B, 4] of the quarter turn (np.rot90 count) applied to
      an upright image (`orientation`); the gauge uses it when present.
    sde: the `sde.VPSDE` (eq. 6) the score belongs to; the probability-flow
      sampler (`sampling.sample_images`) integrates its ODE.
    scale, offset: floats, the data scaling x = scale * F + offset of the
      units the score was trained in (1 and 0 for a prior in image units);
      the sampler runs the SDE in those units.

  Methods:
    curvature(t): float c > 0, the curvature of -log p_t at diffusion time
      t (float), used by the preconditioned M-step (1 for N(mu, I),
      1 / sigma_t^2 for a learned diffusion score).
  """

  image_size: int
  t_prior: float
  kind: str
  metadata: dict
  gaussian_mean: typing.Optional[np.ndarray]
  convention: typing.Optional[dict]
  orientation_classifier: typing.Optional[typing.Callable]
  sde: sde_lib.VPSDE
  scale: float
  offset: float

  def __call__(self, x, t):
    """The score float32 [B, L, L] at x float32 [B, L, L], t [B] or []."""

  def curvature(self, t: float) -> float:
    """c, the curvature of -log p_t used by the preconditioned M-step."""


# Every member of the contract, in the order of the docstring.
MEMBERS = (
  "__call__",
  "image_size",
  "t_prior",
  "kind",
  "metadata",
  "gaussian_mean",
  "convention",
  "orientation_classifier",
  "sde",
  "scale",
  "offset",
  "curvature",
)


def missing_members(obj) -> typing.List[str]:
  """The members of `Prior` that obj lacks, in `MEMBERS` order."""

  def has(name):
    if name in ("__call__", "curvature"):
      return callable(obj if name == "__call__" else getattr(obj, name, None))
    return hasattr(obj, name)

  return [name for name in MEMBERS if not has(name)]


def as_prior(prior, image_size=None):
  """Returns `prior` after checking that it meets the `Prior` contract.

  Args:
    prior: an object with every member of `Prior` (`load_prior`,
      `GaussianPrior`, `ScorePrior` or a class of one's own).
    image_size: optional L, checked against prior.image_size.

  Returns:
    prior itself.

  Raises:
    PriorError: a member is missing (one line naming them; a bare score
      function must be wrapped in `ScorePrior`), or the prior is made for
      another image size.
  """
  missing = missing_members(prior)
  if missing:
    what = (
      "wrap a bare score function in priors.ScorePrior(fn, image_size, ...)"
      if callable(prior)
      else "pass a loaded prior (priors.load_prior), priors.GaussianPrior(mu)"
      " or priors.ScorePrior(fn, image_size, ...)"
    )
    raise PriorError(
      f"Got a {type(prior).__name__} as prior, which lacks "
      f"{', '.join(missing)} of the priors.Prior contract: {what}."
    )
  if image_size is not None:
    check_image_size(prior, image_size)
  return prior


def check_image_size(prior, image_size):
  """Raises `PriorError` unless prior.image_size equals L = image_size."""
  if int(prior.image_size) != int(image_size):
    raise PriorError(
      f"The prior is for {prior.image_size}x{prior.image_size} images but "
      f"the image size L is {image_size}: use a prior trained for L = "
      f"{image_size} or run without a prior."
    )


def broadcast_time(t, x):
  """t as float32 [B] for x [B, L, L]; a scalar t is broadcast."""
  t = tf.convert_to_tensor(t, dtype=tf.float32)
  batch = tf.shape(x)[0]
  if t.shape.rank == 0:
    return tf.fill([batch], t)
  return tf.reshape(t, [batch])
