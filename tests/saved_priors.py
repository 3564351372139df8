"""Tiny SavedModel priors for tests: a score function exported as a folder."""

import json

import tensorflow as tf


def save_signature(path, fn, size=5, metadata=None):
  """A SavedModel whose serving_default is fn(x, t) -> {'score': ...}.

  Args:
    path: a `pathlib.Path`, the version folder to write.
    fn: (x float32 [B, L, L], t float32 [B]) -> {"score": ...}.
    size: L.
    metadata: prior.json (default: a gaussian kind of image size L).

  Returns:
    path.
  """
  module = tf.Module()
  module.f = tf.function(
    fn,
    input_signature=[
      tf.TensorSpec([None, size, size], tf.float32, name="x"),
      tf.TensorSpec([None], tf.float32, name="t"),
    ],
  )
  tf.saved_model.save(
    module, str(path), signatures={"serving_default": module.f}
  )
  (path / "assets").mkdir(exist_ok=True)
  (path / "assets" / "prior.json").write_text(
    json.dumps(metadata or {"image_size": size, "kind": "gaussian"})
  )
  return path
