"""The sample_prior tool's one library call: samples of a prior as a PNG grid.

`sample_grid(config)` loads a shipped or exported prior
(`priors.load_prior`), draws probability-flow ODE samples of its VP-SDE
(eq. 6; `priors.sampling.sample_images`) and writes them as a square grid
(`figures.image_grid`), clipped to the pixel range of the prior's data kind
(`priors.kinds`). A sample count the machine cannot hold is refused before
any work (`check_size`): first for the grid alone, when the config is made,
then with the prior's image size, before sampling.
"""

import dataclasses
import os

from mtd_tf import priors
from mtd_tf.base import atomic
from mtd_tf.base import memory
from mtd_tf.pipelines import figures
from mtd_tf.priors import kinds
from mtd_tf.priors import sampling
from mtd_tf.priors import sde as sde_lib

__all__ = ["SampleConfig", "SampleResult", "sample_grid", "check_size"]

# Memory per sample (measured with mnist_unet on CPU: about 0.8 MB per
# 28 x 28 sample at 256 samples, 0.2 MB per grid cell at 1,600): its grid
# cell (a matplotlib axes with its image, and its share of the canvas)...
_GRID_BYTES_PER_SAMPLE = 256 * 2**10
# ...and per image pixel while sampling: the score network's activations
# for the whole batch and the ODE solver's float64 stages.
_SAMPLING_BYTES_PER_PIXEL = 2**10


def check_size(num_samples, image_size=None, available_bytes=None):
  """Refuses a sample count the machine cannot hold, before any work.

  Args:
    num_samples: images in the grid.
    image_size: the prior's L (None: count the grid only).
    available_bytes: memory to fit in (default:
      `memory.memory_budget()`).

  Raises:
    sampling.SamplingError: with the sizes and the largest count that fits.
  """
  per_sample = _GRID_BYTES_PER_SAMPLE
  if image_size is not None:
    per_sample += _SAMPLING_BYTES_PER_PIXEL * int(image_size) ** 2
  needed = int(num_samples) * per_sample
  budget = memory.memory_budget(available_bytes)
  if budget is not None and needed > budget:
    size = "" if image_size is None else f" of {image_size} x {image_size}"
    raise sampling.SamplingError(
      f"num_samples={num_samples}: {num_samples} samples{size} and their "
      f"grid need about {memory.format_bytes(needed)} but this machine "
      f"can give them {memory.format_bytes(budget)} "
      f"({memory.budget_source(available_bytes)}): ask "
      f"for at most {budget // per_sample}."
    )


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
    check_size(self.num_samples)
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
    sampling.SamplingError: the prior cannot be sampled, or not that many
      times (`check_size`), before any sampling.
  """
  out = atomic.check_output_path(config.out, (".png",))
  prior = priors.load_prior(config.prior)
  check_size(config.num_samples, int(prior.image_size))
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
