"""`ScorePrior`: any score function s(F, t) in image units as a `Prior`.

The function is taken to be a learned score of the VP-SDE marginal p_t
(eq. 6-8): the M-step has no closed form for it and the curvature of
-log p_t is bounded by that of the kernel's noise, 1 / sigma_t^2 (eq. 8;
`diffused_curvature`).
"""

import tensorflow as tf

from mtd_tf.base import table1
from mtd_tf.priors import kinds
from mtd_tf.priors import protocol
from mtd_tf.priors import sde as sde_lib

__all__ = ["ScorePrior", "diffused_curvature"]


def diffused_curvature(sde, t) -> float:
  """1 / sigma_t^2: the largest curvature of a density diffused to time t.

  p_t is p_0 (scaled by alpha(t)) convolved with N(0, sigma_t^2 I), eq. (8),
  so -log p_t is never more curved than -log N(0, sigma_t^2 I).

  Args:
    sde: a `sde.VPSDE`.
    t: float diffusion time in (0, 1].

  Returns:
    float.
  """
  return float(1.0 / sde.variance(tf.constant(float(t), tf.float64)))


class ScorePrior:
  """Any score function s(F [B, L, L] float32, t [B] float32) in image units.

  Treated as a learned diffusion score: curvature 1 / sigma_t^2 of ``sde``
  and no closed-form M-step. It carries no orientation classifier and the
  convention of its kind (`kinds.convention_of`).

  Args:
    score_fn: the callable, returning float [B, L, L]; it must work inside a
      `tf.function`.
    image_size: L.
    kind: the data family (picks Table I's gamma).
    t_prior: diffusion time used by the M-step.
    sde: the VP-SDE the score was trained with.
  """

  gaussian_mean = None
  orientation_classifier = None
  # The score is in image units.
  scale = 1.0
  offset = 0.0

  def __init__(
    self,
    score_fn,
    image_size,
    *,
    kind="learned",
    t_prior=table1.T_PRIOR,
    sde=sde_lib.VPSDE(),
  ):
    if not callable(score_fn):
      raise protocol.PriorError(
        f"A score prior must be callable, got {type(score_fn).__name__}."
      )
    self.score_fn = score_fn
    self.image_size = int(image_size)
    self.kind = str(kind)
    self.t_prior = float(t_prior)
    self.sde = sde
    self.metadata = {
      "kind": self.kind,
      "image_size": self.image_size,
      "t_prior": self.t_prior,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    }
    self.convention = kinds.convention_of(self.metadata)

  def curvature(self, t):
    """1 / sigma_t^2 of ``sde`` at diffusion time t (float)."""
    return diffused_curvature(self.sde, t)

  def __call__(self, x, t):
    """Score float32 [B, L, L] at x float32 [B, L, L], t [B] or scalar."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return tf.cast(self.score_fn(x, protocol.broadcast_time(t, x)), tf.float32)
