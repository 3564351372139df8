"""Training library for the score priors (section IV of the paper).

The thin tools `trainers/train_gaussian_prior.py` and
`trainers/train_mnist_prior.py` turn flags into the frozen dataclasses here
and call `train_gaussian_prior` / `train_mnist_prior`. Library code never
reads flags.

Both trainers: a tf.data pipeline with fixed seeds, Adam with linear warm-up
and cosine decay, gradient clipping, an exponential moving average (EMA) of
the weights (held in a second model, which is what gets exported), TensorBoard
scalars (loss, learning rate, held-out loss), log lines with rate and ETA, and
a SavedModel export at the end (`mtd_tf.priors.export_prior`).

Runs and checkpoints. A run lives in ``<checkpoint_dir>/<run>``, where
``<run>`` is ``--run_name`` or ``<name>-<hash>`` with the hash of every
setting that shapes the weights (`weights_config`: the optimiser's
hyper-parameters, the seed, the data and the network; not ``steps``, so a run
can be extended, nor where files go). The folder holds ``run.json`` (those
settings), `tf.train.CheckpointManager` checkpoints written every few minutes
and on Ctrl-C / SIGTERM, and TensorBoard logs. Asking for a run whose stored
settings differ is refused, so an export's ``prior.json`` always describes
the weights it ships with: it records the stored settings and the number of
steps actually trained.

Every check that can fail runs before any work: the settings (dataclass
construction), the data, the export target, the run's stored settings.
"""

from collections.abc import Callable
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import threading
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import mtd_tf
from mtd_tf import cli
from mtd_tf import priors
from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.model import datasets
from mtd_tf.priors import networks
from mtd_tf.priors import orientation
from mtd_tf.priors import sde as sde_lib
from mtd_tf.recovery import gauge

RUN_JSON = "run.json"
ACTIVATIONS = ("swish", "logsigmoid", "softplus")


class TrainingError(ValueError):
  """A training request that cannot be honoured, with what to do instead."""


def default_checkpoint_root() -> str:
  """~/.cache/mtd_tf/checkpoints (expanded): where runs live by default."""
  return os.path.join(
    os.path.expanduser("~"), ".cache", "mtd_tf", "checkpoints"
  )


def _require(condition, message):
  if not condition:
    raise TrainingError(message)


def _positive_finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Options shared by both trainers (checked on construction).

  Attributes:
    name: prior name, the model folder's name (``mtd_priors/<name>``).
    steps: total optimisation steps (a resumed run continues up to this; the
      cosine decay is laid out over this count).
    batch_size: examples per step.
    learning_rate: peak Adam learning rate.
    warmup_steps: linear warm-up steps.
    final_lr_fraction: cosine decay ends at this fraction of the peak.
    grad_clip: global-norm gradient clip (0 disables).
    weight_decay: decoupled weight decay (AdamW) when > 0.
    ema_decay: EMA decay of the exported weights.
    seed: seed of the data order, the noise and the initialisation.
    checkpoint_dir: folder of the runs ('' : `default_checkpoint_root()`).
    run_name: the run's folder name ('' : ``<name>-<hash of the settings>``).
    checkpoint_every_secs: seconds between checkpoints.
    log_every_steps: steps between log lines and training scalars.
    heldout_every_steps: steps between held-out evaluations.
    export_dir: the model folder the SavedModel version goes into ('' skips
      the export).
    version: the version number to write (None: the next free one). An
      existing version is refused unless `overwrite`.
    overwrite: replace an existing version.
    export_only: export the run's latest checkpoint without training.
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
  checkpoint_dir: str = ""
  run_name: str = ""
  checkpoint_every_secs: float = 180.0
  log_every_steps: int = 100
  heldout_every_steps: int = 500
  export_dir: str = ""
  version: int | None = None
  overwrite: bool = False
  export_only: bool = False

  def __post_init__(self):
    for label, value in (("name", self.name), ("run_name", self.run_name)):
      _require(
        isinstance(value, str)
        and os.sep not in value
        and value not in (".", ".."),
        f"{label}={value!r}: use a plain folder name without '/'.",
      )
    _require(
      self.name, "name is empty: give the prior a name, e.g. mnist_unet."
    )
    _require(
      isinstance(self.steps, int) and self.steps > 0,
      f"steps={self.steps}: the number of steps must be positive.",
    )
    _require(
      isinstance(self.batch_size, int) and self.batch_size > 0,
      f"batch_size={self.batch_size}: the batch size must be positive.",
    )
    _require(
      _positive_finite(self.learning_rate) and self.learning_rate < 1,
      f"learning_rate={self.learning_rate}: use a positive rate below "
      "1 (e.g. 1e-3).",
    )
    _require(
      self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0."
    )
    _require(
      0.0 <= self.final_lr_fraction <= 1.0,
      f"final_lr_fraction={self.final_lr_fraction} must be in [0, 1].",
    )
    _require(
      self.grad_clip >= 0,
      f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping).",
    )
    _require(
      self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0."
    )
    _require(
      0.0 <= self.ema_decay < 1.0,
      f"ema_decay={self.ema_decay} must be in [0, 1).",
    )
    _require(
      _positive_finite(self.checkpoint_every_secs),
      f"checkpoint_every_secs={self.checkpoint_every_secs} must be positive.",
    )
    _require(
      self.log_every_steps > 0 and self.heldout_every_steps > 0,
      "log_every_steps and heldout_every_steps must be positive.",
    )
    _require(
      self.version is None
      or (isinstance(self.version, int) and self.version > 0),
      f"version={self.version}: versions are positive integers.",
    )
    _require(
      not (self.export_only and not self.export_dir),
      "export_only without an export folder does nothing: give export_dir.",
    )


@dataclasses.dataclass(frozen=True)
class GaussianDataConfig:
  """The Gaussian prior's data (docs/conventions.md): N(mu, I), mu in {0..4}^L^2.

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

  def __post_init__(self):
    _require(
      isinstance(self.image_size, int) and 1 <= self.image_size <= 64,
      f"image_size={self.image_size}: use an L in 1..64 (the exact "
      "Jacobian trace costs L^4 per sample).",
    )
    _require(
      self.num_samples > 0, f"num_samples={self.num_samples} must be positive."
    )
    _require(self.hidden > 0, f"hidden={self.hidden} must be positive.")


@dataclasses.dataclass(frozen=True)
class MnistDataConfig:
  """The MNIST prior's data and network.

  Attributes:
    mnist_npz: path to an npz in keras.datasets.mnist layout (only x_train is
      read); '' uses keras.datasets.mnist.load_data() (needs internet).
    heldout: images at the end of the train split kept for held-out loss.
    channels: U-Net channels per resolution level.
    embed_dim: time-embedding width.
    activation: 'logsigmoid' (the paper's), 'swish' or 'softplus'.
    eps: smallest diffusion time of eq. (7).
  """

  mnist_npz: str = ""
  heldout: int = 1024
  channels: tuple = (32, 64, 128)
  embed_dim: int = 128
  activation: str = "swish"
  eps: float = sde_lib.DEFAULT_EPS

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    _require(self.heldout > 0, f"heldout={self.heldout} must be positive.")
    _require(
      self.channels and min(self.channels) > 0,
      f"channels={list(self.channels)}: give positive counts.",
    )
    _require(
      self.embed_dim > 0 and self.embed_dim % 2 == 0,
      f"embed_dim={self.embed_dim}: use a positive even width.",
    )
    _require(
      self.activation in ACTIVATIONS,
      f"activation={self.activation!r}: use one of {ACTIVATIONS}.",
    )
    _require(0.0 < self.eps < 1.0, f"eps={self.eps} must be in (0, 1).")


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
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    return f"GPU x{len(gpus)}"
  proc = platform.processor() or platform.machine()
  return f"CPU ({os.cpu_count()} cores, {proc})"


def weights_config(config: TrainConfig, data: dict) -> dict:
  """The settings that shape the weights: the key of a run.

  Args:
    config: the training options (their optimisation part is used).
    data: JSON-serialisable description of the trainer, its data and network.

  Returns:
    A JSON-serialisable dict.
  """
  keys = (
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "final_lr_fraction",
    "grad_clip",
    "weight_decay",
    "ema_decay",
    "seed",
  )
  shaped = {key: getattr(config, key) for key in keys}
  shaped.update(data)
  return json.loads(json.dumps(shaped))  # Tuples become lists, as stored.


def run_key(config: TrainConfig, shaped: dict) -> str:
  """The run's folder name: run_name, or <name>-<10 hex digits of the hash>."""
  if config.run_name:
    return config.run_name
  digest = hashlib.sha256(json.dumps(shaped, sort_keys=True).encode())
  return f"{config.name}-{digest.hexdigest()[:10]}"


def _check_run_folder(run_dir: str, shaped: dict):
  """Refuses a run folder whose stored settings differ from `shaped`."""
  path = os.path.join(run_dir, RUN_JSON)
  if not os.path.exists(path):
    if tf.train.latest_checkpoint(run_dir):
      raise TrainingError(
        f"{run_dir} holds checkpoints but no {RUN_JSON}: "
        "use another --run_name or --checkpoint_dir."
      )
    return
  try:
    with open(path) as f:
      stored = json.load(f)["weights_config"]
  except (OSError, ValueError, KeyError) as e:
    raise TrainingError(
      f"{path} is unreadable ({e}): use another --run_name or --checkpoint_dir."
    ) from e
  for key in sorted(set(stored) | set(shaped)):
    if stored.get(key) != shaped.get(key):
      raise TrainingError(
        f"Run {os.path.basename(run_dir)} was trained with {key}="
        f"{stored.get(key)!r}, not {shaped.get(key)!r}: use another "
        "--run_name (or leave it empty) or the run's settings."
      )


def _check_export_target(config: TrainConfig):
  """Refuses, before any work, to write into an existing version."""
  if config.export_dir and not config.overwrite:
    _refuse_existing_version(config.export_dir, config.version)


def _refuse_existing_version(export_dir, version):
  """TrainingError if export_dir/version exists (None: the next free one)."""
  if version is None:
    return
  target = os.path.join(export_dir, str(version))
  if os.path.exists(target):
    raise TrainingError(
      f"{target} exists and published versions never "
      "change: pass another --export_version (or none for "
      "the next free one), or --overwrite."
    )


@dataclasses.dataclass
class TrainResult:
  """What a training run reports (start_step: where this run resumed)."""

  start_step: int
  step: int
  train_loss: float
  heldout_loss: float
  train_seconds: float
  run_dir: str
  checkpoint_path: str
  export_dir: str
  metrics: dict


def _scalar_summary(tag: str, value: float):
  """Writes a TensorBoard scalar without needing the tensorboard package.

  Same record as `tf.summary.scalar` (plugin 'scalars'), through the core
  `tf.summary.write`, so TensorBoard shows it when installed.
  """
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = "scalars"
  tf.summary.write(
    tag,
    tf.constant(float(value), tf.float32),
    metadata=metadata.SerializeToString(),
  )


def _format_seconds(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What differs between the two trainers (see `train`).

  Attributes:
    shaped: `weights_config` of the run.
    network: `networks.network_config`-style dict; `build_network` builds it.
    make_dataset: start_step -> an infinite dataset of float32 [B, L, L].
    loss_fn: (model, x [B, L, L], seed [2] int32) -> scalar loss.
    heldout_fn: ema_model -> dict of scalar metrics with 'heldout_loss'.
    metadata: prior.json entries of this kind of prior.
  """

  shaped: dict
  network: dict
  make_dataset: Callable[[int], tf.data.Dataset]
  loss_fn: Callable
  heldout_fn: Callable[[keras.Model], dict]
  metadata: dict


class _StepInterrupts:
  """Holds Ctrl-C and SIGTERM until the training step in progress ends.

  A KeyboardInterrupt raised asynchronously can land inside an import or a
  TensorFlow call, surface as another error (a SystemError from
  `__import__`) and leave the process hanging; the loop raises it itself
  between steps (`check`), so the checkpoint it saves is whole. A second
  signal before then interrupts at once. Main thread only (elsewhere the
  handlers cannot be set and signals act as before).
  """

  def __init__(self):
    self.pending = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.getsignal(signum)
        signal.signal(signum, self._hold)
    return self

  def _hold(self, signum, frame):
    del frame
    if self.pending is not None:
      self._raise(signum)
    self.pending = signum

  @staticmethod
  def _raise(signum):
    if signum == signal.SIGTERM:
      raise cli.Terminated()
    raise KeyboardInterrupt()

  def check(self):
    """Raises the held interrupt, if any."""
    if self.pending is not None:
      signum, self.pending = self.pending, None
      self._raise(signum)

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False


def train(config: TrainConfig, trainer: Trainer) -> TrainResult:
  """Generic loop: run folder, resume, EMA, TensorBoard, logs, export.

  Args:
    config: the options.
    trainer: the data, network, loss and metadata of one kind of prior.

  Returns:
    A `TrainResult`.

  Raises:
    TrainingError: an existing export version, a run folder with other
      settings, export_only without a checkpoint.
    KeyboardInterrupt: Ctrl-C or SIGTERM (`cli.Terminated`), after the
      checkpoint of the last completed step is saved.
  """
  _check_export_target(config)
  root = config.checkpoint_dir or default_checkpoint_root()
  run_dir = os.path.join(root, run_key(config, trainer.shaped))
  _check_run_folder(run_dir, trainer.shaped)
  if config.export_only and not tf.train.latest_checkpoint(run_dir):
    raise TrainingError(
      f"export_only: no checkpoint in {run_dir}; train "
      "first, or give the run's --run_name and settings."
    )
  os.makedirs(run_dir, exist_ok=True)
  if not os.path.exists(os.path.join(run_dir, RUN_JSON)):
    with atomic.atomic_file(os.path.join(run_dir, RUN_JSON)) as tmp:
      with open(tmp, "w") as f:
        json.dump(
          {
            "name": config.name,
            "weights_config": trainer.shaped,
            "network": trainer.network,
          },
          f,
          indent=2,
          sort_keys=True,
        )

  keras.utils.set_random_seed(config.seed)
  model = networks.build_network(trainer.network)
  ema_model = networks.build_network(trainer.network)
  ema_model.set_weights(model.get_weights())
  if config.weight_decay > 0:
    optimizer = keras.optimizers.AdamW(
      learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
  else:
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
  optimizer.build(model.trainable_variables)
  step_var = tf.Variable(0, dtype=tf.int64, name="step")
  seconds_var = tf.Variable(0.0, dtype=tf.float64, name="train_seconds")
  last_loss_var = tf.Variable(float("nan"), dtype=tf.float64)
  last_heldout_var = tf.Variable(float("nan"), dtype=tf.float64)
  checkpoint = tf.train.Checkpoint(
    step=step_var,
    train_seconds=seconds_var,
    model=model,
    ema_model=ema_model,
    optimizer=optimizer,
    last_loss=last_loss_var,
    last_heldout=last_heldout_var,
  )
  manager = tf.train.CheckpointManager(checkpoint, run_dir, max_to_keep=3)
  if manager.latest_checkpoint:
    checkpoint.restore(
      manager.latest_checkpoint
    ).assert_existing_objects_matched()
    logging.info(
      "Resumed from %s at step %d.",
      manager.latest_checkpoint,
      int(step_var.numpy()),
    )
  else:
    logging.info("Run %s: starting at step 0.", run_dir)
  start_step = int(step_var.numpy())
  if start_step > config.steps:
    logging.info(
      "The checkpoint is at step %d, past --steps=%d: nothing to train.",
      start_step,
      config.steps,
    )
  metrics = {}

  train_vars = model.trainable_variables
  ema_vars = ema_model.trainable_variables

  @tf.function
  def train_step(x, seed, lr, decay):
    optimizer.learning_rate.assign(lr)
    with tf.GradientTape() as tape:
      loss = trainer.loss_fn(model, x, seed)
    grads = tape.gradient(loss, train_vars)
    if config.grad_clip > 0:
      grads, _ = tf.clip_by_global_norm(grads, config.grad_clip)
    optimizer.apply_gradients(zip(grads, train_vars))
    for e, v in zip(ema_vars, train_vars):
      e.assign(decay * e + (1.0 - decay) * v)
    # The step advances with the weights, in one call: a checkpoint taken
    # after an interrupt never pairs new weights with an old step.
    step_var.assign_add(1)
    return loss

  if not config.export_only and start_step < config.steps:
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "tb"))
    iterator = iter(trainer.make_dataset(start_step))
    last_save = time.time()
    window_start, window_steps, window_losses = time.time(), 0, []
    segment_start = time.time()
    seconds_at_start = float(seconds_var.numpy())
    step = start_step
    heldout = float(last_heldout_var.numpy())
    logging.info(
      "%s: training steps %d to %d on %s.",
      config.name,
      step,
      config.steps,
      device_description(),
    )
    try:
      with _StepInterrupts() as interrupts:
        while step < config.steps:
          interrupts.check()
          x = next(iterator)
          lr = learning_rate_at(config, step)
          decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
          seed = tf.constant([config.seed, step], tf.int32)
          loss = float(
            train_step(
              x,
              seed,
              tf.constant(lr, tf.float32),
              tf.constant(decay, tf.float32),
            )
          )
          step = int(step_var.numpy())
          if not math.isfinite(loss):
            raise FloatingPointError(
              f"Loss is {loss} at step {step}: lower --learning_rate or "
              "resume from a checkpoint."
            )
          window_steps += 1
          window_losses.append(loss)
          seconds_var.assign(seconds_at_start + time.time() - segment_start)
          if step % config.heldout_every_steps == 0 or step == config.steps:
            metrics = {
              k: float(v) for k, v in trainer.heldout_fn(ema_model).items()
            }
            heldout = metrics["heldout_loss"]
            last_heldout_var.assign(heldout)
            with writer.as_default(step=step):
              for k, v in metrics.items():
                _scalar_summary(k, v)
          if step % config.log_every_steps == 0 or step == config.steps:
            mean_loss = float(np.mean(window_losses))
            last_loss_var.assign(mean_loss)
            rate = window_steps / max(1e-9, time.time() - window_start)
            eta = (config.steps - step) / max(rate, 1e-9)
            extra = " ".join(
              f"{k} {v:.3g}" for k, v in metrics.items() if k != "heldout_loss"
            )
            logging.info(
              "%s step %d/%d (%.3g%%) loss %.3g heldout %.3g lr "
              "%.3g %.3g steps/s ETA %s elapsed %s %s",
              config.name,
              step,
              config.steps,
              100.0 * step / config.steps,
              mean_loss,
              heldout,
              lr,
              rate,
              _format_seconds(eta),
              _format_seconds(float(seconds_var.numpy())),
              extra,
            )
            with writer.as_default(step=step):
              _scalar_summary("loss", mean_loss)
              _scalar_summary("learning_rate", lr)
              _scalar_summary("steps_per_second", rate)
            writer.flush()
            window_start, window_steps, window_losses = time.time(), 0, []
          if time.time() - last_save > config.checkpoint_every_secs:
            path = manager.save(checkpoint_number=step)
            logging.info("Saved checkpoint %s.", path)
            last_save = time.time()
        interrupts.check()
    except KeyboardInterrupt:
      # Ctrl-C or SIGTERM: keep every completed step, then let the tool exit.
      path = manager.save(checkpoint_number=int(step_var.numpy()))
      writer.flush()
      logging.warning(
        "Interrupted at step %d: saved checkpoint %s; run the "
        "same command to resume.",
        int(step_var.numpy()),
        path,
      )
      raise
    if window_losses:
      last_loss_var.assign(float(np.mean(window_losses)))
    manager.save(checkpoint_number=step)
    writer.flush()
  if not metrics:
    metrics = {k: float(v) for k, v in trainer.heldout_fn(ema_model).items()}
    last_heldout_var.assign(metrics["heldout_loss"])

  step = int(step_var.numpy())
  result = TrainResult(
    start_step=start_step,
    step=step,
    train_loss=float(last_loss_var.numpy()),
    heldout_loss=float(last_heldout_var.numpy()),
    train_seconds=float(seconds_var.numpy()),
    run_dir=run_dir,
    checkpoint_path=manager.latest_checkpoint or "",
    export_dir="",
    metrics=metrics,
  )
  if config.export_dir:
    metadata = dict(trainer.metadata)
    metadata.update(
      {
        "network": trainer.network,
        "training_config": trainer.shaped,
        "run": os.path.basename(run_dir),
        "steps": step,
        "training_time_seconds": round(result.train_seconds, 1),
        "device": device_description(),
        "final_train_loss": result.train_loss,
        "final_heldout_loss": result.heldout_loss,
        "heldout_metrics": metrics,
        "mtd_tf_version": mtd_tf.__version__,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "ema_decay": config.ema_decay,
        "seed": config.seed,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      }
    )
    result.export_dir = priors.export_prior(
      ema_model,
      config.export_dir,
      metadata,
      version=config.version,
      overwrite=config.overwrite,
    )
    logging.info("Exported %s at step %d.", result.export_dir, step)
  return result


def _common_metadata(kind, image_size, architecture, sde):
  return {
    "kind": kind,
    "image_size": image_size,
    "architecture": architecture,
    "beta_min": sde.beta_min,
    "beta_max": sde.beta_max,
    "t_prior": table1.T_PRIOR,
    "scale": 1.0,
    "offset": 0.0,
  }


def _shuffled_batches(images, config, start_step):
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.shuffle(
    len(images), seed=config.seed + start_step, reshuffle_each_iteration=True
  )
  return ds.repeat().batch(config.batch_size, drop_remainder=True).prefetch(2)


def train_gaussian_prior(
  config: TrainConfig, data: GaussianDataConfig = GaussianDataConfig()
) -> TrainResult:
  """Trains the Gaussian prior of section IV.A with implicit score matching.

  Loss eq. (5) (exact Jacobian trace) on ``data.num_samples`` samples of
  N(mu, I); held-out metrics on 1,000 fresh samples: the ISM loss and the
  relative L2 error against the exact score -(x - mu).
  """
  _require(
    config.batch_size <= data.num_samples,
    f"batch_size={config.batch_size} exceeds num_samples="
    f"{data.num_samples}: lower --batch_size.",
  )
  sde = sde_lib.VPSDE()
  mu = gaussian_mean(data)
  samples = gaussian_samples(data)
  size = data.image_size
  rng = np.random.default_rng(data.data_seed + 1000)
  fresh = (mu + rng.standard_normal((1000, size, size))).astype(np.float32)
  network = {
    "builder": "gaussian_score_mlp",
    "kwargs": {"dim": size * size, "hidden": data.hidden},
  }

  def loss_fn(model, x, seed):
    del seed
    return sde_lib.implicit_score_matching_loss(
      lambda a, b: model([a, b], training=True), x
    )

  def heldout_fn(ema_model):
    score_fn = lambda a, b: ema_model([a, b], training=False)
    loss = sde_lib.implicit_score_matching_loss(score_fn, fresh)
    pred = score_fn(tf.constant(fresh), tf.zeros([len(fresh)])).numpy()
    exact = -(fresh - mu)
    rel = np.linalg.norm(pred - exact) / np.linalg.norm(exact)
    return {"heldout_loss": float(loss), "relative_score_error": float(rel)}

  metadata = _common_metadata(
    "gaussian",
    size,
    f"gaussian_score_mlp(dim={size * size}, hidden={data.hidden}), softplus",
    sde,
  )
  metadata.update(
    {
      "mu": mu.reshape(-1).astype(float).tolist(),
      "mu_seed": data.mu_seed,
      "data_seed": data.data_seed,
      "loss": "implicit score matching, eq. (5), exact Jacobian trace",
      "training_data": (
        f"{data.num_samples} samples of N(mu, I), {size}x"
        f"{size}; mu iid uniform on {{0..4}} drawn with "
        f"numpy default_rng({data.mu_seed}), samples with "
        f"default_rng({data.data_seed})"
      ),
    }
  )
  shaped = weights_config(
    config, {"trainer": "gaussian", "data": dataclasses.asdict(data)}
  )
  trainer = Trainer(
    shaped=shaped,
    network=network,
    make_dataset=lambda start: _shuffled_batches(samples, config, start),
    loss_fn=loss_fn,
    heldout_fn=heldout_fn,
    metadata=metadata,
  )
  return train(config, trainer)


def train_mnist_prior(
  config: TrainConfig,
  data: MnistDataConfig = MnistDataConfig(),
  images: np.ndarray | None = None,
) -> TrainResult:
  """Trains the MNIST prior of section IV.B with denoising score matching.

  Loss eq. (7) with lambda(t) = sigma_t^2, t ~ U[eps, 1]. Digits come from
  the train split only (`datasets.mnist_images`), scaled to [0, 1]; the last
  ``data.heldout`` images of the split are held out for the held-out loss
  (fixed noise seeds).

  Args:
    config: training options.
    data: data and network options.
    images: optional float32 [N, L, L] in [0, 1] used instead of reading
      ``data.mnist_npz`` (tests).
  """
  sde = sde_lib.VPSDE()
  if images is None:
    x = datasets.mnist_images(data.mnist_npz or None, "train")
  else:
    x = np.asarray(images, np.float32)
  heldout_count = min(data.heldout, len(x) // 5)
  train_x, heldout_x = x[: len(x) - heldout_count], x[len(x) - heldout_count :]
  _require(
    heldout_count > 0 and config.batch_size <= len(train_x),
    f"batch_size={config.batch_size} with {len(train_x)} training "
    f"images (and {heldout_count} held out): lower --batch_size or "
    "give more images.",
  )
  size = int(x.shape[1])
  network = {
    "builder": "mnist_unet",
    "kwargs": {
      "image_size": size,
      "channels": list(data.channels),
      "embed_dim": data.embed_dim,
      "activation": data.activation,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    },
  }
  networks.build_network(network)  # Refuses a bad size before any work.

  def loss_fn(model, x0, seed):
    return sde_lib.denoising_score_matching_loss(
      lambda a, b: model([a, b], training=True), x0, sde, data.eps, seed=seed
    )

  heldout_batch = 256
  compiled = {}

  def heldout_fn(ema_model):
    if id(ema_model) not in compiled:
      compiled[id(ema_model)] = tf.function(
        lambda xb, seed: sde_lib.denoising_score_matching_loss(
          lambda a, b: ema_model([a, b], training=False),
          xb,
          sde,
          data.eps,
          seed=seed,
        )
      )
    batch_loss = compiled[id(ema_model)]
    losses = [
      float(
        batch_loss(
          heldout_x[i : i + heldout_batch], tf.constant([12345, i], tf.int32)
        )
      )
      for i in range(0, len(heldout_x), heldout_batch)
    ]
    return {"heldout_loss": float(np.mean(losses))}

  metadata = _common_metadata(
    "mnist",
    size,
    f"mnist_unet(channels={list(data.channels)}, embed_dim="
    f"{data.embed_dim}, activation={data.activation}), output / sigma_t",
    sde,
  )
  source = data.mnist_npz or "keras.datasets.mnist.load_data()"
  metadata.update(
    {
      "loss": "denoising score matching, eq. (7), lambda(t) = sigma_t^2, "
      f"t ~ U[{data.eps}, 1]",
      "training_data": (
        f"MNIST train split from {source}: first "
        f"{len(train_x)} images for training, last "
        f"{heldout_count} held out; scaled to [0, 1]; "
        "x_test never used"
      ),
      "activation": data.activation,
      "channels": list(data.channels),
    }
  )
  described = dataclasses.asdict(data)
  del described["mnist_npz"]  # Where the file is does not shape the weights.
  shaped = weights_config(
    config,
    {
      "trainer": "mnist",
      "data": described,
      "train_images": len(train_x),
      "image_size": size,
    },
  )
  trainer = Trainer(
    shaped=shaped,
    network=network,
    make_dataset=lambda start: _shuffled_batches(train_x, config, start),
    loss_fn=loss_fn,
    heldout_fn=heldout_fn,
    metadata=metadata,
  )
  return train(config, trainer)


def train_orientation_prior(
  source: str,
  export_dir: str,
  config: orientation.OrientationConfig,
  mnist_npz: str = "",
  images: np.ndarray | None = None,
  version: int | None = None,
) -> str:
  """Exports a new version of a prior with an orientation classifier.

  The score network of `source` (its ``assets.extra/score_network.keras``)
  is exported unchanged beside a classifier of quarter turns
  (`orientation.train_classifier`) trained on the same MNIST train split as
  the prior, its last ``config.heldout`` digits held out (the prior's own
  held-out digits); x_test is never read. Examples are centred where the
  prior's convention puts its images, as the gauge centres its candidates.

  Args:
    source: the prior to extend (shipped name, model or version folder).
    export_dir: model folder the new version is written into.
    config: the classifier's `orientation.OrientationConfig`.
    mnist_npz: MNIST npz (only x_train is read); '' downloads.
    images: optional float32 [N, L, L] in [0, 1] instead of the file (tests).
    version: version number to write (None: the next free one).

  Returns:
    The version folder written.

  Raises (all before training):
    TrainingError: the version exists.
    priors.PriorError: the source cannot be loaded or has no Keras score
      network.
    datasets.DatasetError: no usable MNIST file.
  """
  _refuse_existing_version(export_dir, version)
  prior = priors.load_prior(source)
  keras_file = os.path.join(prior.path, priors.KERAS_FILE)
  if not os.path.isfile(keras_file):
    raise priors.PriorError(
      f"{prior.path} has no {priors.KERAS_FILE}: extend a prior exported "
      "with its Keras model (mnist_unet/2 or later)."
    )
  if images is None:
    x = datasets.mnist_images(mnist_npz or None, "train")
  else:
    x = np.asarray(images, np.float32)
  score_model = keras.models.load_model(keras_file)
  target = gauge.convention_centre(prior)
  model, metrics = orientation.train_classifier(
    x, config, target=target, log=lambda line: logging.info("%s", line)
  )
  source_data = (
    os.path.basename(mnist_npz)
    if mnist_npz
    else "keras.datasets.mnist.load_data()"
  )
  metadata = dict(prior.metadata)
  metadata.update(
    {
      "exported_from": (
        f"{os.path.basename(os.path.dirname(prior.path))}/"
        f"{os.path.basename(prior.path)} (same score weights; adds the "
        "orientation classifier)"
      ),
      "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "orientation_classifier": {
        "architecture": "conv3x3(32)-pool-conv3x3(64)-pool-conv3x3(64)-"
        "dense(128)-dense(4), logits of np.rot90 turns",
        "training": (
          f"MNIST train split from {source_data}: first {len(x) - config.heldout}"
          f" images, each epoch a random quarter turn, blur sd U[0, "
          f"{config.max_blur}], noise sd U[0, {config.max_noise}], centred at "
          f"{list(target) if target else None}; last {config.heldout} held out"
        ),
        "config": dataclasses.asdict(config),
        **metrics,
      },
    }
  )
  path = priors.export_prior(
    score_model,
    export_dir,
    metadata,
    version=version,
    orientation_model=model,
  )
  logging.info(
    "Exported %s (held-out accuracy %.4f degraded, %.4f clean).",
    path,
    metrics["heldout_accuracy"],
    metrics["heldout_accuracy_clean"],
  )
  return path
