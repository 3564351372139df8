"""The folder of an exported prior: its file names and the checks of them.

A prior lives in TF Serving's layout, ``<model>/<version>/`` (numeric
versions), as written by `export.export_prior`:

* ``saved_model.pb`` and ``variables/``: the SavedModel, with the signature
  ``serving_default`` (x float32 [None, L, L], t float32 [None] -> {"score":
  float32 [None, L, L]}: the score s_theta(x, t) of eq. 6-8 in network
  units), ``serve_dict`` (the same, one dict argument) and optionally
  ``orientation`` (x -> {"logits": float32 [None, 4]});
* ``assets/prior.json``: the metadata (`read_metadata`, `check_metadata`);
  "prior_class" names the class `loading.load_prior` builds (default
  SavedModelPrior);
* ``assets.extra/``: the Keras score network (`KERAS_FILE`), the optional
  orientation classifier (`ORIENTATION_FILE`) and TF Serving's warm-up
  requests (`serving_requests`).

Every check raises `PriorError` in one line naming the file or signature
and what to do.
"""

import json
import math
import numbers
import os
import typing

import tensorflow as tf

from mtd_tf.priors import protocol
from mtd_tf.priors import serving_requests

__all__ = [
  "SERVING_KEY",
  "DICT_KEY",
  "PRIOR_JSON",
  "KERAS_FILE",
  "ORIENTATION_KEY",
  "ORIENTATION_FILE",
  "DEFAULT_PRIOR_CLASS",
  "versions",
  "json_path",
  "read_metadata",
  "check_metadata",
  "check_signature",
  "check_orientation_signature",
  "error_line",
]

SERVING_KEY = serving_requests.SERVING_KEY
DICT_KEY = serving_requests.DICT_KEY
PRIOR_JSON = serving_requests.PRIOR_JSON
# The Keras model beside the SavedModel, for fine-tuning.
KERAS_FILE = os.path.join("assets.extra", "score_network.keras")
# The optional orientation classifier: signature and Keras file.
ORIENTATION_KEY = "orientation"
ORIENTATION_FILE = os.path.join("assets.extra", "orientation_classifier.keras")
# The class a prior.json without "prior_class" is loaded as.
DEFAULT_PRIOR_CLASS = "SavedModelPrior"


def versions(model_dir) -> typing.List[int]:
  """Numeric version folders of a model folder, ascending ([] if none)."""
  try:
    names = os.listdir(model_dir)
  except OSError:
    return []
  return sorted(
    int(d)
    for d in names
    if d.isdigit() and os.path.isdir(os.path.join(model_dir, d))
  )


def json_path(path) -> str:
  """``<path>/assets/prior.json``."""
  return os.path.join(os.fspath(path), "assets", PRIOR_JSON)


def read_metadata(path, signature_size=None) -> dict:
  """Reads and checks ``<path>/assets/prior.json``.

  Args:
    path: a version folder.
    signature_size: L of the serving signature, checked against
      "image_size" (None: not checked).

  Returns:
    The metadata dict.

  Raises:
    PriorError: the file is missing, not JSON or ill-typed.
  """
  json_file = json_path(path)
  if not os.path.isfile(json_file):
    raise protocol.PriorError(
      f"{os.fspath(path)!r} has no assets/{PRIOR_JSON}: re-export it with "
      "mtd_tf.priors.export_prior."
    )
  try:
    with open(json_file) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise protocol.PriorError(
      f"{json_file!r} is not valid JSON ({e}): re-export the prior."
    ) from e
  check_metadata(metadata, json_file, signature_size)
  return metadata


def field_error(where, name, value, wanted) -> protocol.PriorError:
  """The `PriorError` of an ill-typed prior.json field."""
  return protocol.PriorError(
    f"{where}: field {name!r} must be {wanted}, got "
    f"{value!r}: fix the file or re-export the prior."
  )


def check_metadata(metadata, where, signature_size):
  """Type checks of prior.json; PriorError naming the file and field.

  Args:
    metadata: the parsed prior.json.
    where: how to name it in messages (its path).
    signature_size: L of the serving signature, or None.
  """
  if not isinstance(metadata, dict):
    raise protocol.PriorError(
      f"{where}: must hold a JSON object, got "
      f"{type(metadata).__name__}: re-export the prior."
    )
  size = metadata.get("image_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise field_error(where, "image_size", size, "a positive integer")
  if signature_size is not None and size != signature_size:
    raise protocol.PriorError(
      f"{where}: image_size {size} does not match the "
      f"signature's x [None, {signature_size}, "
      f"{signature_size}]: re-export the prior."
    )
  for name in ("kind", "prior_class"):
    if name in metadata and not isinstance(metadata[name], str):
      raise field_error(where, name, metadata[name], "a string")
  if "diffused" in metadata and not isinstance(metadata["diffused"], bool):
    raise field_error(where, "diffused", metadata["diffused"], "true or false")
  for name, positive in (
    ("t_prior", True),
    ("beta_min", True),
    ("beta_max", True),
    ("scale", False),
    ("offset", False),
  ):
    if name not in metadata:
      continue
    value = metadata[name]
    if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not math.isfinite(value)
      or (positive and value <= 0)
      or (name == "scale" and value == 0)
    ):
      wanted = (
        "a positive finite number"
        if positive
        else "a non-zero finite number"
        if name == "scale"
        else "a finite number"
      )
      raise field_error(where, name, value, wanted)
  if "mu" in metadata:
    mu = metadata["mu"]
    if (
      not isinstance(mu, list)
      or len(mu) != size * size
      or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in mu
      )
    ):
      raise field_error(
        where, "mu", "...", f"a list of {size * size} numbers (L x L)"
      )


def check_orientation_signature(fn, path, size):
  """Checks x [None, L, L] float32 -> logits [None, 4] float32."""
  args, kwargs = fn.structured_input_signature
  outputs = fn.structured_outputs
  x = kwargs.get("x")
  logits = outputs.get("logits") if isinstance(outputs, dict) else None
  if (
    args
    or sorted(kwargs) != ["x"]
    or logits is None
    or x.dtype != tf.float32
    or logits.dtype != tf.float32
    or not x.shape.is_compatible_with([None, size, size])
    or not logits.shape.is_compatible_with([None, 4])
  ):
    raise protocol.PriorError(
      f"{path!r}: {ORIENTATION_KEY} must take x float32 [None, {size}, "
      f"{size}] and return logits float32 [None, 4]. Re-export with "
      "export_prior."
    )


def check_signature(fn, path) -> int:
  """Checks x [None, L, L] float32, t [None] float32 -> score float32.

  Args:
    fn: the ``serving_default`` concrete function.
    path: the folder, for messages.

  Returns:
    L (int).
  """
  args, kwargs = fn.structured_input_signature
  outputs = fn.structured_outputs
  x, t = kwargs.get("x"), kwargs.get("t")
  score = outputs.get("score") if isinstance(outputs, dict) else None
  if (
    args
    or sorted(kwargs) != ["t", "x"]
    or score is None
    or x.shape.rank != 3
    or t.shape.rank != 1
  ):
    raise protocol.PriorError(
      f"{path!r}: {SERVING_KEY} must take x [None, L, L] and t [None] and "
      f"return score; it takes {sorted(kwargs)} and returns "
      f"{sorted(outputs) if isinstance(outputs, dict) else outputs}. "
      "Re-export with export_prior."
    )
  size = x.shape[1]
  for name, spec, shape in (
    ("x", x, [None, size, size]),
    ("t", t, [None]),
    ("score", score, [None, size, size]),
  ):
    if spec.dtype != tf.float32 or not spec.shape.is_compatible_with(shape):
      raise protocol.PriorError(
        f"{path!r}: {SERVING_KEY}'s {name} is {spec.dtype.name} "
        f"{spec.shape}, expected float32 {shape}. Re-export with "
        "export_prior."
      )
  if x.shape[1] != x.shape[2]:
    raise protocol.PriorError(
      f"{path!r}: {SERVING_KEY}'s x is {x.shape}, not square "
      "images [None, L, L]. Re-export with export_prior."
    )
  return size


def error_line(err) -> str:
  """The line of an error that says what went wrong.

  Errors raised inside a `tf.function` start with "in user code:" and a
  stack; the message itself is their last line.
  """
  lines = [
    line.strip() for line in str(err).strip().splitlines() if line.strip()
  ]
  if not lines:
    return type(err).__name__
  return lines[-1] if lines[0].startswith("in user code") else lines[0]
