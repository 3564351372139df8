"""Training library for the score priors (section IV of the paper).

The thin absl mains `trainers/train_gaussian_prior.py` and
`trainers/train_mnist_prior.py` turn flags into the frozen dataclasses here
and call `train_gaussian_prior` / `train_mnist_prior`. Library code never
reads flags.

Both trainers: a tf.data pipeline with fixed seeds, Adam with linear warm-up
and cosine decay, gradient clipping, an exponential moving average (EMA) of
the weights (held in a second model, which is what gets exported),
`tf.train.CheckpointManager` checkpoints every few minutes with automatic
resume, TensorBoard scalars (loss, learning rate, held-out loss), periodic
log lines with rate and ETA, and a SavedModel export at the end
(`mtd_tf.priors.export_prior`).
"""

import dataclasses
import json
import math
import os
import platform
import time
from typing import Callable, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import mtd_tf
from mtd_tf import networks
from mtd_tf import priors
from mtd_tf import sde as sde_lib


def default_checkpoint_dir(name: str) -> str:
  """~/.cache/mtd_tf/<name>/ (expanded)."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'mtd_tf', name)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Options shared by both trainers.

  Attributes:
    name: prior name (saved_models/<name>/<version>).
    steps: total optimisation steps (a resumed run continues up to this).
    batch_size: examples per step.
    learning_rate: peak Adam learning rate.
    warmup_steps: linear warm-up steps.
    final_lr_fraction: cosine decay ends at this fraction of the peak.
    grad_clip: global-norm gradient clip (0 disables).
    weight_decay: decoupled weight decay (AdamW) when > 0.
    ema_decay: EMA decay of the exported weights.
    seed: seed of the data order, the noise and the initialisation.
    checkpoint_dir: where checkpoints and TensorBoard logs go.
    checkpoint_every_secs: seconds between checkpoints.
    log_every_steps: steps between log lines and training scalars.
    heldout_every_steps: steps between held-out evaluations.
    export_dir: SavedModel version folder written at the end ('' skips).
    export_only: export the latest checkpoint without training.
  """
  name: str
  steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  final_lr_fraction: float = 0.1
  grad_clip: float = 1.0
  weight_decay: float = 0.0
  ema_decay: float = 0.999
  seed: int = 0
  checkpoint_dir: str = ''
  checkpoint_every_secs: float = 180.0
  log_every_steps: int = 100
  heldout_every_steps: int = 500
  export_dir: str = ''
  export_only: bool = False


@dataclasses.dataclass(frozen=True)
class GaussianDataConfig:
  """The Gaussian prior's data (CONVENTIONS.md): N(mu, I), mu in {0..4}^25.

  Attributes:
    image_size: L (5 in the paper).
    num_samples: training samples (10,000 in the paper).
    mu_seed: seed of the one draw of mu from {0, ..., 4}^(L*L).
    data_seed: seed of the training samples.
    hidden: width of the MLP's hidden layers.
  """
  image_size: int = 5
  num_samples: int = 10000
  mu_seed: int = 2024
  data_seed: int = 1
  hidden: int = 256


@dataclasses.dataclass(frozen=True)
class MnistDataConfig:
  """The MNIST prior's data and network.

  Attributes:
    mnist_npz: path to an npz in keras.datasets.mnist layout; '' uses
      keras.datasets.mnist.load_data() (needs internet).
    heldout: images at the end of the train split kept for held-out loss.
    channels: U-Net channels per resolution level.
    embed_dim: time-embedding width.
    activation: 'logsigmoid' (the paper's), 'swish' or 'softplus'.
    eps: smallest diffusion time of eq. (7).
  """
  mnist_npz: str = ''
  heldout: int = 1024
  channels: tuple = (32, 64, 128)
  embed_dim: int = 128
  activation: str = 'swish'
  eps: float = 1e-5


def gaussian_mean(config: GaussianDataConfig) -> np.ndarray:
  """mu float32 [L, L], entries iid uniform on {0, ..., 4}, seeded."""
  rng = np.random.default_rng(config.mu_seed)
  size = config.image_size
  return rng.integers(0, 5, size=(size, size)).astype(np.float32)


def gaussian_samples(config: GaussianDataConfig) -> np.ndarray:
  """num_samples draws of N(mu, I), float32 [num_samples, L, L]."""
  rng = np.random.default_rng(config.data_seed)
  mu = gaussian_mean(config)
  noise = rng.standard_normal((config.num_samples,) + mu.shape)
  return (mu + noise).astype(np.float32)


def load_mnist_train(mnist_npz: str = '') -> np.ndarray:
  """The MNIST train split as float32 [N, 28, 28] in [0, 1] (never x_test)."""
  if mnist_npz:
    with np.load(mnist_npz) as data:
      x = data['x_train']
  else:
    (x, _), _ = keras.datasets.mnist.load_data()
  return (x.astype(np.float32) / 255.0)


def learning_rate_at(config: TrainConfig, step: int) -> float:
  """Linear warm-up then cosine decay to final_lr_fraction of the peak."""
  if step < config.warmup_steps:
    return config.learning_rate * (step + 1) / config.warmup_steps
  span = max(1, config.steps - config.warmup_steps)
  progress = min(1.0, (step - config.warmup_steps) / span)
  cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
  frac = config.final_lr_fraction
  return config.learning_rate * (frac + (1.0 - frac) * cosine)


def device_description() -> str:
  """A short description of the machine that trains, e.g. 'CPU (2 cores)'."""
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    return f'GPU x{len(gpus)}'
  proc = platform.processor() or platform.machine()
  return f'CPU ({os.cpu_count()} cores, {proc})'


@dataclasses.dataclass
class TrainResult:
  """What a training run reports (start_step: where this run resumed)."""
  start_step: int
  step: int
  train_loss: float
  heldout_loss: float
  train_seconds: float
  checkpoint_path: str
  export_dir: str
  metrics: dict


def _scalar_summary(tag: str, value: float):
  """Writes a TensorBoard scalar without needing the tensorboard package.

  Same record as `tf.summary.scalar` (plugin 'scalars'), through the core
  `tf.summary.write`, so TensorBoard shows it when installed.
  """
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = 'scalars'
  tf.summary.write(tag, tf.constant(float(value), tf.float32),
                   metadata=metadata.SerializeToString())


def _format_seconds(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train(config: TrainConfig,
          build_model: Callable[[], keras.Model],
          make_dataset: Callable[[int], tf.data.Dataset],
          loss_fn: Callable,
          heldout_fn: Callable[[keras.Model], dict],
          metadata_fn: Callable[[dict], dict]) -> TrainResult:
  """Generic loop: checkpoints, resume, EMA, TensorBoard, logs, export.

  Args:
    config: the options.
    build_model: returns a fresh Keras score network.
    make_dataset: start_step -> an infinite dataset of float32 [B, L, L].
    loss_fn: (model, x [B, L, L], seed [2] int32) -> scalar loss.
    heldout_fn: ema_model -> dict of scalar metrics; must hold 'heldout_loss'.
    metadata_fn: summary dict -> prior.json dict for the export.

  Returns:
    A `TrainResult`.
  """
  ckpt_dir = config.checkpoint_dir or default_checkpoint_dir(config.name)
  os.makedirs(ckpt_dir, exist_ok=True)
  keras.utils.set_random_seed(config.seed)
  model = build_model()
  ema_model = build_model()
  ema_model.set_weights(model.get_weights())
  if config.weight_decay > 0:
    optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                       weight_decay=config.weight_decay)
  else:
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
  optimizer.build(model.trainable_variables)
  step_var = tf.Variable(0, dtype=tf.int64, name='step')
  seconds_var = tf.Variable(0.0, dtype=tf.float64, name='train_seconds')
  last_loss_var = tf.Variable(float('nan'), dtype=tf.float64)
  last_heldout_var = tf.Variable(float('nan'), dtype=tf.float64)
  checkpoint = tf.train.Checkpoint(
      step=step_var, train_seconds=seconds_var, model=model,
      ema_model=ema_model, optimizer=optimizer, last_loss=last_loss_var,
      last_heldout=last_heldout_var)
  manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=3)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info('Resumed from %s at step %d.', manager.latest_checkpoint,
                 int(step_var.numpy()))
  else:
    logging.info('No checkpoint in %s: starting at step 0.', ckpt_dir)
  if not config.export_only:
    with open(os.path.join(ckpt_dir, 'config.json'), 'w') as f:
      json.dump(dataclasses.asdict(config), f, indent=2)
  start_step = int(step_var.numpy())
  metrics = {}

  train_vars = model.trainable_variables
  ema_vars = ema_model.trainable_variables

  @tf.function
  def train_step(x, seed, lr, decay):
    optimizer.learning_rate.assign(lr)
    with tf.GradientTape() as tape:
      loss = loss_fn(model, x, seed)
    grads = tape.gradient(loss, train_vars)
    if config.grad_clip > 0:
      grads, _ = tf.clip_by_global_norm(grads, config.grad_clip)
    optimizer.apply_gradients(zip(grads, train_vars))
    for e, v in zip(ema_vars, train_vars):
      e.assign(decay * e + (1.0 - decay) * v)
    return loss

  if not config.export_only and start_step < config.steps:
    writer = tf.summary.create_file_writer(os.path.join(ckpt_dir, 'tb'))
    dataset = make_dataset(start_step)
    iterator = iter(dataset)
    last_save = time.time()
    window_start = time.time()
    window_steps = 0
    window_losses = []
    segment_start = time.time()
    seconds_at_start = float(seconds_var.numpy())
    step = start_step
    heldout = float(last_heldout_var.numpy())
    while step < config.steps:
      x = next(iterator)
      lr = learning_rate_at(config, step)
      decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
      seed = tf.constant([config.seed, step], tf.int32)
      loss = float(train_step(x, seed, tf.constant(lr, tf.float32),
                              tf.constant(decay, tf.float32)))
      if not math.isfinite(loss):
        raise FloatingPointError(f'Loss is {loss} at step {step}: lower '
                                 '--learning_rate or resume from a checkpoint.')
      step += 1
      step_var.assign(step)
      window_steps += 1
      window_losses.append(loss)
      seconds_var.assign(seconds_at_start + time.time() - segment_start)
      if step % config.heldout_every_steps == 0 or step == config.steps:
        metrics = {k: float(v) for k, v in heldout_fn(ema_model).items()}
        heldout = metrics['heldout_loss']
        last_heldout_var.assign(heldout)
        with writer.as_default(step=step):
          for k, v in metrics.items():
            _scalar_summary(k, v)
      if step % config.log_every_steps == 0 or step == config.steps:
        mean_loss = float(np.mean(window_losses))
        last_loss_var.assign(mean_loss)
        rate = window_steps / max(1e-9, time.time() - window_start)
        eta = (config.steps - step) / max(rate, 1e-9)
        extra = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items()
                         if k != 'heldout_loss')
        logging.info('%s step %d/%d (%.1f%%) loss %.4f heldout %.4f lr %.2e '
                     '%.2f steps/s ETA %s elapsed %s %s', config.name, step,
                     config.steps, 100.0 * step / config.steps, mean_loss,
                     heldout, lr, rate, _format_seconds(eta),
                     _format_seconds(float(seconds_var.numpy())), extra)
        with writer.as_default(step=step):
          _scalar_summary('loss', mean_loss)
          _scalar_summary('learning_rate', lr)
          _scalar_summary('steps_per_second', rate)
        writer.flush()
        window_start, window_steps, window_losses = time.time(), 0, []
      if time.time() - last_save > config.checkpoint_every_secs:
        path = manager.save(checkpoint_number=step)
        logging.info('Saved checkpoint %s.', path)
        last_save = time.time()
    if window_losses:
      last_loss_var.assign(float(np.mean(window_losses)))
    manager.save(checkpoint_number=step)
    writer.flush()
  elif not manager.latest_checkpoint and config.export_only:
    raise FileNotFoundError(f'--export_only: no checkpoint in {ckpt_dir}; '
                            'train first or pass --checkpoint_dir.')
  if not metrics:
    metrics = {k: float(v) for k, v in heldout_fn(ema_model).items()}
    last_heldout_var.assign(metrics['heldout_loss'])

  step = int(step_var.numpy())
  result = TrainResult(
      start_step=start_step, step=step, train_loss=float(last_loss_var.numpy()),
      heldout_loss=float(last_heldout_var.numpy()),
      train_seconds=float(seconds_var.numpy()),
      checkpoint_path=manager.latest_checkpoint or '',
      export_dir='', metrics=metrics)
  if config.export_dir:
    summary = {
        'steps': step, 'training_time_seconds': round(result.train_seconds, 1),
        'device': device_description(), 'final_train_loss': result.train_loss,
        'final_heldout_loss': result.heldout_loss,
        'heldout_metrics': metrics, 'mtd_tf_version': mtd_tf.__version__,
        'batch_size': config.batch_size, 'learning_rate': config.learning_rate,
        'ema_decay': config.ema_decay, 'seed': config.seed,
        'exported_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }
    result.export_dir = priors.export_prior(ema_model, config.export_dir,
                                            metadata_fn(summary))
    logging.info('Exported %s at step %d.', result.export_dir, step)
  return result


def _common_metadata(kind, image_size, architecture, sde, summary):
  meta = {
      'kind': kind, 'image_size': image_size, 'architecture': architecture,
      'beta_min': sde.beta_min, 'beta_max': sde.beta_max,
      't_prior': priors.DEFAULT_T_PRIOR, 'scale': 1.0, 'offset': 0.0,
  }
  meta.update(summary)
  return meta


def train_gaussian_prior(config: TrainConfig,
                         data: GaussianDataConfig = GaussianDataConfig()
                         ) -> TrainResult:
  """Trains the Gaussian prior of section IV.A with implicit score matching.

  Loss eq. (5) (exact Jacobian trace) on ``data.num_samples`` samples of
  N(mu, I); held-out metrics on 1,000 fresh samples: the ISM loss and the
  relative L2 error against the exact score -(x - mu).
  """
  sde = sde_lib.VPSDE()
  mu = gaussian_mean(data)
  samples = gaussian_samples(data)
  size = data.image_size
  rng = np.random.default_rng(data.data_seed + 1000)
  fresh = (mu + rng.standard_normal((1000, size, size))).astype(np.float32)

  def build_model():
    return networks.gaussian_score_mlp(size * size, data.hidden)

  def make_dataset(start_step):
    ds = tf.data.Dataset.from_tensor_slices(samples)
    ds = ds.shuffle(len(samples), seed=config.seed + start_step,
                    reshuffle_each_iteration=True)
    return ds.repeat().batch(config.batch_size, drop_remainder=True).prefetch(2)

  def loss_fn(model, x, seed):
    del seed
    return sde_lib.implicit_score_matching_loss(
        lambda a, b: model([a, b], training=True), x)

  def heldout_fn(ema_model):
    score_fn = lambda a, b: ema_model([a, b], training=False)
    loss = sde_lib.implicit_score_matching_loss(score_fn, fresh)
    pred = score_fn(tf.constant(fresh), tf.zeros([len(fresh)])).numpy()
    exact = -(fresh - mu)
    rel = np.linalg.norm(pred - exact) / np.linalg.norm(exact)
    return {'heldout_loss': float(loss), 'relative_score_error': float(rel)}

  def metadata_fn(summary):
    meta = _common_metadata('gaussian', size, 'gaussian_score_mlp(dim=%d, '
                            'hidden=%d), softplus' % (size * size, data.hidden),
                            sde, summary)
    meta.update({
        'mu': mu.reshape(-1).astype(float).tolist(),
        'mu_seed': data.mu_seed, 'data_seed': data.data_seed,
        'loss': 'implicit score matching, eq. (5), exact Jacobian trace',
        'training_data': (f'{data.num_samples} samples of N(mu, I), {size}x'
                          f'{size}; mu iid uniform on {{0..4}} drawn with '
                          f'numpy default_rng({data.mu_seed}), samples with '
                          f'default_rng({data.data_seed})'),
    })
    return meta

  return train(config, build_model, make_dataset, loss_fn, heldout_fn,
               metadata_fn)


def train_mnist_prior(config: TrainConfig,
                      data: MnistDataConfig = MnistDataConfig(),
                      images: Optional[np.ndarray] = None) -> TrainResult:
  """Trains the MNIST prior of section IV.B with denoising score matching.

  Loss eq. (7) with lambda(t) = sigma_t^2, t ~ U[eps, 1]. Digits come from
  the train split only, scaled to [0, 1]; the last ``data.heldout`` images
  of the split are held out for the held-out loss (fixed noise seeds).

  Args:
    config: training options.
    data: data and network options.
    images: optional float32 [N, 28, 28] in [0, 1] used instead of reading
      ``data.mnist_npz`` (tests).
  """
  sde = sde_lib.VPSDE()
  x = load_mnist_train(data.mnist_npz) if images is None else images
  x = np.asarray(x, np.float32)
  heldout_count = min(data.heldout, len(x) // 5)
  train_x, heldout_x = x[:len(x) - heldout_count], x[len(x) - heldout_count:]
  size = int(x.shape[1])

  def build_model():
    return networks.mnist_unet(size, tuple(data.channels), data.embed_dim,
                               data.activation, sde=sde)

  def make_dataset(start_step):
    ds = tf.data.Dataset.from_tensor_slices(train_x)
    ds = ds.shuffle(len(train_x), seed=config.seed + start_step,
                    reshuffle_each_iteration=True)
    return ds.repeat().batch(config.batch_size, drop_remainder=True).prefetch(2)

  def loss_fn(model, x0, seed):
    return sde_lib.denoising_score_matching_loss(
        lambda a, b: model([a, b], training=True), x0, sde, data.eps, seed=seed)

  heldout_batch = 256
  compiled = {}

  def heldout_fn(ema_model):
    if id(ema_model) not in compiled:
      compiled[id(ema_model)] = tf.function(
          lambda xb, seed: sde_lib.denoising_score_matching_loss(
              lambda a, b: ema_model([a, b], training=False), xb, sde,
              data.eps, seed=seed))
    batch_loss = compiled[id(ema_model)]
    losses = [float(batch_loss(heldout_x[i:i + heldout_batch],
                               tf.constant([12345, i], tf.int32)))
              for i in range(0, len(heldout_x), heldout_batch)]
    return {'heldout_loss': float(np.mean(losses))}

  def metadata_fn(summary):
    meta = _common_metadata(
        'mnist', size,
        f'mnist_unet(channels={list(data.channels)}, embed_dim='
        f'{data.embed_dim}, activation={data.activation}), output / sigma_t',
        sde, summary)
    source = data.mnist_npz or 'keras.datasets.mnist.load_data()'
    meta.update({
        'loss': 'denoising score matching, eq. (7), lambda(t) = sigma_t^2, '
                f't ~ U[{data.eps}, 1]',
        'training_data': (f'MNIST train split from {source}: first '
                          f'{len(train_x)} images for training, last '
                          f'{heldout_count} held out; scaled to [0, 1]; '
                          'x_test never used'),
        'activation': data.activation, 'channels': list(data.channels),
    })
    return meta

  return train(config, build_model, make_dataset, loss_fn, heldout_fn,
               metadata_fn)
