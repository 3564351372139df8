"""Score networks s_theta(x, t) in Keras 3, section IV of the paper.

* `gaussian_score_mlp`: three fully-connected layers with Softplus (section
  IV.A), for the 5 x 5 Gaussian prior trained by implicit score matching
  (eq. 5). It ignores t.
* `mnist_unet`: a small time-conditioned U-Net (section IV.B: "a U-Net
  architecture with ten convolutional layers and LogSigmoid activation
  functions"), trained by denoising score matching (eq. 7). Its output is
  divided by sigma_t of the VP-SDE (the score_sde parametrisation), so the
  raw network predicts -z where x_t = alpha(t) x_0 + sigma_t z.

Both take inputs ``(x [B, L, L] float32, t [B] float32)`` and return the score
float32 [B, L, L].
"""

import math

import keras
from keras import ops

from mtd_tf import sde as sde_lib


def _activation(name):
  """Returns the activation callable for 'logsigmoid', 'swish' or 'softplus'."""
  if name == 'logsigmoid':
    return lambda x: ops.log_sigmoid(x)
  if name in ('swish', 'silu'):
    return ops.silu
  if name == 'softplus':
    return ops.softplus
  raise ValueError(f'Unknown activation {name!r}: use logsigmoid, swish or '
                   'softplus.')


def gaussian_score_mlp(dim: int = 25, hidden: int = 256,
                       name: str = 'gaussian_fc') -> keras.Model:
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
  if size * size != dim:
    raise ValueError(f'dim={dim} is not a perfect square L*L.')
  x_in = keras.Input(shape=(size, size), name='x')
  t_in = keras.Input(shape=(), name='t')
  h = keras.layers.Flatten()(x_in)
  h = keras.layers.Dense(hidden, activation='softplus', name='dense_1')(h)
  h = keras.layers.Dense(hidden, activation='softplus', name='dense_2')(h)
  h = keras.layers.Dense(dim, name='dense_3')(h)
  out = keras.layers.Reshape((size, size), name='score')(h)
  return keras.Model([x_in, t_in], out, name=name)


class GaussianFourierTime(keras.layers.Layer):
  """Gaussian random Fourier features of log-time noise level (score_sde).

  Embeds t [B] as [sin(2 pi W c), cos(2 pi W c)] with c = log(t) scaled and W
  fixed random frequencies (a non-trainable weight, saved with the model).
  """

  def __init__(self, dim, scale=16.0, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.scale = scale
    self.seed = seed

  def build(self, input_shape):
    self.frequencies = self.add_weight(
        shape=(self.dim // 2,),
        initializer=keras.initializers.RandomNormal(stddev=self.scale,
                                                    seed=self.seed),
        trainable=False, name='frequencies')

  def call(self, t):
    # A log-scale input spreads the small t (where the prior is used) out.
    c = ops.log(ops.maximum(t, 1e-6)) / 4.0  # [B]
    proj = c[:, None] * self.frequencies[None, :] * (2.0 * math.pi)
    return ops.concatenate([ops.sin(proj), ops.cos(proj)], axis=-1)


class DivideBySigma(keras.layers.Layer):
  """Divides the network output [B, L, L] by sigma_t of the VP-SDE."""

  def __init__(self, beta_min=0.1, beta_max=20.0, **kwargs):
    super().__init__(**kwargs)
    self.beta_min = beta_min
    self.beta_max = beta_max

  def call(self, h, t):
    t = ops.maximum(t, 1e-6)  # sigma_t is undefined for t <= 0
    b = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
    sigma = ops.sqrt(-ops.expm1(-b))
    return h / sigma[:, None, None]


def mnist_unet(image_size: int = 28, channels=(32, 64, 128),
               embed_dim: int = 128, activation: str = 'swish',
               groups: int = 8, sde: sde_lib.VPSDE = sde_lib.VPSDE(),
               name: str = 'mnist_unet') -> keras.Model:
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
  levels = len(channels)
  if image_size % (2 ** (levels - 1)):
    raise ValueError(f'image_size={image_size} is not divisible by '
                     f'2**{levels - 1}.')
  act = _activation(activation)
  x_in = keras.Input(shape=(image_size, image_size), name='x')
  t_in = keras.Input(shape=(), name='t')

  emb = GaussianFourierTime(embed_dim, name='time_fourier')(t_in)
  emb = keras.layers.Dense(embed_dim, name='time_dense_1')(emb)
  emb = keras.layers.Activation(act)(emb)
  emb = keras.layers.Dense(embed_dim, name='time_dense_2')(emb)
  emb = keras.layers.Activation(act)(emb)

  counter = [0]

  def block(h, ch, strides=1, transpose=False):
    counter[0] += 1
    i = counter[0]
    conv_cls = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
    h = conv_cls(ch, 3, strides=strides, padding='same', name=f'conv_{i}')(h)
    bias = keras.layers.Dense(ch, name=f'time_proj_{i}')(emb)
    h = h + keras.layers.Reshape((1, 1, ch))(bias)
    h = keras.layers.GroupNormalization(min(groups, ch), name=f'norm_{i}')(h)
    return keras.layers.Activation(act)(h)

  h = keras.layers.Reshape((image_size, image_size, 1))(x_in)
  h = keras.layers.Conv2D(channels[0], 3, padding='same', name='conv_in')(h)
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
  h = keras.layers.Conv2D(1, 3, padding='same', name='conv_out')(h)
  h = keras.layers.Reshape((image_size, image_size))(h)
  out = DivideBySigma(sde.beta_min, sde.beta_max, name='score')(h, t_in)
  return keras.Model([x_in, t_in], out, name=name)
