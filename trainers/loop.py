"""The training loop: optimiser steps with an EMA, progress, Ctrl-C.

One step is one compiled call: Adam (AdamW when weight decay is set) at the
rate of `learning_rate_at` (linear warm-up, cosine decay), global-norm
gradient clipping, the update of the exponential moving average (EMA) of the
weights, and the step counter. Between steps the loop evaluates the held-out
metrics, logs progress (loss, rate, ETA) with TensorBoard scalars, and saves
a checkpoint every few minutes. Ctrl-C and SIGTERM are held until the step
in progress ends (`StepInterrupts`); the loop then saves a checkpoint of the
last completed step and re-raises.
"""

from collections.abc import Callable
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

from mtd_tf import cli
from trainers import configs
from trainers import runs

# (model, x float32 [B, L, L], seed int32 [2]) -> float32 [] loss.
LossFn = Callable[[keras.Model, tf.Tensor, tf.Tensor], tf.Tensor]
# ema_model -> name -> scalar metric, 'heldout_loss' among them.
HeldoutFn = Callable[[keras.Model], dict]


def learning_rate_at(config: configs.TrainConfig, step: int) -> float:
  """Linear warm-up then cosine decay to final_lr_fraction of the peak."""
  if step < config.warmup_steps:
    return config.learning_rate * (step + 1) / config.warmup_steps
  span = max(1, config.steps - config.warmup_steps)
  progress = min(1.0, (step - config.warmup_steps) / span)
  cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
  frac = config.final_lr_fraction
  return config.learning_rate * (frac + (1.0 - frac) * cosine)


def ema_decay_at(config: configs.TrainConfig, step: int) -> float:
  """config.ema_decay, lower early on so the EMA forgets the initial weights."""
  return min(config.ema_decay, (1.0 + step) / (10.0 + step))


def device_description() -> str:
  """A short description of the machine that trains, e.g. 'CPU (2 cores)'."""
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    return f"GPU x{len(gpus)}"
  proc = platform.processor() or platform.machine()
  return f"CPU ({os.cpu_count()} cores, {proc})"


def format_seconds(seconds: float) -> str:
  """H:MM:SS of a duration (negative durations read 0:00:00)."""
  seconds = int(max(0, seconds))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def scalar_summary(tag: str, value: float):
  """Writes a TensorBoard scalar without needing the tensorboard package.

  Same record as `tf.summary.scalar` (plugin 'scalars'), through the core
  `tf.summary.write`, so TensorBoard shows it when installed. Call inside
  ``writer.as_default(step=...)``.
  """
  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = "scalars"
  tf.summary.write(
    tag,
    tf.constant(float(value), tf.float32),
    metadata=metadata.SerializeToString(),
  )


class StepInterrupts:
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


def evaluate(heldout_fn: HeldoutFn, state: runs.RunState) -> dict:
  """The EMA weights' held-out metrics, name -> float; records their loss."""
  metrics = {k: float(v) for k, v in heldout_fn(state.ema_model).items()}
  state.last_heldout.assign(metrics["heldout_loss"])
  return metrics


def compile_step(config: configs.TrainConfig, state: runs.RunState, loss_fn):
  """The compiled step (x, seed, lr, decay) -> float32 [] loss.

  Args of the step: x float32 [B, L, L], seed int32 [2], lr and decay
  float32 []. It updates the weights, their EMA and the step counter.
  """
  model, optimizer = state.model, state.optimizer
  train_vars = model.trainable_variables
  ema_vars = state.ema_model.trainable_variables

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
    # The step advances with the weights, in one call: a checkpoint taken
    # after an interrupt never pairs new weights with an old step.
    state.step.assign_add(1)
    return loss

  return train_step


class _Progress:
  """The session's clock, log lines, training scalars and checkpoint timer."""

  def __init__(self, config, state, writer):
    self._config, self._state, self._writer = config, state, writer
    now = time.time()
    self._last_save = now
    self._segment_start = now
    self._seconds_at_start = float(state.train_seconds.numpy())
    self._window_start, self._window_losses = now, []

  def record(self, loss: float):
    """Adds a step's loss to the window; advances the run's training time."""
    self._window_losses.append(loss)
    self._state.train_seconds.assign(
      self._seconds_at_start + time.time() - self._segment_start
    )

  def log(self, step: int, lr: float, metrics: dict):
    """One log line and the training scalars of the window; a new window."""
    config, state = self._config, self._state
    mean_loss = float(np.mean(self._window_losses))
    state.last_loss.assign(mean_loss)
    elapsed = max(1e-9, time.time() - self._window_start)
    rate = len(self._window_losses) / elapsed
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
      float(state.last_heldout.numpy()),
      lr,
      rate,
      format_seconds(eta),
      format_seconds(float(state.train_seconds.numpy())),
      extra,
    )
    with self._writer.as_default(step=step):
      scalar_summary("loss", mean_loss)
      scalar_summary("learning_rate", lr)
      scalar_summary("steps_per_second", rate)
    self._writer.flush()
    self._window_start, self._window_losses = time.time(), []

  def save_if_due(self):
    """A checkpoint when checkpoint_every_secs have passed since the last."""
    if time.time() - self._last_save > self._config.checkpoint_every_secs:
      logging.info("Saved checkpoint %s.", self._state.save())
      self._last_save = time.time()

  def close(self):
    """Records the last window's loss and saves the final checkpoint."""
    if self._window_losses:
      self._state.last_loss.assign(float(np.mean(self._window_losses)))
    self._state.save()
    self._writer.flush()


def _write_scalars(writer, step: int, metrics: dict):
  with writer.as_default(step=step):
    for k, v in metrics.items():
      scalar_summary(k, v)


def train_steps(
  config: configs.TrainConfig,
  state: runs.RunState,
  dataset: tf.data.Dataset,
  loss_fn: LossFn,
  heldout_fn: HeldoutFn,
) -> dict:
  """Trains from the state's step up to config.steps.

  Args:
    config: the training options.
    state: the run's `runs.RunState` (updated in place, checkpointed).
    dataset: infinite batches x float32 [B, L, L].
    loss_fn: (model, x, seed int32 [2]) -> float32 [] loss.
    heldout_fn: ema_model -> metrics with 'heldout_loss'.

  Returns:
    The last held-out metrics (name -> float), {} if none were evaluated.

  Raises:
    FloatingPointError: a non-finite loss (nothing saved for that step).
    KeyboardInterrupt: Ctrl-C or SIGTERM (`cli.Terminated`), after the
      checkpoint of the last completed step is saved.
  """
  train_step = compile_step(config, state, loss_fn)
  writer = tf.summary.create_file_writer(os.path.join(state.run_dir, "tb"))
  iterator = iter(dataset)
  progress = _Progress(config, state, writer)
  step = state.steps_done
  metrics = {}
  logging.info(
    "%s: training steps %d to %d on %s.",
    config.name,
    step,
    config.steps,
    device_description(),
  )
  try:
    with StepInterrupts() as interrupts:
      while step < config.steps:
        interrupts.check()
        x = next(iterator)
        lr = learning_rate_at(config, step)
        loss = float(
          train_step(
            x,
            tf.constant([config.seed, step], tf.int32),
            tf.constant(lr, tf.float32),
            tf.constant(ema_decay_at(config, step), tf.float32),
          )
        )
        step = state.steps_done
        if not math.isfinite(loss):
          raise FloatingPointError(
            f"Loss is {loss} at step {step}: lower --learning_rate or "
            "resume from a checkpoint."
          )
        progress.record(loss)
        if step % config.heldout_every_steps == 0 or step == config.steps:
          metrics = evaluate(heldout_fn, state)
          _write_scalars(writer, step, metrics)
        if step % config.log_every_steps == 0 or step == config.steps:
          progress.log(step, lr, metrics)
        progress.save_if_due()
      interrupts.check()
  except KeyboardInterrupt:
    # Ctrl-C or SIGTERM: keep every completed step, then let the tool exit.
    path = state.save()
    writer.flush()
    logging.warning(
      "Interrupted at step %d: saved checkpoint %s; run the "
      "same command to resume.",
      state.steps_done,
      path,
    )
    raise
  progress.close()
  return metrics
