"""`GaussianPrior`: the exact score of N(mu, I), section IV.A's oracle.

The prior of the Gaussian experiment is N(mu, I); its score is -(F - mu).
Under the VP-SDE (eq. 6) with kernel N(alpha(t) x_0, sigma_t^2 I) (eq. 8)
and alpha^2 + sigma_t^2 = 1, the diffused marginal is N(alpha(t) mu, I), of
score -(F - alpha(t) mu). Either way -log p_t has unit curvature, and the
undiffused score makes the M-step (eq. 17-18) a closed form.
"""

import numpy as np
import tensorflow as tf

from mtd_tf.base import table1
from mtd_tf.priors import layout
from mtd_tf.priors import protocol
from mtd_tf.priors import sde as sde_lib

__all__ = ["GaussianPrior"]


class GaussianPrior:
  """The exact score of N(mu, I) in image units (section IV.A oracle).

  ``prior(F, t)`` returns -(F - mu), or with ``diffused=True`` the exact
  score of the VP-SDE marginal at time t, -(F - alpha(t) mu).

  `load_prior` builds one from a folder whose prior.json has
  ``"prior_class": "GaussianPrior"`` (`from_folder`).

  Args:
    mu: float [L, L] mean image.
    t_prior: diffusion time used by the M-step.
    diffused: whether to use the time-dependent exact marginal score.
    sde: the VP-SDE (only used when diffused).
  """

  kind = "gaussian"
  # N(mu, I) fixes position and orientation through mu already.
  convention = None
  orientation_classifier = None
  # The score is in image units.
  scale = 1.0
  offset = 0.0

  def __init__(
    self,
    mu,
    t_prior: float = table1.T_PRIOR,
    diffused: bool = False,
    sde: sde_lib.VPSDE = sde_lib.VPSDE(),
  ):
    self.mu = tf.constant(np.asarray(mu, np.float32))  # [L, L]
    if self.mu.shape.rank != 2 or self.mu.shape[0] != self.mu.shape[1]:
      raise protocol.PriorError(
        f"GaussianPrior needs a square mean image [L, L], got "
        f"shape {self.mu.shape}."
      )
    self.image_size = int(self.mu.shape[0])
    self.t_prior = float(t_prior)
    self.diffused = bool(diffused)
    self.sde = sde
    self.metadata = {
      "kind": self.kind,
      "image_size": self.image_size,
      "mu": np.asarray(mu, np.float64).reshape(-1).tolist(),
      "architecture": "exact",
      "t_prior": self.t_prior,
      "scale": 1.0,
      "offset": 0.0,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    }

  @classmethod
  def from_folder(cls, path):
    """The prior of a version folder's prior.json (fields as `__init__`).

    Reads "mu" (L * L numbers, row-major), "t_prior", "diffused" (default
    false), "beta_min" and "beta_max"; the SavedModel, if any, is not used.

    Args:
      path: str, the version folder.

    Returns:
      A GaussianPrior whose ``metadata`` is the prior.json dict and
      ``path`` the folder.

    Raises:
      PriorError: prior.json is missing, ill-typed or has no "mu".
    """
    metadata = layout.read_metadata(path)
    if "mu" not in metadata:
      raise protocol.PriorError(
        f"{layout.json_path(path)}: a GaussianPrior needs the field 'mu' "
        "(L x L numbers): add it or name another prior_class."
      )
    size = metadata["image_size"]
    prior = cls(
      np.asarray(metadata["mu"], np.float64).reshape(size, size),
      t_prior=metadata.get("t_prior", table1.T_PRIOR),
      diffused=metadata.get("diffused", False),
      sde=sde_lib.VPSDE(
        float(metadata.get("beta_min", table1.BETA_MIN)),
        float(metadata.get("beta_max", table1.BETA_MAX)),
      ),
    )
    prior.metadata = metadata
    prior.path = path
    return prior

  @property
  def gaussian_mean(self):
    """mu float32 [L, L] (the values the score uses) unless diffused."""
    return None if self.diffused else self.mu.numpy()

  def curvature(self, t):
    """1: N(alpha(t) mu, I) at every t."""
    del t
    return 1.0

  def __call__(self, x, t):
    """Score float32 [B, L, L] at x float32 [B, L, L], t [B] or scalar."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    t = protocol.broadcast_time(t, x)
    if self.diffused:
      alpha = self.sde.alpha(t)[:, None, None]
      return -(x - alpha * self.mu)
    return -(x - self.mu)
