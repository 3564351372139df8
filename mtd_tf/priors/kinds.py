"""Data kinds: what the package knows about a prior's data family.

A prior's ``kind`` (prior.json "kind"; `Prior.kind`) names the data set its
score was trained on. Everything that depends on the kind is read here, from
one `DataKind` per family, and nowhere else:

* Table I's settings of the family's experiment (image size, SNRs, the
  prior weight gamma(tau) of eq. 17, F(0), the shipped prior): the entry of
  `table1.DATASETS` of the same name (`DataKind.dataset`, `DataKind.gamma`);
  table1 stays TensorFlow-free and below this floor, so it keeps its own
  table and this module reads it.
* the gauge convention of priors whose prior.json predates "convention"
  (`convention_of`; docs/conventions.md);
* the curvature of a learned score of the family (`unit_curvature`: the
  diffused N(mu, I) is N(alpha(t) mu, I) at every t, eq. 8, so -log p_t has
  curvature 1; otherwise 1 / sigma_t^2, `score.diffused_curvature`);
* the pixel range samples are shown in (`clip`);
* the network builder of exports older than prior.json's "network"
  (`network`, read by `networks.network_config`).

A kind without an entry here ("learned", "test", ...) gets `DataKind(name)`:
no convention, no clipping, the curvature of a learned diffusion score.
TensorFlow-free.
"""

import dataclasses
import types
import typing

from mtd_tf.base import table1

__all__ = ["DataKind", "KINDS", "of", "convention_of"]


@dataclasses.dataclass(frozen=True)
class DataKind:
  """One data family.

  Attributes:
    name: the kind, as in prior.json "kind".
    centre_of_mass: (row, col) float where the data set puts its images'
      centre of mass, or None when it fixes none.
    orientation: "upright" when the data set fixes the orientation (the
      one its prior finds most plausible), else None.
    unit_curvature: whether -log p_t of the family has curvature 1 at every
      t (the data are N(mu, I)), so a learned score of it gets curvature 1.
    clip: (low, high) pixel range of the data (sample grids are clipped to
      it), or None for unbounded data.
    network: the `networks` builder of the family's exports that predate
      prior.json's "network" field, or None.
  """

  name: str
  centre_of_mass: typing.Optional[typing.Tuple[float, float]] = None
  orientation: typing.Optional[str] = None
  unit_curvature: bool = False
  clip: typing.Optional[typing.Tuple[float, float]] = None
  network: typing.Optional[str] = None

  def convention(self) -> typing.Optional[dict]:
    """The gauge convention as prior.json writes it (a fresh dict), or None.

    Returns:
      {"centre_of_mass": [row, col], "orientation": ...} with the fields
      the family fixes, or None when it fixes neither.
    """
    convention = {}
    if self.centre_of_mass is not None:
      convention["centre_of_mass"] = [float(v) for v in self.centre_of_mass]
    if self.orientation is not None:
      convention["orientation"] = self.orientation
    return convention or None

  @property
  def dataset(self) -> typing.Optional[typing.Mapping]:
    """Table I's settings of the family (`table1.DATASETS`), or None."""
    return table1.DATASETS.get(self.name)

  @property
  def gamma(self) -> str:
    """Table I's gamma(tau) schedule string (`table1.gamma_for`)."""
    return table1.gamma_for(self.name)


# The families of section IV. N(mu, I) fixes position and orientation
# through mu; MNIST digits are upright with their centre of mass at pixel
# (14, 14) [row, col] (all 70,000 within half a pixel) and lie in [0, 1].
KINDS = types.MappingProxyType(
  {
    "gaussian": DataKind(
      "gaussian", unit_curvature=True, network="gaussian_score_mlp"
    ),
    "mnist": DataKind(
      "mnist",
      centre_of_mass=(14.0, 14.0),
      orientation="upright",
      clip=(0.0, 1.0),
      network="mnist_unet",
    ),
  }
)


def of(kind) -> DataKind:
  """The `DataKind` of a kind name; `DataKind(kind)` for unknown kinds."""
  name = str(kind)
  return KINDS.get(name) or DataKind(name)


def convention_of(metadata) -> typing.Optional[dict]:
  """The gauge convention of a prior's metadata: its "convention", or None.

  Priors exported before prior.json recorded a convention (mnist_unet/1)
  fall back to the convention of their kind (`DataKind.convention`).

  Args:
    metadata: a prior.json dict, or None.

  Returns:
    A fresh dict {"centre_of_mass": [row, col], "orientation": ...}, or
    None when neither the metadata nor the kind fixes a convention.
  """
  metadata = metadata or {}
  convention = metadata.get("convention")
  if convention is None:
    return of(metadata.get("kind")).convention()
  return dict(convention)
