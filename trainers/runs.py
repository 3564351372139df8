"""Run folders and checkpoints: where a run lives, its key, resume.

A run lives in ``<checkpoint_dir>/<run>``, where ``<run>`` is ``--run_name``
or ``<name>-<hash>`` with the hash of every setting that shapes the weights
(`weights_config`: the optimiser's hyper-parameters, the seed, the data and
the network; not ``steps``, so a run can be extended, nor where files go).
The folder holds ``run.json`` (those settings), `tf.train.CheckpointManager`
checkpoints and TensorBoard logs (``tb/``). Asking for a run whose stored
settings differ is refused, so an export's ``prior.json`` always describes
the weights it ships with.
"""

import dataclasses
import hashlib
import json
import os

from absl import logging
import keras
import tensorflow as tf

from mtd_tf.base import atomic
from trainers import configs

RUN_JSON = "run.json"
CHECKPOINTS_KEPT = 3

# The optimisation settings of `configs.TrainConfig` that shape the weights.
_WEIGHT_KEYS = (
  "batch_size",
  "learning_rate",
  "warmup_steps",
  "final_lr_fraction",
  "grad_clip",
  "weight_decay",
  "ema_decay",
  "seed",
)


def default_checkpoint_root() -> str:
  """~/.cache/mtd_tf/checkpoints (expanded): where runs live by default."""
  return os.path.join(
    os.path.expanduser("~"), ".cache", "mtd_tf", "checkpoints"
  )


def weights_config(config: configs.TrainConfig, data: dict) -> dict:
  """The settings that shape the weights: the key of a run.

  Args:
    config: the training options (their optimisation part is used).
    data: JSON-serialisable description of the trainer, its data and network.

  Returns:
    A JSON-serialisable dict, as `run.json` stores it.
  """
  shaped = {key: getattr(config, key) for key in _WEIGHT_KEYS}
  shaped.update(data)
  return json.loads(json.dumps(shaped))  # Tuples become lists, as stored.


def run_key(config: configs.TrainConfig, shaped: dict) -> str:
  """The run's folder name: run_name, or <name>-<10 hex digits of the hash>."""
  if config.run_name:
    return config.run_name
  digest = hashlib.sha256(json.dumps(shaped, sort_keys=True).encode())
  return f"{config.name}-{digest.hexdigest()[:10]}"


def check_run_folder(run_dir: str, shaped: dict):
  """Refuses (TrainingError) a run folder whose stored settings differ."""
  path = os.path.join(run_dir, RUN_JSON)
  if not os.path.exists(path):
    if tf.train.latest_checkpoint(run_dir):
      raise configs.TrainingError(
        f"{run_dir} holds checkpoints but no {RUN_JSON}: "
        "use another --run_name or --checkpoint_dir."
      )
    return
  try:
    with open(path) as f:
      stored = json.load(f)["weights_config"]
  except (OSError, ValueError, KeyError) as e:
    raise configs.TrainingError(
      f"{path} is unreadable ({e}): use another --run_name or --checkpoint_dir."
    ) from e
  for key in sorted(set(stored) | set(shaped)):
    if stored.get(key) != shaped.get(key):
      raise configs.TrainingError(
        f"Run {os.path.basename(run_dir)} was trained with {key}="
        f"{stored.get(key)!r}, not {shaped.get(key)!r}: use another "
        "--run_name (or leave it empty) or the run's settings."
      )


def open_run(config: configs.TrainConfig, shaped: dict, network: dict) -> str:
  """Checks the run's folder, creates it with its run.json; returns its path.

  Args:
    config: the training options (name, checkpoint_dir, run_name,
      export_only).
    shaped: `weights_config` of the run.
    network: the network's `networks.build_network` config, stored beside.

  Raises:
    TrainingError: a folder with other settings, or export_only without a
      checkpoint; both before anything is written.
  """
  root = config.checkpoint_dir or default_checkpoint_root()
  run_dir = os.path.join(root, run_key(config, shaped))
  check_run_folder(run_dir, shaped)
  if config.export_only and not tf.train.latest_checkpoint(run_dir):
    raise configs.TrainingError(
      f"export_only: no checkpoint in {run_dir}; train "
      "first, or give the run's --run_name and settings."
    )
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, RUN_JSON)
  if not os.path.exists(path):
    stored = {"name": config.name, "weights_config": shaped, "network": network}
    with atomic.atomic_file(path) as tmp:
      with open(tmp, "w") as f:
        json.dump(stored, f, indent=2, sort_keys=True)
  return run_dir


@dataclasses.dataclass
class TrainResult:
  """What a training run reports.

  Attributes:
    start_step: the step this session resumed at (0 for a new run).
    step: the steps trained in all, as checkpointed.
    train_loss: the last logged mean training loss (nan before any).
    heldout_loss: the last held-out loss.
    train_seconds: training time over all sessions of the run.
    run_dir: the run's folder.
    checkpoint_path: its latest checkpoint ('' if none).
    export_dir: the version folder exported ('' if none).
    metrics: the last held-out metrics, name -> float.
  """

  start_step: int
  step: int
  train_loss: float
  heldout_loss: float
  train_seconds: float
  run_dir: str
  checkpoint_path: str
  export_dir: str
  metrics: dict

  def summary(self) -> str:
    """The one-line summary the trainer tools print last, on stdout."""
    return (
      f"step {self.step} train_loss {self.train_loss:.3g} heldout_loss "
      f"{self.heldout_loss:.3g} seconds {self.train_seconds:.3g} run "
      f"{self.run_dir} export {self.export_dir or '-'}"
    )


@dataclasses.dataclass(frozen=True)
class RunState:
  """What a run's checkpoints hold, with their manager.

  Attributes:
    run_dir: the run's folder.
    model: the trained network.
    ema_model: the exponential moving average of its weights (exported).
    optimizer: its built Keras optimizer.
    step: int64 [] variable, the steps done. It advances with the weights
      (`loop`), so a checkpoint never pairs new weights with an old step.
    train_seconds: float64 [] variable, training time over all sessions.
    last_loss: float64 [] variable, the last logged mean training loss.
    last_heldout: float64 [] variable, the last held-out loss.
    manager: the run folder's `tf.train.CheckpointManager`.
  """

  run_dir: str
  model: keras.Model
  ema_model: keras.Model
  optimizer: keras.optimizers.Optimizer
  step: tf.Variable
  train_seconds: tf.Variable
  last_loss: tf.Variable
  last_heldout: tf.Variable
  manager: tf.train.CheckpointManager

  @property
  def steps_done(self) -> int:
    """The step variable's value now."""
    return int(self.step.numpy())

  def save(self) -> str:
    """Saves a checkpoint numbered by the step; returns its path."""
    return self.manager.save(checkpoint_number=self.steps_done)

  def result(self, start_step: int, metrics: dict) -> TrainResult:
    """The `TrainResult` of the variables as they are now (no export)."""
    return TrainResult(
      start_step=start_step,
      step=self.steps_done,
      train_loss=float(self.last_loss.numpy()),
      heldout_loss=float(self.last_heldout.numpy()),
      train_seconds=float(self.train_seconds.numpy()),
      run_dir=self.run_dir,
      checkpoint_path=self.manager.latest_checkpoint or "",
      export_dir="",
      metrics=metrics,
    )


def restore(run_dir, model, ema_model, optimizer) -> RunState:
  """Ties the run's variables to its checkpoints, resuming from the latest.

  Args:
    run_dir: the run's folder (`open_run`).
    model, ema_model: the two networks, built.
    optimizer: the optimizer, built on model's trainable variables.

  Returns:
    The `RunState`, restored from the latest checkpoint if there is one,
    else at step 0.
  """
  step = tf.Variable(0, dtype=tf.int64, name="step")
  seconds = tf.Variable(0.0, dtype=tf.float64, name="train_seconds")
  last_loss = tf.Variable(float("nan"), dtype=tf.float64)
  last_heldout = tf.Variable(float("nan"), dtype=tf.float64)
  # These names are the checkpoints' keys: renaming one orphans old runs.
  checkpoint = tf.train.Checkpoint(
    step=step,
    train_seconds=seconds,
    model=model,
    ema_model=ema_model,
    optimizer=optimizer,
    last_loss=last_loss,
    last_heldout=last_heldout,
  )
  manager = tf.train.CheckpointManager(
    checkpoint, run_dir, max_to_keep=CHECKPOINTS_KEPT
  )
  if manager.latest_checkpoint:
    checkpoint.restore(
      manager.latest_checkpoint
    ).assert_existing_objects_matched()
    logging.info(
      "Resumed from %s at step %d.",
      manager.latest_checkpoint,
      int(step.numpy()),
    )
  else:
    logging.info("Run %s: starting at step 0.", run_dir)
  return RunState(
    run_dir=run_dir,
    model=model,
    ema_model=ema_model,
    optimizer=optimizer,
    step=step,
    train_seconds=seconds,
    last_loss=last_loss,
    last_heldout=last_heldout,
    manager=manager,
  )
