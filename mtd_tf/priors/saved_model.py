"""`SavedModelPrior`: an exported score network s_theta(x, t) as a `Prior`.

The network was trained by denoising score matching (eq. 7) on the VP-SDE
of eq. (6) with prior.json's beta_min and beta_max, on data scaled as
x = scale * F + offset. In image units F its score is therefore
scale * s_theta(scale * F + offset, t) (the chain rule). A SavedModel runs
code: load only priors you trust (`loading.load_prior` checks the
signature, prior.json and one probe call before returning one).
"""

import os

import tensorflow as tf

from mtd_tf.base import table1
from mtd_tf.priors import kinds
from mtd_tf.priors import layout
from mtd_tf.priors import protocol
from mtd_tf.priors import score as score_lib
from mtd_tf.priors import sde as sde_lib

__all__ = ["SavedModelPrior"]


class SavedModelPrior:
  """A score network loaded from an exported SavedModel (see `load_prior`).

  Attributes:
    path: the SavedModel folder.
    image_size: L.
    metadata: the dict read from assets/prior.json.
    kind: metadata["kind"] ("unknown" when absent).
    convention: `kinds.convention_of(metadata)`.
    t_prior: metadata["t_prior"] (table1.T_PRIOR unless the export said
      otherwise).
    scale, offset: the data scaling x = scale * F + offset.
    sde: the `VPSDE` with the exported beta_min, beta_max.
    gaussian_mean: None (a learned score is never exactly Gaussian).
    orientation_classifier: None, or a callable x float32 [B, L, L] ->
      logits float32 [B, 4] of the quarter turn applied to an upright
      image (`orientation`), when the export carries one.
  """

  gaussian_mean = None

  def __init__(self, loaded, metadata, path):
    self._loaded = loaded
    self._serve = loaded.signatures[layout.SERVING_KEY]
    self._orientation = loaded.signatures.get(layout.ORIENTATION_KEY)
    self.orientation_classifier = (
      self._orientation_logits if self._orientation is not None else None
    )
    self.path = path
    self.metadata = metadata
    self.image_size = int(metadata["image_size"])
    self.kind = str(metadata.get("kind", "unknown"))
    self.convention = kinds.convention_of(metadata)
    self.t_prior = float(metadata.get("t_prior", table1.T_PRIOR))
    self.scale = float(metadata.get("scale", 1.0))
    self.offset = float(metadata.get("offset", 0.0))
    self.sde = sde_lib.VPSDE(
      float(metadata.get("beta_min", table1.BETA_MIN)),
      float(metadata.get("beta_max", table1.BETA_MAX)),
    )

  @classmethod
  def from_folder(cls, path):
    """Loads and checks the SavedModel and prior.json of a version folder.

    Args:
      path: str, the version folder.

    Returns:
      A SavedModelPrior (not yet probed: `load_prior` does that).

    Raises:
      PriorError: not a SavedModel, corrupt saved_model.pb, no
        serving_default taking x [None, L, L] and t [None] float32 and
        returning score float32, a bad orientation signature, or a missing
        or ill-typed assets/prior.json.
    """
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
      raise protocol.PriorError(
        f"{path!r} is not a SavedModel (no saved_model.pb): "
        "pass a folder written by export_prior."
      )
    try:
      loaded = tf.saved_model.load(path)
    except Exception as e:  # pylint: disable=broad-except
      first = layout.error_line(e)
      raise protocol.PriorError(
        f"Could not load the SavedModel at {path!r} (corrupt or "
        f"truncated? {first[:200]}): re-export or re-download "
        "the prior."
      ) from e
    signatures = getattr(loaded, "signatures", {})
    if layout.SERVING_KEY not in signatures:
      raise protocol.PriorError(
        f"{path!r} has no {layout.SERVING_KEY!r} signature: re-export it "
        "with mtd_tf.priors.export_prior."
      )
    size = layout.check_signature(signatures[layout.SERVING_KEY], path)
    if layout.ORIENTATION_KEY in signatures:
      layout.check_orientation_signature(
        signatures[layout.ORIENTATION_KEY], path, size
      )
    return cls(loaded, layout.read_metadata(path, size), path)

  def curvature(self, t):
    """The curvature of -log p_t in image units F (float).

    In network units x it is 1 for a kind of unit curvature (learned
    N(mu, I)), else 1/sigma_t^2; with x = scale * F + offset the chain rule
    multiplies it by scale^2 (1 for every shipped prior).
    """
    if kinds.of(self.kind).unit_curvature:
      network = 1.0
    else:
      network = score_lib.diffused_curvature(self.sde, t)
    return self.scale**2 * network

  def _orientation_logits(self, x):
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return self._orientation(x=x)["logits"]

  def network_score(self, x, t):
    """The raw network score in network units: x float32 [B, L, L], t [B]."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return self._serve(x=x, t=protocol.broadcast_time(t, x))["score"]

  def __call__(self, x, t):
    """Score in image units: scale * s_theta(scale * F + offset, t).

    Args:
      x: float32 [B, L, L] images F.
      t: float32 [B] or scalar diffusion times.

    Returns:
      float32 [B, L, L]. Usable inside a `tf.function`.
    """
    with tf.name_scope("saved_model_prior"):
      x = tf.convert_to_tensor(x, dtype=tf.float32)
      return self.scale * self.network_score(self.scale * x + self.offset, t)
