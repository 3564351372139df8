"""The folder of an exported prior: its file names and the checks of them.

A prior lives in TF Serving's layout, ``<model>/<version>/`` (numeric
versions), as written by `export.export_prior`:

* ``saved_model.pb`` and ``variables/``: the SavedModel, with the signature
  ``serving_default`` (x float32 [None, L, L], t float32 [None] -> {"score":
  float32 [None, L, L]}: the score s_theta(x, t) of eq. 6-8 in network
  units), ``serve_dict`` (the same, one dict argument) and optionally
  ``orientation`` (x -> {"logits": float32 [None, 4]});
* ``assets/prior.json``: the metadata, checked whole against one
  declarative schema before any work (`SCHEMA`: each field's type,
  whether required, range or allowed values; then cross-field rules:
  beta_min < beta_max given together, mu of L x L finite values, the
  convention's centre of mass inside the frame; `check_metadata`,
  `read_metadata`); "prior_class" names the class `loading.load_prior`
  builds (default SavedModelPrior);
* ``assets.extra/``: the Keras score network (`KERAS_FILE`), the optional
  orientation classifier (`ORIENTATION_FILE`) and TF Serving's warm-up
  requests (`serving_requests`).

Every check raises `PriorError` in one line naming the file or signature,
the field, the value and what is expected.
"""

import dataclasses
import difflib
import json
import math
import numbers
import os
import types
import typing

import tensorflow as tf

from mtd_tf.base import table1
from mtd_tf.priors import kinds
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
  "Field",
  "SCHEMA",
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
  """The `PriorError` of a prior.json field: file, field, value, expected."""
  shown = repr(value)
  if len(shown) > 80:  # mu has L^2 entries: one line, not a screenful.
    shown = shown[:60] + "..." + shown[-12:]
  return protocol.PriorError(
    f"{where}: field {name!r} must be {wanted}, got "
    f"{shown}: fix the file or re-export the prior."
  )


@dataclasses.dataclass(frozen=True)
class Field:
  """One prior.json field of `SCHEMA`.

  Attributes:
    type: its JSON type, a key of `_TYPES` ("integer", "number",
      "string", "boolean", "object", "object_or_null", "numbers": a list
      of finite numbers, "integers", "number_or_null": any number or null,
      for records).
    required: whether every prior.json must have it.
    low, high: the closed range of a number (None: unbounded).
    open_low: whether low itself is excluded.
    nonzero: whether 0 is excluded.
    choices: the allowed values, or None.
    meaning: what the field is, for the docs.
  """

  type: str
  required: bool = False
  low: typing.Optional[float] = None
  high: typing.Optional[float] = None
  open_low: bool = False
  nonzero: bool = False
  choices: typing.Optional[typing.Tuple] = None
  meaning: str = ""

  def expected(self) -> str:
    """What a value must be, as messages say it."""
    if self.choices is not None:
      return "one of " + ", ".join(map(repr, self.choices))
    wanted = _TYPES[self.type][1]
    if self.low is not None and self.high is not None:
      bracket = "(" if self.open_low else "["
      wanted += f" in {bracket}{self.low:g}, {self.high:g}]"
    elif self.low is not None:
      wanted += f" {'>' if self.open_low else '>='} {self.low:g}"
    elif self.high is not None:
      wanted += f" <= {self.high:g}"
    if self.nonzero:
      wanted = "a non-zero " + wanted[2:]
    return wanted

  def accepts(self, value) -> bool:
    """Whether value has the field's type, range and allowed values."""
    if not _TYPES[self.type][0](value):
      return False
    if self.choices is not None and value not in self.choices:
      return False
    if self.type in ("integer", "number"):
      if self.low is not None and (
        value < self.low or (self.open_low and value == self.low)
      ):
        return False
      if self.high is not None and value > self.high:
        return False
      if self.nonzero and value == 0:
        return False
    return True


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  return _is_number(value) and math.isfinite(value)


def _is_integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# JSON type -> (test, how messages name it).
_TYPES = {
  "integer": (_is_integer, "an integer"),
  "number": (_is_finite, "a finite number"),
  "number_or_null": (
    lambda v: v is None or _is_number(v),
    "a number or null",
  ),
  "string": (lambda v: isinstance(v, str), "a string"),
  "boolean": (lambda v: isinstance(v, bool), "true or false"),
  "object": (lambda v: isinstance(v, dict), "a JSON object"),
  "object_or_null": (
    lambda v: v is None or isinstance(v, dict),
    "a JSON object or null",
  ),
  "numbers": (
    lambda v: isinstance(v, list) and all(map(_is_finite, v)),
    "a list of finite numbers",
  ),
  "integers": (
    lambda v: isinstance(v, list) and all(map(_is_integer, v)),
    "a list of integers",
  ),
}

# The largest L a prior may declare (probes allocate [16, L, L] images).
MAX_IMAGE_SIZE = 1024
# The largest VP-SDE beta: B(1) = (beta_min + beta_max) / 2 of eq. (6)
# stays finite in float32 and alpha(1) = exp(-B(1) / 2) underflows to 0
# long before (Table I uses 0.1 and 20).
MAX_BETA = 1000.0

# Every field mtd_tf reads or writes in prior.json. Other keys are free-form
# records (they are kept, not read), unless their name is a near miss of a
# field here (`_near_misses`). The cross-field rules are `_RULES`.
SCHEMA = types.MappingProxyType(
  {
    # What mtd_tf reads.
    "image_size": Field(
      "integer", True, 1, MAX_IMAGE_SIZE, meaning="L of the L x L images"
    ),
    "kind": Field(
      "string",
      True,
      choices=tuple(sorted(kinds.KINDS)),
      meaning="the data family, priors.kinds.KINDS",
    ),
    "prior_class": Field("string", meaning="the class that loads it"),
    "diffused": Field("boolean", meaning="GaussianPrior: diffused score"),
    "t_prior": Field(
      "number", low=0.0, high=1.0, open_low=True, meaning="t of eq. 18"
    ),
    "beta_min": Field(
      "number", low=0.0, high=MAX_BETA, open_low=True, meaning="eq. 6"
    ),
    "beta_max": Field(
      "number", low=0.0, high=MAX_BETA, open_low=True, meaning="eq. 6"
    ),
    "scale": Field("number", nonzero=True, meaning="x = scale * F + offset"),
    "offset": Field("number", meaning="x = scale * F + offset"),
    "mu": Field("numbers", meaning="the mean image, L x L row-major"),
    "convention": Field("object_or_null", meaning="the gauge of the data set"),
    "network": Field("object", meaning="networks.build_network arguments"),
    "orientation_classifier": Field("object", meaning="how it was trained"),
    # What the exports record (read by people, checked for type).
    "architecture": Field("string"),
    "activation": Field("string"),
    "channels": Field("integers"),
    "loss": Field("string"),
    "training_data": Field("string"),
    "device": Field("string"),
    "mtd_tf_version": Field("string"),
    "exported_at": Field("string"),
    "exported_from": Field("string"),
    "run": Field("string"),
    "steps": Field("integer", low=0),
    "batch_size": Field("integer", low=1),
    "seed": Field("integer"),
    "data_seed": Field("integer"),
    "mu_seed": Field("integer"),
    "learning_rate": Field("number_or_null"),
    "ema_decay": Field("number_or_null"),
    "training_time_seconds": Field("number_or_null"),
    "final_train_loss": Field("number_or_null"),
    "final_heldout_loss": Field("number_or_null"),
    "heldout_metrics": Field("object"),
  }
)

# Fields whose misspelling would silently fall back to a default.
_READ_FIELDS = (
  "image_size",
  "kind",
  "prior_class",
  "diffused",
  "t_prior",
  "beta_min",
  "beta_max",
  "scale",
  "offset",
  "mu",
  "convention",
  "network",
)


def _near_misses(metadata, where):
  """Refuses an unknown key that looks like a misspelt field ("beta_mx")."""
  for key in metadata:
    if key in SCHEMA:
      continue
    close = difflib.get_close_matches(str(key), _READ_FIELDS, 1, 0.8)
    if close:
      raise protocol.PriorError(
        f"{where}: unknown field {key!r}: did you mean {close[0]!r}? Fix "
        "the file or re-export the prior."
      )


def _beta_pair(metadata, where, size):
  """beta_min and beta_max come together (else Table I's) and increase."""
  del size
  has_min, has_max = "beta_min" in metadata, "beta_max" in metadata
  if has_min != has_max:
    missing = "beta_max" if has_min else "beta_min"
    raise protocol.PriorError(
      f"{where}: field {missing!r} is missing but "
      f"{'beta_min' if has_min else 'beta_max'} is given: give both (the "
      "VP-SDE of eq. 6 the network was trained with) or neither (Table "
      f"I's {table1.BETA_MIN:g}, {table1.BETA_MAX:g})."
    )
  if has_min and metadata["beta_min"] >= metadata["beta_max"]:
    raise field_error(
      where,
      "beta_min",
      metadata["beta_min"],
      f"below beta_max = {metadata['beta_max']!r}",
    )


def _mu_length(metadata, where, size):
  """mu holds L x L values."""
  if "mu" in metadata and len(metadata["mu"]) != size * size:
    raise field_error(
      where,
      "mu",
      metadata["mu"],
      f"a list of {size * size} numbers (L x L = {size} x {size}; it has "
      f"{len(metadata['mu'])})",
    )


def _convention(metadata, where, size):
  """The gauge: centre of mass inside the frame, orientation "upright".

  A prior.json without "convention" takes its kind's
  (`kinds.convention_of`), which must fit the frame as well.
  """
  convention = metadata.get("convention")
  name = "convention"
  if convention is None:
    convention = kinds.of(metadata["kind"]).convention() or {}
    name = "kind"
  unknown = sorted(set(convention) - {"centre_of_mass", "orientation"})
  if unknown:
    raise field_error(
      where,
      "convention",
      metadata["convention"],
      'an object with "centre_of_mass" [row, col] and/or "orientation" '
      f'"upright" (unknown keys {unknown})',
    )
  centre = convention.get("centre_of_mass")
  frame = f"[row, col] of finite numbers in [0, {size - 1}] (the frame)"
  if centre is not None and (
    not isinstance(centre, list)
    or len(centre) != 2
    or not all(_is_finite(v) and 0 <= v <= size - 1 for v in centre)
  ):
    if name == "kind":
      raise protocol.PriorError(
        f"{where}: field 'kind' {metadata['kind']!r} puts the centre of "
        f"mass at {centre}, outside the {size} x {size} frame: give a "
        '"convention" that fits it, or the kind the data are.'
      )
    raise field_error(where, "convention.centre_of_mass", centre, frame)
  orientation = convention.get("orientation")
  if orientation not in (None, "upright"):
    raise field_error(
      where, "convention.orientation", orientation, "'upright' or null"
    )


def _network(metadata, where, size):
  """network = {"builder": str, "kwargs": object} (`networks`)."""
  del size
  network = metadata.get("network")
  if network is not None and not (
    isinstance(network.get("builder"), str)
    and isinstance(network.get("kwargs"), dict)
  ):
    raise field_error(
      where,
      "network",
      network,
      'an object {"builder": name, "kwargs": {...}}',
    )


# Cross-field rules, run in this order once every field has its type.
_RULES = (_beta_pair, _mu_length, _convention, _network)


def check_metadata(metadata, where, signature_size):
  """Checks prior.json against `SCHEMA` and the cross-field rules.

  Everything is checked before any work, each failure one `PriorError`
  line naming the file, the field, the value and what is expected: the
  fields' JSON types, ranges and allowed values (`SCHEMA`; the kind one of
  `kinds.KINDS`), beta_min < beta_max given together, mu of L x L finite
  values, a convention whose centre of mass lies inside the frame, and
  image_size equal to the signature's L.

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
  for name, field in SCHEMA.items():
    if name not in metadata:
      if field.required:
        raise protocol.PriorError(
          f"{where}: field {name!r} is missing: it must be "
          f"{field.expected()} ({field.meaning}); fix the file or re-export "
          "the prior."
        )
      continue
    if not field.accepts(metadata[name]):
      raise field_error(where, name, metadata[name], field.expected())
  _near_misses(metadata, where)
  size = metadata["image_size"]
  if signature_size is not None and size != signature_size:
    raise protocol.PriorError(
      f"{where}: image_size {size} does not match the "
      f"signature's x [None, {signature_size}, "
      f"{signature_size}]: re-export the prior."
    )
  for rule in _RULES:
    rule(metadata, where, size)


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
