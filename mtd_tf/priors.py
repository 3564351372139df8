"""Score priors for the M-step of Algorithm 1: exported, loaded or exact.

A prior is a callable ``prior(F [B, L, L] float32, t [B] or scalar float32)
-> score [B, L, L]`` that works in image units F, with attributes
``image_size`` (L), ``metadata`` (dict) and ``t_prior`` (the diffusion time at
which the M-step evaluates it, 0.01 by default; CONVENTIONS.md).

* `GaussianPrior(mu)`: the exact score -(F - mu) of N(mu, I) (section IV.A),
  an oracle for tests.
* `export_prior(model, export_dir, metadata)`: writes a Keras score network as
  a TF-Serving SavedModel ``<export_dir>`` (e.g. ``saved_models/mnist_unet/1``)
  with signatures ``serving_default`` (inputs ``x`` [None, L, L] and ``t``
  [None], output ``{"score": [None, L, L]}``) and ``serve_dict`` (one dict
  argument, loadable as ``keras.layers.TFSMLayer``), and the asset
  ``assets/prior.json``. The folder appears atomically (temp folder + rename).
* `load_prior(path) -> SavedModelPrior`, raising `PriorError` with a one-line
  message for anything that is not a usable prior.

Data scaling: the network sees x = scale * F + offset (prior.json ``scale`` and
``offset``), so the score in image units is scale * s_theta(x, t).
"""

import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from mtd_tf import sde as sde_lib

PRIOR_JSON = 'prior.json'
DEFAULT_T_PRIOR = 0.01
SERVING_KEY = 'serving_default'
DICT_KEY = 'serve_dict'


class PriorError(ValueError):
  """A prior folder or prior object that cannot be used, with what to do."""


def _broadcast_time(t, x):
  """Returns t as float32 [B] for x [B, L, L]; a scalar t is broadcast."""
  t = tf.convert_to_tensor(t, dtype=tf.float32)
  batch = tf.shape(x)[0]
  if t.shape.rank == 0:
    return tf.fill([batch], t)
  return tf.reshape(t, [batch])


class GaussianPrior:
  """The exact score of N(mu, I) in image units (section IV.A oracle).

  ``prior(F, t)`` returns -(F - mu), or with ``diffused=True`` the exact
  score of the VP-SDE marginal at time t, -(F - alpha(t) mu) (the diffused
  N(mu, I) is N(alpha(t) mu, I) because alpha^2 + sigma_t^2 = 1).

  Args:
    mu: float [L, L] mean image.
    t_prior: diffusion time used by the M-step.
    diffused: whether to use the time-dependent exact marginal score.
    sde: the VP-SDE (only used when diffused).
  """

  def __init__(self, mu, t_prior: float = DEFAULT_T_PRIOR,
               diffused: bool = False, sde: sde_lib.VPSDE = sde_lib.VPSDE()):
    self.mu = tf.constant(np.asarray(mu, np.float32))  # [L, L]
    if self.mu.shape.rank != 2 or self.mu.shape[0] != self.mu.shape[1]:
      raise PriorError(f'GaussianPrior needs a square mean image [L, L], got '
                       f'shape {self.mu.shape}.')
    self.image_size = int(self.mu.shape[0])
    self.t_prior = float(t_prior)
    self.diffused = diffused
    self.sde = sde
    self.metadata = {
        'kind': 'gaussian', 'image_size': self.image_size,
        'mu': np.asarray(mu, np.float64).reshape(-1).tolist(),
        'architecture': 'exact', 't_prior': self.t_prior, 'scale': 1.0,
        'offset': 0.0, 'beta_min': sde.beta_min, 'beta_max': sde.beta_max}

  def __call__(self, x, t):
    """Score float32 [B, L, L] at x float32 [B, L, L], t [B] or scalar."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    t = _broadcast_time(t, x)
    if self.diffused:
      alpha = self.sde.alpha(t)[:, None, None]
      return -(x - alpha * self.mu)
    return -(x - self.mu)


class SavedModelPrior:
  """A score network loaded from an exported SavedModel (see `load_prior`).

  Attributes:
    path: the SavedModel folder.
    image_size: L.
    metadata: the dict read from assets/prior.json.
    t_prior: metadata['t_prior'] (0.01 unless the export said otherwise).
    scale, offset: the data scaling x = scale * F + offset.
    sde: the `VPSDE` with the exported beta_min, beta_max.
  """

  def __init__(self, loaded, metadata, path):
    self._loaded = loaded
    self._serve = loaded.signatures[SERVING_KEY]
    self.path = path
    self.metadata = metadata
    self.image_size = int(metadata['image_size'])
    self.t_prior = float(metadata.get('t_prior', DEFAULT_T_PRIOR))
    self.scale = float(metadata.get('scale', 1.0))
    self.offset = float(metadata.get('offset', 0.0))
    self.sde = sde_lib.VPSDE(float(metadata.get('beta_min', 0.1)),
                             float(metadata.get('beta_max', 20.0)))

  def network_score(self, x, t):
    """The raw network score in network units: x float32 [B, L, L], t [B]."""
    x = tf.convert_to_tensor(x, dtype=tf.float32)
    return self._serve(x=x, t=_broadcast_time(t, x))['score']

  def __call__(self, x, t):
    """Score in image units: scale * s_theta(scale * F + offset, t).

    Args:
      x: float32 [B, L, L] images F.
      t: float32 [B] or scalar diffusion times.

    Returns:
      float32 [B, L, L]. Usable inside a `tf.function`.
    """
    with tf.name_scope('saved_model_prior'):
      x = tf.convert_to_tensor(x, dtype=tf.float32)
      return self.scale * self.network_score(self.scale * x + self.offset, t)


def check_image_size(prior, image_size: int):
  """Raises `PriorError` unless prior.image_size == image_size (L)."""
  if int(prior.image_size) != int(image_size):
    raise PriorError(
        f'The prior is for {prior.image_size}x{prior.image_size} images but '
        f'the image size L is {image_size}: use a prior trained for L = '
        f'{image_size} or run without a prior.')


class _ServingModule(tf.Module):
  """What gets saved: the network, its variables, two endpoints, the asset."""

  def __init__(self, model, image_size, metadata_file):
    super().__init__()
    # The variables are tracked explicitly as a list (and the Keras model is
    # only held by the endpoints' closures), so that the session-based loader
    # behind saved_model_cli and TF Serving finds every variable.
    self.model_variables = [v.value if hasattr(v, "value") else v
                            for v in model.variables]
    self.prior_json = tf.saved_model.Asset(metadata_file)
    spec_x = tf.TensorSpec([None, image_size, image_size], tf.float32, name='x')
    spec_t = tf.TensorSpec([None], tf.float32, name='t')

    @tf.function(input_signature=[spec_x, spec_t])
    def serve(x, t):
      return {'score': tf.identity(model([x, t], training=False),
                                   name='score')}

    @tf.function(input_signature=[{'x': spec_x, 't': spec_t}])
    def serve_dict(inputs):
      return serve(inputs['x'], inputs['t'])

    self.serve = serve
    self.serve_dict = serve_dict


def export_prior(model, export_dir: str, metadata: dict,
                 overwrite: bool = True) -> str:
  """Exports a score network as a TF-Serving SavedModel with prior.json.

  The SavedModel is written into a temporary folder beside ``export_dir``
  and renamed into place when complete, so an interrupted export leaves no
  partial ``export_dir``.

  Args:
    model: a Keras model (x [B, L, L], t [B]) -> score [B, L, L].
    export_dir: the version folder, e.g. ``saved_models/mnist_unet/1``.
    metadata: JSON-serialisable dict; must hold ``image_size``; ``kind``,
      ``beta_min``, ``beta_max``, ``t_prior``, ``scale``, ``offset`` are
      expected by `load_prior` (defaults: 0.1, 20, 0.01, 1, 0).
    overwrite: replace an existing export_dir (else raise `PriorError`).

  Returns:
    export_dir.
  """
  export_dir = os.path.abspath(export_dir)
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(export_dir) and not overwrite:
    raise PriorError(f'{export_dir} exists: pass overwrite=True or choose '
                     'another version number.')
  image_size = int(metadata['image_size'])
  base = os.path.basename(export_dir)
  tmp_dir = tempfile.mkdtemp(prefix=f'.tmp-{base}-', dir=parent)
  json_dir = tempfile.mkdtemp(prefix='.tmp-json-', dir=parent)
  try:
    metadata_file = os.path.join(json_dir, PRIOR_JSON)
    with open(metadata_file, 'w') as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    module = _ServingModule(model, image_size, metadata_file)
    target = os.path.join(tmp_dir, 'model')
    tf.saved_model.save(
        module, target,
        signatures={SERVING_KEY: module.serve.get_concrete_function(),
                    DICT_KEY: module.serve_dict.get_concrete_function()})
    # TF Serving warm-up requests travel with every export.
    from mtd_tf import serving  # pylint: disable=g-import-not-at-top
    serving.write_warmup_requests(target, model_name=os.path.basename(parent))
    if os.path.exists(export_dir):
      old = f'{export_dir}.old-{int(time.time())}'
      os.rename(export_dir, old)
      os.rename(target, export_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(target, export_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(json_dir, ignore_errors=True)
  return export_dir


def _resolve_version(path):
  """A model folder with numeric version subfolders resolves to the newest."""
  if os.path.isfile(os.path.join(path, 'saved_model.pb')):
    return path
  versions = [d for d in os.listdir(path)
              if d.isdigit() and os.path.isdir(os.path.join(path, d))]
  if versions:
    return os.path.join(path, max(versions, key=int))
  return path


def load_prior(path: str, image_size=None) -> SavedModelPrior:
  """Loads a prior exported by `export_prior`.

  Args:
    path: the version folder (``saved_models/mnist_unet/1``) or the model
      folder holding numeric versions (the newest is taken).
    image_size: optional L the caller needs; a prior of another size raises
      `PriorError` (see `check_image_size`).

  Returns:
    A `SavedModelPrior`.

  Raises:
    PriorError: the folder is missing, is not a SavedModel, its
      saved_model.pb is corrupt, it lacks serving_default with inputs x and t
      or output score, or it lacks assets/prior.json.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise PriorError(f'Prior folder {path!r} does not exist: pass a folder '
                     'written by export_prior, e.g. saved_models/mnist_unet/1.')
  path = _resolve_version(path)
  if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
    raise PriorError(f'{path!r} is not a SavedModel (no saved_model.pb): '
                     'pass a folder written by export_prior.')
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PriorError(f'Could not load the SavedModel at {path!r} (corrupt or '
                     f'truncated? {first[:200]}): re-export or re-download '
                     'the prior.') from e
  signatures = getattr(loaded, 'signatures', {})
  if SERVING_KEY not in signatures:
    raise PriorError(f'{path!r} has no {SERVING_KEY!r} signature: re-export it '
                     'with mtd_tf.priors.export_prior.')
  fn = signatures[SERVING_KEY]
  _, kwargs = fn.structured_input_signature
  outputs = fn.structured_outputs
  if (sorted(kwargs) != ['t', 'x'] or kwargs['x'].shape.rank != 3
      or kwargs['t'].shape.rank != 1 or 'score' not in outputs):
    raise PriorError(f'{path!r}: {SERVING_KEY} must take x [None, L, L] and '
                     f't [None] and return score; it takes {sorted(kwargs)} '
                     f'and returns {sorted(outputs)}. Re-export with '
                     'export_prior.')
  json_path = os.path.join(path, 'assets', PRIOR_JSON)
  if not os.path.isfile(json_path):
    raise PriorError(f'{path!r} has no assets/{PRIOR_JSON}: re-export it with '
                     'mtd_tf.priors.export_prior.')
  try:
    with open(json_path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise PriorError(f'{json_path!r} is not valid JSON ({e}): re-export the '
                     'prior.') from e
  size = kwargs['x'].shape[1]
  if 'image_size' not in metadata or (size is not None and
                                      int(metadata['image_size']) != size):
    raise PriorError(f'{json_path!r}: image_size {metadata.get("image_size")} '
                     f'does not match the signature ({size}): re-export.')
  prior = SavedModelPrior(loaded, metadata, path)
  if image_size is not None:
    check_image_size(prior, image_size)
  return prior
