"""Loading priors by name or path: shipped priors, versions, prior classes.

Shipped priors live in TF Serving layout, ``saved_models/<name>/<version>/``
(`shipped_root`, `layout`), and load by name: ``load_prior("mnist_unet")``
(newest version) or ``load_prior("mnist_unet/1")``; `available` lists them.
A path works too.

prior.json's "prior_class" names the class that builds the prior from its
folder (default "SavedModelPrior"): a class registered here
(`register_prior_class`) with a classmethod ``from_folder(path) -> Prior``.
`GaussianPrior` (the exact score of N(mu, I), from prior.json's "mu") and
`SavedModelPrior` (an exported network) are registered. Whatever the
class, `load_prior` checks the result against the `Prior` contract and
probes it once (a score of the input's shape, float32 and finite) before
returning it: a SavedModel runs code, so load only priors you trust.
"""

import importlib.resources
import json
import os
import pathlib
import re
import typing

import numpy as np
import tensorflow as tf

from mtd_tf.priors import gaussian
from mtd_tf.priors import layout
from mtd_tf.priors import protocol
from mtd_tf.priors import saved_model

__all__ = [
  "PRIOR_CLASSES",
  "register_prior_class",
  "shipped_root",
  "available",
  "probe",
  "load_prior",
]

# Images in one probe call of `load_prior`.
_PROBE_BATCH = 2
_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[0-9]+)?$")

# prior.json "prior_class" -> the class whose from_folder(path) builds it.
PRIOR_CLASSES: typing.Dict[str, type] = {}


def register_prior_class(cls, name=None):
  """Lets `load_prior` build `cls` from folders whose prior.json names it.

  Usable as a class decorator.

  Args:
    cls: a class with a classmethod ``from_folder(path: str)`` returning an
      object that meets the `Prior` contract and carries ``path`` (the
      folder).
    name: the "prior_class" value that selects it (default cls.__name__).

  Returns:
    cls.

  Raises:
    PriorError: cls has no callable from_folder.
  """
  if not callable(getattr(cls, "from_folder", None)):
    raise protocol.PriorError(
      f"{getattr(cls, '__name__', cls)!r} has no classmethod "
      "from_folder(path): add one that builds the prior from its folder."
    )
  PRIOR_CLASSES[name or cls.__name__] = cls
  return cls


register_prior_class(saved_model.SavedModelPrior)
register_prior_class(gaussian.GaussianPrior)


def shipped_root() -> pathlib.Path:
  """The folder of shipped priors, ``saved_models/<name>/<version>/``.

  Inside an installed wheel: ``mtd_tf/saved_models``; in a source checkout:
  ``saved_models`` beside the ``mtd_tf`` package folder.
  """
  packaged = importlib.resources.files("mtd_tf") / "saved_models"
  if isinstance(packaged, pathlib.Path) and packaged.is_dir():
    return packaged
  # This file is <repo>/mtd_tf/priors/loading.py.
  return pathlib.Path(__file__).resolve().parents[2] / "saved_models"


def available() -> typing.List[str]:
  """The shipped priors as "name/version", sorted."""
  root = shipped_root()
  if not root.is_dir():
    return []
  return [
    f"{name}/{version}"
    for name in sorted(os.listdir(root))
    for version in layout.versions(root / name)
    if (root / name / str(version) / "saved_model.pb").is_file()
  ]


def _resolve_version(path):
  """A model folder with numeric version subfolders resolves to the newest."""
  if os.path.isfile(os.path.join(path, "saved_model.pb")):
    return path
  versions = layout.versions(path)
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
  raise protocol.PriorError(
    f"Prior {text!r} does not exist as a folder and is not a shipped prior "
    f"(available: {listed}): pass a folder written by export_prior or one "
    "of those names."
  )


def _prior_class(path):
  """The registered class prior.json's "prior_class" names.

  An unreadable prior.json selects the default class, whose own checks
  then say what is wrong with the folder.
  """
  json_file = layout.json_path(path)
  try:
    with open(json_file) as f:
      metadata = json.load(f)
  except (OSError, ValueError):
    metadata = None
  name = layout.DEFAULT_PRIOR_CLASS
  if isinstance(metadata, dict):
    name = metadata.get("prior_class", name)
  if not isinstance(name, str):
    raise layout.field_error(json_file, "prior_class", name, "a string")
  cls = PRIOR_CLASSES.get(name)
  if cls is None:
    raise protocol.PriorError(
      f"{json_file}: prior_class {name!r} is not registered (registered: "
      f"{', '.join(sorted(PRIOR_CLASSES))}): register it with "
      "priors.register_prior_class or fix the file."
    )
  return cls


def probe(prior, where="the prior"):
  """Calls `prior` once on a small batch; PriorError unless its score is sane.

  The score of x float32 [2, L, L] (uniform in [0, 1]) at t = t_prior must
  have the input's shape, be float32 and finite.

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
    first = layout.error_line(e)
    raise protocol.PriorError(
      f"{where} fails on a probe batch [{_PROBE_BATCH}, {size}, "
      f"{size}] ({first[:200]}): re-export it."
    ) from e
  if not isinstance(score, tf.Tensor) or score.dtype != tf.float32:
    raise protocol.PriorError(
      f"{where} returns {getattr(score, 'dtype', type(score))}"
      " scores, not float32: re-export it."
    )
  if tuple(score.shape) != x.shape:
    raise protocol.PriorError(
      f"{where} returns scores of shape {tuple(score.shape)} "
      f"for images of shape {x.shape}: re-export it so that "
      "the score has the input's shape."
    )
  if not np.all(np.isfinite(score.numpy())):
    raise protocol.PriorError(
      f"{where} returns NaN or Inf scores on a probe batch of "
      "images in [0, 1]: check or retrain the prior."
    )
  return prior


def load_prior(name_or_path, image_size=None):
  """Loads an exported prior by path or by shipped name.

  Args:
    name_or_path: a version folder (``saved_models/mnist_unet/1``), a model
      folder holding numeric versions (the newest is taken), or the name of
      a shipped prior, ``"mnist_unet"`` (newest version) or
      ``"mnist_unet/1"`` (see `available`).
    image_size: optional L the caller needs; a prior of another size raises
      `PriorError` (see `check_image_size`).

  Returns:
    A `Prior` of the class prior.json names ("prior_class", default
    `SavedModelPrior`), with ``path`` the version folder.

  Raises:
    PriorError: unknown name or missing folder, an unregistered
      prior_class, what the class's from_folder refuses (for a
      SavedModelPrior: not a SavedModel, corrupt saved_model.pb, no
      serving_default taking x [None, L, L] and t [None] float32 and
      returning score float32, a missing or ill-typed assets/prior.json),
      a result that misses members of `Prior`, or a probe call that gives a
      wrong shape or non-finite scores.
  """
  path = _resolve_version(_locate(name_or_path))
  cls = _prior_class(path)
  prior = cls.from_folder(path)
  missing = protocol.missing_members(prior)
  if missing:
    raise protocol.PriorError(
      f"{cls.__name__}.from_folder({path!r}) returned a prior without "
      f"{', '.join(missing)} of the priors.Prior contract: add them to "
      "the class."
    )
  if image_size is not None:
    protocol.check_image_size(prior, image_size)
  return probe(prior, where=f"The prior at {path!r}")
