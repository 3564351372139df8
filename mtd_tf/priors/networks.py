"""Score networks s_theta(x, t) in Keras 3, section IV of the paper.

* `gaussian_score_mlp`: three fully-connected layers with Softplus (section
  IV.A), for the 5 x 5 Gaussian prior trained by implicit score matching
  (eq. 5). It ignores t.
* `mnist_unet`: a small time-conditioned U-Net (section IV.B: "a U-Net
  architecture with ten convolutional layers and LogSigmoid activation
  functions"), trained by denoising score matching (eq. 7). Its output is
  divided by sigma_t of the VP-SDE (`DivideBySigma`, the score_sde
  parametrisation), so the raw network predicts -z where
  x_t = alpha(t) x_0 + sigma_t z.

Both take inputs ``(x [B, L, L] float32, t [B] float32)`` and return the score
float32 [B, L, L]. Every custom layer is registered with Keras (package
"mtd_tf"), so importing this module is enough for `keras.models.load_model`
to read a saved ``.keras`` file without ``custom_objects``.

A shipped prior (a SavedModel written by `mtd_tf.priors.export_prior`) can be
turned back into its Keras network: `build_network(network_config(meta))`
rebuilds the architecture from prior.json and `load_weights_from_saved_model`
copies the SavedModel's variables into it (`network_from_saved_model` does
both).
"""

import json
import math
import os
import re

import keras
from keras import ops

from mtd_tf.priors import kinds
from mtd_tf.priors import sde as sde_lib

__all__ = [
  "gaussian_score_mlp",
  "mnist_unet",
  "GaussianFourierTime",
  "DivideBySigma",
  "network_config",
  "build_network",
  "load_weights_from_saved_model",
  "network_from_saved_model",
  "NetworkError",
]

# Registered names of the activations (`keras.activations.get` resolves them
# and they serialise by name).
_ACTIVATIONS = {
  "logsigmoid": "log_sigmoid",
  "swish": "silu",
  "silu": "silu",
  "softplus": "softplus",
}


class NetworkError(ValueError):
  """A network configuration or weight file that cannot be used."""


def _activation(name):
  """The registered Keras activation name for 'logsigmoid', 'swish', 'softplus'."""
  if name not in _ACTIVATIONS:
    raise NetworkError(
      f"Unknown activation {name!r}: use logsigmoid, swish or softplus."
    )
  return _ACTIVATIONS[name]


def gaussian_score_mlp(
  dim: int = 25, hidden: int = 256, name: str = "gaussian_fc"
) -> keras.Model:
  """The paper's score network for the Gaussian prior (section IV.A).

  Three Dense layers (dim -> hidden -> hidden -> dim) with Softplus between
  them. The time input is accepted for a uniform interface and ignored.

  Args:
    dim: number of pixels L * L (must be a perfect square).
    hidden: width of the hidden layers.
    name: model name.

  Returns:
    A `keras.Model` mapping (x float32 [B, L, L], t float32 [B]) to the
    score float32 [B, L, L].
  """
  size = math.isqrt(dim)
  if dim < 1 or size * size != dim:
    raise NetworkError(f"dim={dim} is not a perfect square L*L.")
  if hidden < 1:
    raise NetworkError(f"hidden={hidden}: the hidden width must be positive.")
  x_in = keras.Input(shape=(size, size), name="x")
  t_in = keras.Input(shape=(), name="t")
  h = keras.layers.Flatten()(x_in)  # [B, L*L]
  h = keras.layers.Dense(hidden, activation="softplus", name="dense_1")(h)
  h = keras.layers.Dense(hidden, activation="softplus", name="dense_2")(h)
  h = keras.layers.Dense(dim, name="dense_3")(h)
  out = keras.layers.Reshape((size, size), name="score")(h)  # [B, L, L]
  return keras.Model([x_in, t_in], out, name=name)


@keras.saving.register_keras_serializable(package="mtd_tf")
class GaussianFourierTime(keras.layers.Layer):
  """Gaussian random Fourier features of the log diffusion time (score_sde).

  Embeds t [B] as [sin(2 pi W c), cos(2 pi W c)] [B, dim] with c = log(t) / 4
  and W fixed random frequencies (a non-trainable weight, saved with the
  model).

  Args:
    dim: embedding width (even).
    scale: standard deviation of the frequencies.
    seed: seed of the frequencies' initialiser.
  """

  def __init__(self, dim, scale=16.0, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.dim = int(dim)
    self.scale = float(scale)
    self.seed = int(seed)

  def build(self, input_shape):
    self.frequencies = self.add_weight(
      shape=(self.dim // 2,),
      initializer=keras.initializers.RandomNormal(
        stddev=self.scale, seed=self.seed
      ),
      trainable=False,
      name="frequencies",
    )

  def call(self, t):
    # A log-scale input spreads the small t (where the prior is used) out.
    c = ops.log(ops.maximum(t, 1e-6)) / 4.0  # [B]
    proj = c[:, None] * self.frequencies[None, :] * (2.0 * math.pi)
    return ops.concatenate([ops.sin(proj), ops.cos(proj)], axis=-1)

  def get_config(self):
    config = super().get_config()
    config.update(dim=self.dim, scale=self.scale, seed=self.seed)
    return config


@keras.saving.register_keras_serializable(package="mtd_tf")
class DivideBySigma(keras.layers.Layer):
  """Divides the network output h [B, L, L] by sigma_t of a `sde.VPSDE`.

  Args:
    beta_min, beta_max: the VP-SDE of eq. (6) whose sigma_t (eq. 8) is used.
  """

  def __init__(
    self,
    beta_min=sde_lib.VPSDE.beta_min,
    beta_max=sde_lib.VPSDE.beta_max,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.sde = sde_lib.VPSDE(float(beta_min), float(beta_max))

  def call(self, h, t):
    sigma = self.sde.std(ops.maximum(t, 1e-6))  # [B]; undefined for t <= 0
    return h / sigma[:, None, None]

  def get_config(self):
    config = super().get_config()
    config.update(beta_min=self.sde.beta_min, beta_max=self.sde.beta_max)
    return config


def mnist_unet(
  image_size: int = 28,
  channels=(32, 64, 128),
  embed_dim: int = 128,
  activation: str = "swish",
  groups: int = 8,
  sde: sde_lib.VPSDE = sde_lib.VPSDE(),
  name: str = "mnist_unet",
) -> keras.Model:
  """A small time-conditioned U-Net score network (section IV.B).

  Layout (11 convolutions with the default three levels):
  28x28: conv_in, res conv -> down (stride 2) 14x14: conv -> down 7x7:
  bottleneck conv -> up (transpose) 14x14: conv on [up, skip] -> up 28x28:
  conv on [up, skip] -> conv_out (1 channel). Every conv block adds a Dense
  projection of the Gaussian-Fourier time embedding and uses GroupNorm.
  The output is divided by sigma_t (score_sde parametrisation).

  Args:
    image_size: L; must be divisible by 2 ** (len(channels) - 1).
    channels: channels per resolution level.
    embed_dim: time-embedding width.
    activation: 'logsigmoid' (the paper's), 'swish' or 'softplus'.
    groups: GroupNorm groups.
    sde: the VP-SDE whose sigma_t scales the output.
    name: model name.

  Returns:
    A `keras.Model` mapping (x float32 [B, L, L], t float32 [B]) to the
    score float32 [B, L, L].
  """
  channels = tuple(int(c) for c in channels)
  levels = len(channels)
  if not channels or min(channels) < 1:
    raise NetworkError(
      f"channels={list(channels)}: give one positive count "
      "per resolution level."
    )
  if image_size < 1 or image_size % (2 ** (levels - 1)):
    raise NetworkError(
      f"image_size={image_size} is not divisible by 2**{levels - 1}."
    )
  if embed_dim < 2 or embed_dim % 2:
    raise NetworkError(f"embed_dim={embed_dim}: use a positive even width.")
  act = _activation(activation)
  x_in = keras.Input(shape=(image_size, image_size), name="x")
  t_in = keras.Input(shape=(), name="t")

  emb = GaussianFourierTime(embed_dim, name="time_fourier")(t_in)  # [B, E]
  emb = keras.layers.Dense(embed_dim, name="time_dense_1")(emb)
  emb = keras.layers.Activation(act)(emb)
  emb = keras.layers.Dense(embed_dim, name="time_dense_2")(emb)
  emb = keras.layers.Activation(act)(emb)

  counter = [0]

  def block(h, ch, strides=1, transpose=False):
    counter[0] += 1
    i = counter[0]
    conv_cls = (
      keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
    )
    h = conv_cls(ch, 3, strides=strides, padding="same", name=f"conv_{i}")(h)
    bias = keras.layers.Dense(ch, name=f"time_proj_{i}")(emb)  # [B, ch]
    h = keras.layers.Add()([h, keras.layers.Reshape((1, 1, ch))(bias)])
    h = keras.layers.GroupNormalization(min(groups, ch), name=f"norm_{i}")(h)
    return keras.layers.Activation(act)(h)

  h = keras.layers.Reshape((image_size, image_size, 1))(x_in)  # [B, L, L, 1]
  h = keras.layers.Conv2D(channels[0], 3, padding="same", name="conv_in")(h)
  skips = []
  for level, ch in enumerate(channels):
    if level > 0:
      h = block(h, ch, strides=2)  # downsample
    h = block(h, ch)
    skips.append(h)
  for level in reversed(range(levels - 1)):
    ch = channels[level]
    h = block(h, ch, strides=2, transpose=True)  # upsample
    h = keras.layers.Concatenate()([h, skips[level]])
    h = block(h, ch)
  h = keras.layers.Conv2D(1, 3, padding="same", name="conv_out")(h)
  h = keras.layers.Reshape((image_size, image_size))(h)  # [B, L, L]
  out = DivideBySigma(sde.beta_min, sde.beta_max, name="score")(h, t_in)
  return keras.Model([x_in, t_in], out, name=name)


def network_config(metadata: dict) -> dict:
  """The builder and keyword arguments of a prior's network, from prior.json.

  Priors exported by the trainers of this version store them under
  ``metadata["network"]`` (``{"builder": ..., "kwargs": {...}}``); for older
  exports they are read from ``kind``, ``image_size``, ``channels``,
  ``activation``, ``beta_min``/``beta_max`` and the ``architecture`` string.

  Args:
    metadata: the prior.json dict.

  Returns:
    ``{"builder": "gaussian_score_mlp" | "mnist_unet", "kwargs": dict}``,
    arguments for `build_network`.

  Raises:
    NetworkError: the metadata does not describe a network of this module.
  """
  if "network" in metadata:
    return {
      "builder": metadata["network"]["builder"],
      "kwargs": dict(metadata["network"]["kwargs"]),
    }
  kind = metadata.get("kind")
  architecture = metadata.get("architecture", "")
  size = int(metadata["image_size"])
  # Older exports name no builder: their kind's does (`kinds.DataKind`).
  builder = kinds.of(kind).network
  if builder is not None and not architecture.startswith(builder):
    builder = None

  def parsed(key, default):
    match = re.search(rf"{key}=(\d+)", architecture)
    return int(match.group(1)) if match else default

  if builder == "gaussian_score_mlp":
    return {
      "builder": "gaussian_score_mlp",
      "kwargs": {"dim": size * size, "hidden": parsed("hidden", 256)},
    }
  if builder == "mnist_unet":
    return {
      "builder": "mnist_unet",
      "kwargs": {
        "image_size": size,
        "channels": list(metadata["channels"]),
        "embed_dim": parsed("embed_dim", 128),
        "activation": metadata.get("activation", "swish"),
        "beta_min": float(metadata.get("beta_min", sde_lib.VPSDE.beta_min)),
        "beta_max": float(metadata.get("beta_max", sde_lib.VPSDE.beta_max)),
      },
    }
  raise NetworkError(
    f"prior.json describes no network of mtd_tf.networks "
    f"(kind {kind!r}, architecture {architecture!r}): only "
    "priors trained by trainers/ can be rebuilt."
  )


def build_network(config: dict) -> keras.Model:
  """Builds a fresh (untrained) network from a `network_config` dict."""
  kwargs = dict(config["kwargs"])
  if config["builder"] == "gaussian_score_mlp":
    return gaussian_score_mlp(**kwargs)
  if config["builder"] == "mnist_unet":
    sde = sde_lib.VPSDE(
      kwargs.pop("beta_min", sde_lib.VPSDE.beta_min),
      kwargs.pop("beta_max", sde_lib.VPSDE.beta_max),
    )
    kwargs["channels"] = tuple(kwargs["channels"])
    return mnist_unet(sde=sde, **kwargs)
  raise NetworkError(
    f"Unknown network builder {config['builder']!r}: use "
    "gaussian_score_mlp or mnist_unet."
  )


def _variable_name(variable):
  name = getattr(variable, "path", None) or variable.name
  return name.removesuffix(":0")


def load_weights_from_saved_model(model: keras.Model, saved_model_dir: str):
  """Copies a SavedModel prior's variable values into a Keras network.

  The SavedModel must be an export of a network with the same architecture
  (`mtd_tf.priors.export_prior` tracks its variables as ``model_variables``);
  variables are matched by name (``conv_1/kernel``) and shape.

  Args:
    model: a built Keras network (e.g. from `build_network`).
    saved_model_dir: the version folder (``saved_models/mnist_unet/1``).

  Returns:
    model, with the SavedModel's weights.

  Raises:
    NetworkError: the SavedModel's variables do not match the network's.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  loaded = tf.saved_model.load(os.fspath(saved_model_dir))
  source = getattr(loaded, "model_variables", None)
  if source is None:
    raise NetworkError(
      f"{saved_model_dir} has no model_variables: it was "
      "not written by mtd_tf.priors.export_prior."
    )
  stored = {_variable_name(v): v for v in source}
  targets = {_variable_name(v): v for v in model.variables}
  if len(stored) != len(source) or len(targets) != len(model.variables):
    raise NetworkError(
      f"Variable names are not unique in {saved_model_dir} "
      f"or in the network {model.name}."
    )
  if sorted(stored) != sorted(targets):
    missing = sorted(set(targets) - set(stored))[:3]
    extra = sorted(set(stored) - set(targets))[:3]
    raise NetworkError(
      f"{saved_model_dir} does not hold this network's "
      f"weights (missing {missing}, unexpected {extra}): "
      "rebuild the network from its prior.json."
    )
  for name, variable in targets.items():
    value = stored[name]
    if tuple(variable.shape) != tuple(value.shape):
      raise NetworkError(
        f"{saved_model_dir}: {name} has shape "
        f"{tuple(value.shape)}, the network "
        f"{tuple(variable.shape)}: rebuild the network from "
        "its prior.json."
      )
    variable.assign(value.numpy())
  return model


def network_from_saved_model(saved_model_dir: str) -> keras.Model:
  """The Keras network of a shipped prior: rebuilt, then its weights copied.

  Args:
    saved_model_dir: a version folder with assets/prior.json.

  Returns:
    A `keras.Model` (x [B, L, L], t [B]) -> score [B, L, L] equal to the
    SavedModel's serving_default.
  """
  path = os.path.join(os.fspath(saved_model_dir), "assets", "prior.json")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise NetworkError(
      f"Cannot read {path} ({e}): pass a prior version "
      "folder written by export_prior."
    ) from e
  model = build_network(network_config(metadata))
  return load_weights_from_saved_model(model, saved_model_dir)
