"""Versioned export of a score network as a TF Serving prior folder.

`export_prior(model, model_dir, metadata)` writes the next free version
``model_dir/<n>/`` atomically in the layout of `layout`: the SavedModel of
the network s_theta(x, t) (the score of the VP-SDE marginal, eq. 6-8) with
signatures ``serving_default`` (inputs ``x`` [None, L, L] and ``t`` [None],
output ``{"score": [None, L, L]}``) and ``serve_dict`` (one dict argument,
loadable as ``keras.layers.TFSMLayer``), the asset ``assets/prior.json``,
TF Serving warm-up requests and the Keras model ``assets.extra/
score_network.keras`` (for fine-tuning). A prior may also carry an
orientation classifier (`orientation`): the signature ``orientation``
(input ``x`` [None, L, L], output ``{"logits": [None, 4]}``) and
``assets.extra/orientation_classifier.keras``. A version once written is
never replaced unless asked.
"""

import json
import os

import tensorflow as tf

from mtd_tf.base import atomic
from mtd_tf.priors import layout
from mtd_tf.priors import protocol
from mtd_tf.priors import serving_requests

__all__ = ["export_prior"]


def _export_archive(model, image_size, orientation_model=None):
  """The serving SavedModel of a score network, by Keras's `ExportArchive`.

  Endpoints: ``serving_default`` (keyword inputs ``x`` [None, L, L] and ``t``
  [None], output ``{"score": ...}``) and ``serve_dict`` (one dict argument,
  loadable as ``keras.layers.TFSMLayer``). The archive tracks the model's
  variables, so the session-based loader behind saved_model_cli and TF
  Serving finds them; the endpoints themselves are not jit-compiled.
  """
  # Keras loads only when a prior is exported (loading needs TF alone).
  import keras  # pylint: disable=g-import-not-at-top

  spec_x = tf.TensorSpec([None, image_size, image_size], tf.float32, name="x")
  spec_t = tf.TensorSpec([None], tf.float32, name="t")
  archive = keras.export.ExportArchive()
  archive.track(model)

  def serve(x, t):
    return {"score": tf.identity(model([x, t], training=False), name="score")}

  archive.add_endpoint(
    layout.SERVING_KEY, serve, input_signature=[spec_x, spec_t]
  )
  archive.add_endpoint(
    layout.DICT_KEY,
    lambda inputs: serve(inputs["x"], inputs["t"]),
    input_signature=[{"x": spec_x, "t": spec_t}],
  )
  if orientation_model is not None:
    # The endpoint tracks the classifier's variables (an explicit track()
    # would save them twice).
    archive.add_endpoint(
      layout.ORIENTATION_KEY,
      lambda x: {
        "logits": tf.identity(orientation_model(x, training=False), "logits")
      },
      input_signature=[spec_x],
    )
  return archive


def export_prior(
  model,
  model_dir,
  metadata,
  *,
  version=None,
  overwrite=False,
  orientation_model=None,
) -> str:
  """Exports a score network as version ``model_dir/<version>/``.

  The version folder is written under a temporary name and renamed into
  place when complete (`atomic.atomic_directory`), so an interrupted export
  leaves no partial version. It holds the SavedModel (signatures
  serving_default and serve_dict), ``assets/prior.json``, the TF Serving
  warm-up requests and the Keras model file ``assets.extra/
  score_network.keras``.

  Args:
    model: a Keras model (x float32 [B, L, L], t float32 [B]) -> score
      float32 [B, L, L].
    model_dir: the model folder, e.g. ``saved_models/mnist_unet``.
    metadata: JSON-serialisable dict; must hold ``image_size``; ``kind``,
      ``beta_min``, ``beta_max``, ``t_prior``, ``scale``, ``offset`` are
      read by `load_prior` (defaults: Table I's, scale 1, offset 0).
    version: a positive integer; None: the next free number (1 if none).
    overwrite: replace an existing version (else `PriorError`).
    orientation_model: optional Keras model x [B, L, L] -> logits [B, 4]
      (`orientation.classifier`), exported as the signature
      ``orientation`` and ``assets.extra/orientation_classifier.keras``.

  Returns:
    The version folder written (absolute path).

  Raises:
    PriorError: the version exists and overwrite is False, or the metadata
      are not usable.
  """
  model_dir = os.path.abspath(os.fspath(model_dir))
  existing = layout.versions(model_dir)
  if version is None:
    version = existing[-1] + 1 if existing else 1
  if (
    isinstance(version, bool) or not str(version).isdigit() or int(version) < 1
  ):
    raise protocol.PriorError(
      f"version must be a positive integer, got {version!r}."
    )
  export_dir = os.path.join(model_dir, str(int(version)))
  if os.path.exists(export_dir) and not overwrite:
    raise protocol.PriorError(
      f"{export_dir} exists: versions never change; export "
      "with version=None for the next free one, or pass "
      "overwrite=True."
    )
  layout.check_metadata(dict(metadata), "metadata", None)
  image_size = int(metadata["image_size"])
  with atomic.atomic_directory(export_dir, overwrite=overwrite) as tmp:
    _export_archive(model, image_size, orientation_model).write_out(
      tmp, verbose=False
    )
    # prior.json sits in assets/ beside the archive (loaders read the file).
    os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
    with open(os.path.join(tmp, "assets", layout.PRIOR_JSON), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    # TF Serving warm-up requests travel with every export.
    serving_requests.write_warmup_requests(
      tmp, model_name=os.path.basename(model_dir)
    )
    model.save(os.path.join(tmp, layout.KERAS_FILE))
    if orientation_model is not None:
      orientation_model.save(os.path.join(tmp, layout.ORIENTATION_FILE))
  return export_dir
