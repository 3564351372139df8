"""The sample_prior tool's one library call: samples of a prior as a PNG grid.

`sample_grid(config)` loads a shipped or exported prior
(`priors.load_prior`), draws probability-flow ODE samples of its VP-SDE
(eq. 6; `priors.sampling.sample_images`) and writes them as a square grid
(`figures.image_grid`), clipped to the pixel range of the prior's data kind
(`priors.kinds`).
"""

import dataclasses
import os

from mtd_tf import priors
from mtd_tf.base import atomic
from mtd_tf.pipelines import figures
from mtd_tf.priors import kinds
from mtd_tf.priors import sampling
from mtd_tf.priors import sde as sde_lib

__all__ = ["SampleConfig", "SampleResult", "sample_grid"]


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """What the sample_prior tool does (checked on construction).

  Attributes:
    prior: a shipped prior name ("mnist_unet", "mnist_unet/1") or a folder.
    out: the PNG to write.
    num_samples: images in the grid.
    seed: seed of the initial noise.
    eps, rtol, atol: see `mtd_tf.priors.sde.probability_flow_sample`.

  Raises:
    sampling.SamplingError: a bad count, eps or tolerance, or no prior.
  """

  prior: str
  out: str
  num_samples: int = 64
  seed: int = 0
  eps: float = sde_lib.DEFAULT_SAMPLER_EPS
  rtol: float = 1e-3
  atol: float = 1e-3

  def __post_init__(self):
    sampling.check_request(self.num_samples, self.eps, self.rtol, self.atol)
    if not self.prior:
      raise sampling.SamplingError(
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

  Args:
    config: a `SampleConfig`.

  Returns:
    A `SampleResult`.

  Raises:
    priors.PriorError: the prior cannot be loaded.
    sampling.SamplingError: the prior cannot be sampled.
  """
  out = atomic.check_output_path(config.out, (".png",))
  prior = priors.load_prior(config.prior)
  images, evaluations = sampling.sample_images(
    prior, config.num_samples, config.seed, config.eps, config.rtol, config.atol
  )  # float32 [n, L, L]
  kind = prior.metadata.get("kind", "")
  title = (
    f"{kind} prior, step {prior.metadata.get('steps', '?')}, "
    f"probability-flow ODE ({evaluations} score evaluations)"
  )
  figures.image_grid(images, out, clip=kinds.of(kind).clip, title=title)
  return SampleResult(os.fspath(config.out), len(images), evaluations)
