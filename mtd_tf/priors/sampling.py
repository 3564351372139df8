"""Samples from a score prior by the probability-flow ODE.

`sample_images(prior, ...)` runs `mtd_tf.priors.sde.probability_flow_sample`
(eq. 6 and its probability-flow ODE, from t = 1 to t = eps) on a prior's
score in the units the prior was trained in (x = scale * F + offset, the
`Prior` contract's ``scale`` and ``offset``) with the prior's ``sde``, and
maps the samples back to image units F. The prior's score must depend on t:
a loaded SavedModel prior, or `priors.GaussianPrior(mu, diffused=True)`
(whose exact marginal score makes the samples exactly N(mu, I), which the
tests use).

The sample_prior tool's job (load a prior, sample, write a PNG grid) is
`mtd_tf.pipelines.prior_samples`.
"""

import numpy as np
import tensorflow as tf

from mtd_tf.priors import sde as sde_lib

__all__ = [
  "sample_images",
  "check_request",
  "SamplingError",
]


class SamplingError(ValueError):
  """A sampling request that cannot be honoured, with what to do instead."""


def check_request(num_samples, eps, rtol, atol):
  """Raises `SamplingError` unless num_samples > 0, 0 < eps < 1, tols > 0."""
  if not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
    raise SamplingError(
      f"num_samples={num_samples}: ask for at least one sample."
    )
  if not 0.0 < eps < 1.0:
    raise SamplingError(
      f"eps={eps}: the final diffusion time must be in (0, 1), e.g. 1e-3."
    )
  if not (rtol > 0 and atol > 0):
    raise SamplingError(
      f"rtol={rtol}, atol={atol}: the ODE tolerances must be positive."
    )


def sample_images(
  prior,
  num_samples: int = 64,
  seed: int = 0,
  eps: float = sde_lib.DEFAULT_SAMPLER_EPS,
  rtol: float = 1e-3,
  atol: float = 1e-3,
):
  """Probability-flow samples from a prior, in image units.

  Args:
    prior: a `priors.Prior` whose score is the time-dependent marginal score
      of ``prior.sde`` (a loaded prior, `priors.GaussianPrior(mu,
      diffused=True)`); its image_size, sde, scale and offset are used.
    num_samples: how many images (> 0).
    seed: seed of the initial N(0, I) draw.
    eps, rtol, atol: see `mtd_tf.priors.sde.probability_flow_sample`.

  Returns:
    (float32 [num_samples, L, L] images in image units, int score
    evaluations).

  Raises:
    SamplingError: a bad count, eps or tolerance, or a prior whose score does
      not depend on t.
  """
  check_request(num_samples, eps, rtol, atol)
  if prior.gaussian_mean is not None:
    raise SamplingError(
      "This prior's score is -(F - mu) at every t (it has a gaussian_mean), "
      "so the ODE would not sample it: use GaussianPrior(mu, diffused=True)."
    )
  size = int(prior.image_size)
  scale = float(prior.scale)
  offset = float(prior.offset)

  @tf.function
  def network_score(x, t):
    # The score in the units x = scale * F + offset the SDE diffuses: by
    # the chain rule, s_x(x, t) = s_F((x - offset) / scale, t) / scale.
    return prior((x - offset) / scale, t) / scale

  x, evaluations = sde_lib.probability_flow_sample(
    network_score,
    [int(num_samples), size, size],
    prior.sde,
    eps=eps,
    rtol=rtol,
    atol=atol,
    seed=seed,
  )  # [n, L, L] in network units
  images = (x.numpy() - offset) / scale
  return images.astype(np.float32), int(evaluations)
