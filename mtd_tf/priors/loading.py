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
class, `load_prior` first checks prior.json against `layout.SCHEMA`, then
checks the result against the `Prior` contract and probes it (`probe`: a
score of the input's shape, float32 and finite at the batch sizes and
diffusion times EM and sampling use, no steeper than it claims) before
returning it: a SavedModel runs code, so load only priors you trust.
Loading and probing run in a worker thread (`_interruptible`), so Ctrl-C
and SIGTERM stop a prior that never returns.
"""

import importlib.resources
import json
import math
import os
import pathlib
import re
import threading
import typing

import numpy as np
import tensorflow as tf

from mtd_tf.priors import gaussian
from mtd_tf.priors import kinds
from mtd_tf.priors import layout
from mtd_tf.priors import protocol
from mtd_tf.priors import saved_model
from mtd_tf.priors import sde as sde_lib

__all__ = [
  "PRIOR_CLASSES",
  "register_prior_class",
  "shipped_root",
  "available",
  "PROBE_BATCHES",
  "probe_times",
  "probe",
  "load_prior",
]

# The batch sizes `probe` calls a prior with: one image, two, and as many
# as a recommended run's starts side by side or a sampling call.
PROBE_BATCHES = (1, 2, 16)
# The first diffusion time of the recommended annealed schedule
# (recovery.recommended) and the gauge's orientation time.
ANNEAL_START = 0.3
# How much steeper than it claims a prior's score may be (`probe`).
CURVATURE_FACTOR = 10.0
# How often the main thread wakes while a prior call runs (`_interruptible`).
_WAIT_SLICE_SECONDS = 0.1
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


def _interruptible(fn, *args):
  """fn(*args), run so that Ctrl-C and SIGTERM still stop the caller.

  A prior runs its own graph or code, which may never return; Python runs
  signal handlers only in the main thread and only between bytecodes, so a
  main thread stuck in that call would ignore KeyboardInterrupt and the
  tools' SIGTERM (`cli.Terminated`). The call runs in a daemon worker
  thread instead, and the main thread waits on it in short slices, where
  signals are delivered; an interrupted wait leaves the worker behind (it
  dies with the process). Off the main thread fn is called directly.

  Returns:
    fn's result; fn's exception is raised as is.
  """
  if threading.current_thread() is not threading.main_thread():
    return fn(*args)
  outcome = {}

  def work():
    try:
      outcome["value"] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  worker = threading.Thread(target=work, name="mtd_tf-prior", daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(_WAIT_SLICE_SECONDS)
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def probe_times(prior) -> typing.Tuple[float, ...]:
  """The diffusion times `probe` calls a prior at, ascending.

  t_prior (the M-step, eq. 18), `ANNEAL_START` (the annealed schedule's
  first time and the gauge's orientation time) and the probability-flow
  sampler's range, `sde.DEFAULT_SAMPLER_EPS` to 1.
  """
  return tuple(
    sorted(
      {float(prior.t_prior), ANNEAL_START, sde_lib.DEFAULT_SAMPLER_EPS, 1.0}
    )
  )


def _call(prior, x, t, where):
  """prior(x, t) at float t; PriorError unless float32, x's shape, finite."""
  batch, size = x.shape[0], x.shape[1]
  at = f"a probe batch [{batch}, {size}, {size}] at t={t:g}"
  try:
    score = prior(tf.constant(x), tf.constant(np.full([batch], t, np.float32)))
  except (tf.errors.OpError, ValueError, TypeError) as e:
    first = layout.error_line(e)
    raise protocol.PriorError(
      f"{where} fails on {at} ({first[:200]}): re-export it."
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
  score = score.numpy()
  if not np.all(np.isfinite(score)):
    raise protocol.PriorError(
      f"{where} returns NaN or Inf scores on {at} (images in [0, 1]): "
      "check or retrain the prior (its prior.json's beta_min, beta_max "
      "and t_prior too)."
    )
  return score


def _check_curvature(prior, x, where):
  """Refuses a score far steeper at t_prior than prior.curvature says.

  The preconditioned M-step divides by the curvature the prior claims
  (eq. 17; 1 for the gaussian kind's -(x - alpha mu), 1 / sigma_t^2 for a
  learned diffusion score), so a score `CURVATURE_FACTOR` times steeper
  overshoots: e.g. an MNIST network whose prior.json says "gaussian".
  Measured by central differences along a random unit direction d per
  image: c = -<d, s(x + h d) - s(x - h d)> / 2h, averaged over the batch.
  """
  t = float(prior.t_prior)
  claimed = prior.curvature(t)
  try:
    claimed = float(claimed)
  except (TypeError, ValueError):
    pass
  if not isinstance(claimed, float) or not 0 < claimed < math.inf:
    raise protocol.PriorError(
      f"{where}: curvature({t:g}) is {claimed!r}, not a positive finite "
      "number: fix the prior class's curvature."
    )
  rng = np.random.default_rng(1)
  d = rng.standard_normal(x.shape)
  d /= np.sqrt(np.sum(d**2, axis=(1, 2), keepdims=True))
  # A tenth of the length over which the claimed curvature bends the score.
  h = 0.1 / math.sqrt(claimed)
  up = _call(prior, (x + h * d).astype(np.float32), t, where)
  down = _call(prior, (x - h * d).astype(np.float32), t, where)
  measured = float(np.mean(-np.sum(d * (up - down), axis=(1, 2)) / (2 * h)))
  if measured > CURVATURE_FACTOR * claimed:
    raise protocol.PriorError(
      f"{where}: its score at t_prior={t:g} has curvature {measured:.3g}, "
      f"{measured / claimed:.0f} times the {claimed:.3g} it claims for "
      f"kind {prior.kind!r}, so the M-step would overshoot: set the kind "
      "the network was trained on (prior.json's 'kind'; one of "
      f"{', '.join(sorted(kinds.KINDS))}) or re-export the prior."
    )


def _probe(prior, where, batch_sizes, times):
  size = int(prior.image_size)
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, (max(batch_sizes), size, size))
  x = x.astype(np.float32)
  for batch in batch_sizes:
    for t in probe_times(prior) if times is None else times:
      _call(prior, x[:batch], float(t), where)
  _check_curvature(prior, x, where)
  return prior


def probe(prior, where="the prior", batch_sizes=PROBE_BATCHES, times=None):
  """Calls `prior` as EM and sampling will; PriorError unless it is sane.

  For every batch size and diffusion time (`probe_times`: t_prior, the
  annealing start 0.3, the sampler's eps and 1) the score of x float32
  [B, L, L] (uniform in [0, 1]) must have the input's shape, be float32
  and finite, so a prior that fails only for larger batches or at some
  times is refused within seconds of loading, not minutes into a run.
  Its curvature at t_prior must not exceed `CURVATURE_FACTOR` times
  ``prior.curvature(t_prior)`` (`_check_curvature`). The calls run in a
  worker thread, so Ctrl-C and SIGTERM stop a prior that never returns.

  Args:
    prior: a `Prior`.
    where: how to name the prior in messages (e.g. its path).
    batch_sizes: the batch sizes B to call it with.
    times: the diffusion times (None: `probe_times(prior)`).

  Returns:
    prior.
  """
  batch_sizes = tuple(int(b) for b in batch_sizes)
  return _interruptible(_probe, prior, where, batch_sizes, times)


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
      a prior.json that fails `layout.check_metadata` (any class), a
      result that misses members of `Prior`, or a probe call that fails or
      gives a wrong shape, non-finite scores or a score far steeper than
      the prior's curvature (`probe`).
  """
  path = _resolve_version(_locate(name_or_path))
  if os.path.isfile(layout.json_path(path)):
    # The whole prior.json against the schema, whatever the class, before
    # anything is loaded or run.
    layout.read_metadata(path)
  cls = _prior_class(path)
  prior = _interruptible(cls.from_folder, path)
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
