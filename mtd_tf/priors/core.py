"""Score priors for the M-step of Algorithm 1: one protocol, exported or exact.

Every prior implements `Prior`: it is a callable ``prior(F, t) -> score``
on float32 images F [B, L, L] in image units (``t`` float32 [B] or a
scalar), usable inside a `tf.function`, and it carries what the M-step
needs to know about it (``image_size``, ``t_prior``, ``kind``,
``metadata``, ``curvature(t)`` and ``gaussian_mean``; docs/conventions.md).
A new kind of prior is a new class here; nothing else changes.

* `GaussianPrior(mu)`: the exact score -(F - mu) of N(mu, I) (section IV.A)
  or, with ``diffused=True``, of its VP-SDE marginal.
* `ScorePrior(score_fn, image_size)`: any score function, e.g. a Keras
  network in image units.
* `SavedModelPrior`: an exported network, from `load_prior`.

Shipped priors live in TF Serving layout, ``saved_models/<name>/<version>/``
(`shipped_root`), and load by name: ``load_prior("mnist_unet")`` (newest
version) or ``load_prior("mnist_unet/1")``; `available` lists them. A path
works too. `export_prior(model, model_dir, metadata)` writes the next free
version ``model_dir/<n>/`` atomically: the SavedModel with signatures
``serving_default`` (inputs ``x`` [None, L, L] and ``t`` [None], output
``{"score": [None, L, L]}``) and ``serve_dict`` (one dict argument, loadable
as ``keras.layers.TFSMLayer``), the asset ``assets/prior.json``, TF Serving
warm-up requests and the Keras model ``assets.extra/score_network.keras``
(for fine-tuning). A version once written is never replaced unless asked.
A prior may also carry an orientation classifier (`orientation`): the
signature ``orientation`` (input ``x`` [None, L, L], output ``{"logits":
[None, 4]}``) and ``assets.extra/orientation_classifier.keras``; the gauge
uses it to choose the upright quarter turn (`gauge.orientation_scores`).

A SavedModel runs code: load only priors you trust. `load_prior` checks the
signature, prior.json and one probe call before returning.

Data scaling: the network sees x = scale * F + offset (prior.json ``scale`` and
``offset``), so the score in image units is scale * s_theta(x, t).
"""

import importlib.resources
import json
import math
import numbers
import os
import pathlib
import re
import typing

import numpy as np
import tensorflow as tf

from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.priors import sde as sde_lib
from mtd_tf.priors import serving_requests as _serving

SERVING_KEY = _serving.SERVING_KEY
DICT_KEY = _serving.DICT_KEY
PRIOR_JSON = _serving.PRIOR_JSON

__all__ = [
  "Prior",
  "PriorError",
  "GaussianPrior",
  "ScorePrior",
  "SavedModelPrior",
  "as_prior",
  "check_image_size",
  "probe",
  "shipped_root",
  "available",
  "load_prior",
  "export_prior",
  "KERAS_FILE",
  "ORIENTATION_KEY",
  "ORIENTATION_FILE",
]

# Deprecated alias of table1.T_PRIOR (trainers still read it).
# The Keras model beside the SavedModel, for fine-tuning.
KERAS_FILE = os.path.join("assets.extra", "score_network.keras")
# The optional orientation classifier: signature and Keras file.
ORIENTATION_KEY = "orientation"
ORIENTATION_FILE = os.path.join("assets.extra", "orientation_classifier.keras")
# Images in one probe call of `load_prior`.
_PROBE_BATCH = 2
_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[0-9]+)?$")


class PriorError(ValueError):
  """A prior folder or prior object that cannot be used, with what to do."""


@typing.runtime_checkable
class Prior(typing.Protocol):
  """What the M-step needs from a prior (eq. 17-18).

  Attributes:
    image_size: L.
    t_prior: the diffusion time at which the M-step evaluates the score by
      default (table1.T_PRIOR unless an export says otherwise).
    kind: the data family ("gaussian", "mnist", ...), which picks Table I's
      gamma through `table1.gamma_for`.
    metadata: a dict (prior.json for exports).
    gaussian_mean: mu, numpy [L, L], when the score is exactly -(F - mu)
      (the M-step then has a closed form); otherwise None.
    convention: the gauge of the prior's data set (`gauge.fix_gauge`), a
      dict with "centre_of_mass" ([row, col]) and "orientation"
      ("upright": the orientation the prior finds most plausible), or None
      when the data set fixes neither (prior.json "convention").
  """

  image_size: int
  t_prior: float
  kind: str
  metadata: dict
  gaussian_mean: typing.Optional[np.ndarray]
  convention: typing.Optional[dict]

  def __call__(self, x, t):
    """The score s(x, t) float32 [B, L, L] at x float32 [B, L, L], t [B] or []."""

  def curvature(self, t: float) -> float:
    """c, the curvature of -log p_t used by the preconditioned M-step."""


def _broadcast_time(t, x):
  """Returns t as float32 [B] for x [B, L, L]; a scalar t is broadcast."""
  t = tf.convert_to_tensor(t, dtype=tf.float32)
  batch = tf.shape(x)[0]
  if t.shape.rank == 0:
    return tf.fill([batch], t)
  return tf.reshape(t, [batch])


# Version 1 of mnist_unet predates prior.json's "convention": MNIST digits
# are upright with their centre of mass at pixel (14, 14) (docs/conventions.md).
_KIND_CONVENTIONS = {
  "mnist": {"centre_of_mass": [14.0, 14.0], "orientation": "upright"},
}


def convention_of(metadata):
  """The gauge convention of a prior's metadata: its "convention", or None.

  Priors exported before prior.json recorded a convention fall back to the
  known convention of their kind (MNIST: centre of mass (14, 14), upright).
  """
  metadata = metadata or {}
  convention = metadata.get("convention")
  if convention is None:
    convention = _KIND_CONVENTIONS.get(str(metadata.get("kind")))
  return dict(convention) if convention is not None else None


def _diffused_curvature(sde, t):
  """1 / sigma_t^2: the largest curvature of a density diffused to time t.

  p_t is p_0 convolved with N(0, sigma_t^2 I) (after scaling by alpha), so
  -log p_t is never more curved than -log N(0, sigma_t^2 I).
  """
  return float(1.0 / sde.variance(tf.constant(float(t), tf.float64)))


class GaussianPrior:
  """The exact score of N(mu, I) in image units (section IV.A oracle).

  ``prior(F, t)`` returns -(F - mu), or with ``diffused=True`` the exact
  score of the VP-SDE marginal at time t, -(F - alpha(t) mu) (the diffused
  N(mu, I) is N(alpha(t) mu, I) because alpha^2 + sigma_t^2 = 1). Either way
  -log p_t has unit curvature.

  Args:
    mu: float [L, L] mean image.
    t_prior: diffusion time used by the M-step.
    diffused: whether to use the time-dependent exact marginal score.
    sde: the VP-SDE (only used when diffused).
  """

  kind = "gaussian"
  # N(mu, I) fixes position and orientation through mu already.
  convention = None

  def __init__(
    self,
    mu,
    t_prior: float = table1.T_PRIOR,
    diffused: bool = False,
    sde: sde_lib.VPSDE = sde_lib.VPSDE(),
  ):
    self.mu = tf.constant(np.asarray(mu, np.float32))  # [L, L]
    if self.mu.shape.rank != 2 or self.mu.shape[0] != self.mu.shape[1]:
      raise PriorError(
        f"GaussianPrior needs a square mean image [L, L], got "
        f"shape {self.mu.shape}."
      )
    self.image_size = int(self.mu.shape[0])
    self.t_prior = float(t_prior)
    self.diffused = bool(diffused)
    self.sde = sde
    self.metadata = {
      "kind": self.kind,
      "image_size": self.image_size,
      "mu": np.asarray(mu, np.float64).reshape(-1).tolist(),
      "architecture": "exact",
      "t_prior": self.t_prior,
      "scale": 1.0,
      "offset": 0.0,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    }

  @property
  def gaussian_mean(self):
    """mu (float32 values, as the score uses) unless diffused."""
    return None if self.diffused else self.mu.numpy()

  def curvature(self, t):
    del t  # N(alpha mu, I) at every t.
    return 1.0

  def __call__(self, x, t):
    """Score float32 [B, L, L] at x float32 [B, L, L], t [B] or scalar."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    t = _broadcast_time(t, x)
    if self.diffused:
      alpha = self.sde.alpha(t)[:, None, None]
      return -(x - alpha * self.mu)
    return -(x - self.mu)


class ScorePrior:
  """Any score function s(F [B, L, L] float32, t [B] float32) in image units.

  Treated as a learned diffusion score: curvature 1 / sigma_t^2 of ``sde``
  and no closed-form M-step.

  Args:
    score_fn: the callable; it must work inside a `tf.function`.
    image_size: L.
    kind: the data family (picks Table I's gamma).
    t_prior: diffusion time used by the M-step.
    sde: the VP-SDE the score was trained with.
  """

  gaussian_mean = None

  def __init__(
    self,
    score_fn,
    image_size,
    *,
    kind="learned",
    t_prior=table1.T_PRIOR,
    sde=sde_lib.VPSDE(),
  ):
    if not callable(score_fn):
      raise PriorError(
        f"A score prior must be callable, got {type(score_fn).__name__}."
      )
    self.score_fn = score_fn
    self.image_size = int(image_size)
    self.kind = str(kind)
    self.t_prior = float(t_prior)
    self.sde = sde
    self.metadata = {
      "kind": self.kind,
      "image_size": self.image_size,
      "t_prior": self.t_prior,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    }
    self.convention = convention_of(self.metadata)

  def curvature(self, t):
    return _diffused_curvature(self.sde, t)

  def __call__(self, x, t):
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return tf.cast(self.score_fn(x, _broadcast_time(t, x)), tf.float32)


class SavedModelPrior:
  """A score network loaded from an exported SavedModel (see `load_prior`).

  Attributes:
    path: the SavedModel folder.
    image_size: L.
    metadata: the dict read from assets/prior.json.
    kind: metadata["kind"] ("unknown" when absent).
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
    self._serve = loaded.signatures[SERVING_KEY]
    self._orientation = loaded.signatures.get(ORIENTATION_KEY)
    self.orientation_classifier = (
      self._orientation_logits if self._orientation is not None else None
    )
    self.path = path
    self.metadata = metadata
    self.image_size = int(metadata["image_size"])
    self.kind = str(metadata.get("kind", "unknown"))
    self.convention = convention_of(metadata)
    self.t_prior = float(metadata.get("t_prior", table1.T_PRIOR))
    self.scale = float(metadata.get("scale", 1.0))
    self.offset = float(metadata.get("offset", 0.0))
    self.sde = sde_lib.VPSDE(
      float(metadata.get("beta_min", table1.BETA_MIN)),
      float(metadata.get("beta_max", table1.BETA_MAX)),
    )

  def curvature(self, t):
    """1 for a learned N(mu, I) (unit curvature at every t), else 1/sigma_t^2."""
    if self.kind == "gaussian":
      return 1.0
    return _diffused_curvature(self.sde, t)

  def _orientation_logits(self, x):
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return self._orientation(x=x)["logits"]

  def network_score(self, x, t):
    """The raw network score in network units: x float32 [B, L, L], t [B]."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return self._serve(x=x, t=_broadcast_time(t, x))["score"]

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


def as_prior(prior, image_size=None):
  """`prior` as a `Prior`: priors pass through, bare callables are wrapped.

  Args:
    prior: a `Prior`, or a callable score(x, t) (wrapped in `ScorePrior`).
    image_size: L, needed to wrap a bare callable and checked against a
      prior's image_size.

  Returns:
    A `Prior`.

  Raises:
    PriorError: not callable, or made for another image size.
  """
  if not isinstance(prior, Prior):
    if not callable(prior) or image_size is None:
      raise PriorError(
        f"Got a {type(prior).__name__} as prior: pass a loaded prior "
        "(load_prior), GaussianPrior(mu) or ScorePrior(score_fn, L)."
      )
    prior = ScorePrior(prior, image_size)
  if image_size is not None:
    check_image_size(prior, image_size)
  return prior


def check_image_size(prior, image_size):
  """Raises `PriorError` unless prior.image_size equals L = image_size."""
  if int(prior.image_size) != int(image_size):
    raise PriorError(
      f"The prior is for {prior.image_size}x{prior.image_size} images but "
      f"the image size L is {image_size}: use a prior trained for L = "
      f"{image_size} or run without a prior."
    )


def shipped_root() -> pathlib.Path:
  """The folder of shipped priors, ``saved_models/<name>/<version>/``.

  Inside an installed wheel: ``mtd_tf/saved_models``; in a source checkout:
  ``saved_models`` beside the ``mtd_tf`` package folder.
  """
  packaged = importlib.resources.files("mtd_tf") / "saved_models"
  if isinstance(packaged, pathlib.Path) and packaged.is_dir():
    return packaged
  return pathlib.Path(__file__).resolve().parents[2] / "saved_models"


def _versions(model_dir):
  """Numeric version folders of a model folder, ascending."""
  try:
    names = os.listdir(model_dir)
  except OSError:
    return []
  return sorted(
    int(d)
    for d in names
    if d.isdigit() and os.path.isdir(os.path.join(model_dir, d))
  )


def available() -> typing.List[str]:
  """The shipped priors as "name/version", sorted."""
  root = shipped_root()
  if not root.is_dir():
    return []
  return [
    f"{name}/{version}"
    for name in sorted(os.listdir(root))
    for version in _versions(root / name)
    if (root / name / str(version) / "saved_model.pb").is_file()
  ]


def _resolve_version(path):
  """A model folder with numeric version subfolders resolves to the newest."""
  if os.path.isfile(os.path.join(path, "saved_model.pb")):
    return path
  versions = _versions(path)
  return os.path.join(path, str(versions[-1])) if versions else path


def _locate(name_or_path):
  """The folder of an existing path, or of a shipped prior's name."""
  text = os.fspath(name_or_path)
  if os.path.exists(text):
    return text
  if _NAME.match(text):
    candidate = shipped_root() / text
    if candidate.is_dir():
      return str(candidate)
  listed = ", ".join(available()) or "none"
  raise PriorError(
    f"Prior {text!r} does not exist as a folder and is not a shipped prior "
    f"(available: {listed}): pass a folder written by export_prior or one "
    "of those names."
  )


def _field_error(json_path, name, value, wanted):
  return PriorError(
    f"{json_path}: field {name!r} must be {wanted}, got "
    f"{value!r}: fix the file or re-export the prior."
  )


def _check_metadata(metadata, json_path, signature_size):
  """Type checks of prior.json; PriorError naming the file and field."""
  if not isinstance(metadata, dict):
    raise PriorError(
      f"{json_path}: must hold a JSON object, got "
      f"{type(metadata).__name__}: re-export the prior."
    )
  size = metadata.get("image_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise _field_error(json_path, "image_size", size, "a positive integer")
  if signature_size is not None and size != signature_size:
    raise PriorError(
      f"{json_path}: image_size {size} does not match the "
      f"signature's x [None, {signature_size}, "
      f"{signature_size}]: re-export the prior."
    )
  if "kind" in metadata and not isinstance(metadata["kind"], str):
    raise _field_error(json_path, "kind", metadata["kind"], "a string")
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
      raise _field_error(json_path, name, value, wanted)
  if "mu" in metadata:
    mu = metadata["mu"]
    if (
      not isinstance(mu, list)
      or len(mu) != size * size
      or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in mu
      )
    ):
      raise _field_error(
        json_path, "mu", "...", f"a list of {size * size} numbers (L x L)"
      )


def _check_orientation_signature(fn, path, size):
  """x [None, L, L] float32 -> logits [None, 4] float32."""
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
    raise PriorError(
      f"{path!r}: {ORIENTATION_KEY} must take x float32 [None, {size}, "
      f"{size}] and return logits float32 [None, 4]. Re-export with "
      "export_prior."
    )


def _check_signature(fn, path):
  """x [None, L, L] float32, t [None] float32 -> score float32; returns L."""
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
    raise PriorError(
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
      raise PriorError(
        f"{path!r}: {SERVING_KEY}'s {name} is {spec.dtype.name} "
        f"{spec.shape}, expected float32 {shape}. Re-export with "
        "export_prior."
      )
  if x.shape[1] != x.shape[2]:
    raise PriorError(
      f"{path!r}: {SERVING_KEY}'s x is {x.shape}, not square "
      "images [None, L, L]. Re-export with export_prior."
    )
  return size


def _error_line(err):
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


def probe(prior, where="the prior"):
  """Calls `prior` once on a small batch; PriorError unless its score is sane.

  The score must have the input's shape [2, L, L], be float32 and finite.

  Args:
    prior: a `Prior`.
    where: how to name the prior in messages (e.g. its path).

  Returns:
    prior.
  """
  size = int(prior.image_size)
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, (_PROBE_BATCH, size, size)).astype(np.float32)
  t = np.full([_PROBE_BATCH], prior.t_prior, np.float32)
  try:
    score = prior(tf.constant(x), tf.constant(t))
  except (tf.errors.OpError, ValueError, TypeError) as e:
    first = _error_line(e)
    raise PriorError(
      f"{where} fails on a probe batch [{_PROBE_BATCH}, {size}, "
      f"{size}] ({first[:200]}): re-export it."
    ) from e
  if not isinstance(score, tf.Tensor) or score.dtype != tf.float32:
    raise PriorError(
      f"{where} returns {getattr(score, 'dtype', type(score))}"
      " scores, not float32: re-export it."
    )
  if tuple(score.shape) != x.shape:
    raise PriorError(
      f"{where} returns scores of shape {tuple(score.shape)} "
      f"for images of shape {x.shape}: re-export it so that "
      "the score has the input's shape."
    )
  if not np.all(np.isfinite(score.numpy())):
    raise PriorError(
      f"{where} returns NaN or Inf scores on a probe batch of "
      "images in [0, 1]: check or retrain the prior."
    )
  return prior


def load_prior(name_or_path, image_size=None) -> SavedModelPrior:
  """Loads an exported prior by path or by shipped name.

  Args:
    name_or_path: a version folder (``saved_models/mnist_unet/1``), a model
      folder holding numeric versions (the newest is taken), or the name of
      a shipped prior, ``"mnist_unet"`` (newest version) or
      ``"mnist_unet/1"`` (see `available`).
    image_size: optional L the caller needs; a prior of another size raises
      `PriorError` (see `check_image_size`).

  Returns:
    A `SavedModelPrior`.

  Raises:
    PriorError: unknown name or missing folder, not a SavedModel, corrupt
      saved_model.pb, no serving_default taking x [None, L, L] and t [None]
      float32 and returning score float32, a missing or ill-typed
      assets/prior.json, or a probe call that gives a wrong shape or
      non-finite scores.
  """
  path = _resolve_version(_locate(name_or_path))
  if not os.path.isfile(os.path.join(path, "saved_model.pb")):
    raise PriorError(
      f"{path!r} is not a SavedModel (no saved_model.pb): "
      "pass a folder written by export_prior."
    )
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # pylint: disable=broad-except
    first = _error_line(e)
    raise PriorError(
      f"Could not load the SavedModel at {path!r} (corrupt or "
      f"truncated? {first[:200]}): re-export or re-download "
      "the prior."
    ) from e
  signatures = getattr(loaded, "signatures", {})
  if SERVING_KEY not in signatures:
    raise PriorError(
      f"{path!r} has no {SERVING_KEY!r} signature: re-export it "
      "with mtd_tf.priors.export_prior."
    )
  size = _check_signature(signatures[SERVING_KEY], path)
  if ORIENTATION_KEY in signatures:
    _check_orientation_signature(signatures[ORIENTATION_KEY], path, size)
  json_path = os.path.join(path, "assets", PRIOR_JSON)
  if not os.path.isfile(json_path):
    raise PriorError(
      f"{path!r} has no assets/{PRIOR_JSON}: re-export it with "
      "mtd_tf.priors.export_prior."
    )
  try:
    with open(json_path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise PriorError(
      f"{json_path!r} is not valid JSON ({e}): re-export the prior."
    ) from e
  _check_metadata(metadata, json_path, size)
  prior = SavedModelPrior(loaded, metadata, path)
  if image_size is not None:
    check_image_size(prior, image_size)
  return probe(prior, where=f"The prior at {path!r}")


def _export_archive(model, image_size, orientation_model=None):
  """The serving SavedModel of a score network, by Keras's `ExportArchive`.

  Endpoints: ``serving_default`` (keyword inputs ``x`` [None, L, L] and ``t``
  [None], output ``{"score": ...}``) and ``serve_dict`` (one dict argument,
  loadable as ``keras.layers.TFSMLayer``). The archive tracks the model's
  variables, so the session-based loader behind saved_model_cli and TF
  Serving finds them; the endpoints themselves are not jit-compiled.
  """
  import keras  # pylint: disable=g-import-not-at-top

  spec_x = tf.TensorSpec([None, image_size, image_size], tf.float32, name="x")
  spec_t = tf.TensorSpec([None], tf.float32, name="t")
  archive = keras.export.ExportArchive()
  archive.track(model)

  def serve(x, t):
    return {"score": tf.identity(model([x, t], training=False), name="score")}

  archive.add_endpoint(SERVING_KEY, serve, input_signature=[spec_x, spec_t])
  archive.add_endpoint(
    DICT_KEY,
    lambda inputs: serve(inputs["x"], inputs["t"]),
    input_signature=[{"x": spec_x, "t": spec_t}],
  )
  if orientation_model is not None:
    # The endpoint tracks the classifier's variables (an explicit track()
    # would save them twice).
    archive.add_endpoint(
      ORIENTATION_KEY,
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
    model: a Keras model (x [B, L, L], t [B]) -> score [B, L, L].
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
  existing = _versions(model_dir)
  if version is None:
    version = existing[-1] + 1 if existing else 1
  if (
    isinstance(version, bool) or not str(version).isdigit() or int(version) < 1
  ):
    raise PriorError(f"version must be a positive integer, got {version!r}.")
  export_dir = os.path.join(model_dir, str(int(version)))
  if os.path.exists(export_dir) and not overwrite:
    raise PriorError(
      f"{export_dir} exists: versions never change; export "
      "with version=None for the next free one, or pass "
      "overwrite=True."
    )
  _check_metadata(dict(metadata), "metadata", None)
  image_size = int(metadata["image_size"])
  with atomic.atomic_directory(export_dir, overwrite=overwrite) as tmp:
    _export_archive(model, image_size, orientation_model).write_out(
      tmp, verbose=False
    )
    # prior.json sits in assets/ beside the archive (loaders read the file).
    os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
    with open(os.path.join(tmp, "assets", PRIOR_JSON), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    # TF Serving warm-up requests travel with every export.
    _serving.write_warmup_requests(tmp, model_name=os.path.basename(model_dir))
    model.save(os.path.join(tmp, KERAS_FILE))
    if orientation_model is not None:
      orientation_model.save(os.path.join(tmp, ORIENTATION_FILE))
  return export_dir
