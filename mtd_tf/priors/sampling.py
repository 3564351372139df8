"""Samples from a score prior by the probability-flow ODE.

`sample_images(prior, ...)` runs `mtd_tf.priors.sde.probability_flow_sample` (eq. 6
and its probability-flow ODE, from t = 1 to t = eps) on a prior's score in
the units the prior was trained in (the network's x = scale * F + offset,
see `mtd_tf.priors`) and maps the samples back to image units F. The prior's
score must depend on t: a loaded SavedModel prior, or
`priors.GaussianPrior(mu, diffused=True)` (whose exact marginal score makes
the samples exactly N(mu, I), which the tests use).

`sample_grid(config)` is the library side of the `mtd_tf.sample_prior` tool:
load a prior, sample, write a PNG grid.
"""

import dataclasses
import os

import numpy as np

from mtd_tf.priors import sde as sde_lib

__all__ = [
  "sample_images",
  "SampleConfig",
  "SampleResult",
  "sample_grid",
  "SamplingError",
]


class SamplingError(ValueError):
  """A sampling request that cannot be honoured, with what to do instead."""


def _check(num_samples, eps, rtol, atol):
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
    prior: a `priors.SavedModelPrior` (its `network_score`, `sde`, `scale`,
      `offset` are used) or any prior callable (x [B, L, L], t [B]) with
      `image_size` and `sde`, whose score is the time-dependent marginal
      score (e.g. `priors.GaussianPrior(mu, diffused=True)`).
    num_samples: how many images (> 0).
    seed: seed of the initial N(0, I) draw.
    eps, rtol, atol: see `mtd_tf.priors.sde.probability_flow_sample`.

  Returns:
    (float32 [num_samples, L, L] images in image units, score evaluations).

  Raises:
    SamplingError: a bad count, eps or tolerance, or a prior whose score does
      not depend on t.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  _check(num_samples, eps, rtol, atol)
  if getattr(prior, "diffused", True) is False:
    raise SamplingError(
      "This GaussianPrior's score ignores t, so the ODE "
      "would not sample it: use GaussianPrior(mu, "
      "diffused=True)."
    )
  size = int(prior.image_size)
  score = tf.function(getattr(prior, "network_score", prior))
  scale = float(getattr(prior, "scale", 1.0))
  offset = float(getattr(prior, "offset", 0.0))
  x, evaluations = sde_lib.probability_flow_sample(
    score,
    [int(num_samples), size, size],
    prior.sde,
    eps=eps,
    rtol=rtol,
    atol=atol,
    seed=seed,
  )  # [n, L, L] in network units
  images = (x.numpy() - offset) / scale
  return images.astype(np.float32), int(evaluations)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """What the sample_prior tool does (checked on construction).

  Attributes:
    prior: a shipped prior name ("mnist_unet", "mnist_unet/1") or a folder.
    out: the PNG to write.
    num_samples: images in the grid.
    seed: seed of the initial noise.
    eps, rtol, atol: see `mtd_tf.priors.sde.probability_flow_sample`.
  """

  prior: str
  out: str
  num_samples: int = 64
  seed: int = 0
  eps: float = sde_lib.DEFAULT_SAMPLER_EPS
  rtol: float = 1e-3
  atol: float = 1e-3

  def __post_init__(self):
    _check(self.num_samples, self.eps, self.rtol, self.atol)
    if not self.prior:
      raise SamplingError(
        "prior is empty: give a shipped prior name such as "
        "mnist_unet or a prior folder."
      )


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """What `sample_grid` wrote: the PNG, the sample count, score evaluations."""

  path: str
  num_samples: int
  evaluations: int


def sample_grid(config: SampleConfig) -> SampleResult:
  """Loads `config.prior`, draws samples, writes them as a PNG grid.

  The output path is checked before the prior is loaded or anything sampled.
  """
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  from mtd_tf.base import atomic  # pylint: disable=g-import-not-at-top

  out = atomic.check_output_path(config.out, (".png",))
  prior = priors.load_prior(config.prior)
  images, evaluations = sample_images(
    prior, config.num_samples, config.seed, config.eps, config.rtol, config.atol
  )
  kind = prior.metadata.get("kind", "")
  clip = (0.0, 1.0) if kind == "mnist" else None
  title = (
    f"{kind} prior, step {prior.metadata.get('steps', '?')}, "
    f"probability-flow ODE ({evaluations} score evaluations)"
  )
  from mtd_tf.pipelines import figures  # pylint: disable=g-import-not-at-top

  figures.image_grid(images, out, clip=clip, title=title)
  return SampleResult(os.fspath(config.out), len(images), evaluations)
