"""`train`: one score prior's training, stage by stage.

A kind of prior (`gaussian_prior`, `mnist_prior`) prepares its data and
describes itself as a `Trainer`; `train` then runs the stages every kind
shares:

1. `_open_run`: every check that can fail, before any work (the export
   target, the run folder's stored settings), then the run folder.
2. `_build_or_restore`: the seeded network, its EMA copy and the optimizer,
   restored from the run's latest checkpoint.
3. `_train`: the loop (`loop.train_steps`) up to ``config.steps``.
4. `_evaluate`: held-out metrics where the loop computed none.
5. `_export`: the EMA weights with their prior.json (`export`).

Library code never reads flags: the tools (`train_*.py`) turn flags into
the frozen configs of `configs` and call the trainers.
"""

import dataclasses

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mtd_tf.priors import networks
from trainers import configs
from trainers import export
from trainers import loop
from trainers import orientation_classifier
from trainers import runs

# Old homes of two names, for tests/test_orientation.py until it imports
# `configs` and `orientation_classifier`.
TrainingError = configs.TrainingError
train_orientation_prior = orientation_classifier.train_orientation_prior


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What one kind of score prior brings to `train`.

  Attributes:
    description: JSON-serialisable description of the kind, its data and
      network; with the optimisation settings it keys the run
      (`runs.weights_config`).
    network: the network's `networks.build_network` config.
    images: float32 [N, L, L], the training examples (`train` shuffles and
      batches them).
    loss_fn: (model, x float32 [B, L, L], seed int32 [2]) -> float32 []
      loss.
    heldout_fn: ema_model -> name -> scalar metric, 'heldout_loss' among
      them.
    metadata: the prior.json entries of this kind of prior.
  """

  description: dict
  network: dict
  images: np.ndarray
  loss_fn: loop.LossFn
  heldout_fn: loop.HeldoutFn
  metadata: dict


def shuffled_batches(
  images: np.ndarray, config: configs.TrainConfig, start_step: int
) -> tf.data.Dataset:
  """Infinite shuffled batches float32 [batch_size, L, L] of images [N, L, L].

  The order is seeded by config.seed and the step a session starts at.
  """
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.shuffle(
    len(images), seed=config.seed + start_step, reshuffle_each_iteration=True
  )
  return ds.repeat().batch(config.batch_size, drop_remainder=True).prefetch(2)


def train(config: configs.TrainConfig, trainer: Trainer) -> runs.TrainResult:
  """Trains (or resumes) the run of config and trainer, then exports it.

  Args:
    config: the options.
    trainer: the data, network, loss and metadata of one kind of prior.

  Returns:
    A `runs.TrainResult`.

  Raises:
    TrainingError: an existing export version, a run folder with other
      settings, export_only without a checkpoint (all before any work).
    KeyboardInterrupt: Ctrl-C or SIGTERM (`cli.Terminated`), after the
      checkpoint of the last completed step is saved.
  """
  shaped = runs.weights_config(config, trainer.description)
  run_dir = _open_run(config, trainer, shaped)
  state = _build_or_restore(config, trainer, run_dir)
  start_step = state.steps_done
  metrics = _train(config, trainer, state) or _evaluate(trainer, state)
  result = state.result(start_step, metrics)
  if config.export_dir:
    result = _export(config, trainer, shaped, state, result)
  return result


def _open_run(config, trainer, shaped) -> str:
  """Checks the export target and the run folder; returns the folder."""
  export.check_target(config)
  return runs.open_run(config, shaped, trainer.network)


def _build_or_restore(config, trainer, run_dir) -> runs.RunState:
  """The seeded networks and optimizer, resumed from the latest checkpoint."""
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
  state = runs.restore(run_dir, model, ema_model, optimizer)
  if state.steps_done > config.steps:
    logging.info(
      "The checkpoint is at step %d, past --steps=%d: nothing to train.",
      state.steps_done,
      config.steps,
    )
  return state


def _train(config, trainer, state) -> dict:
  """The loop up to config.steps; its last held-out metrics ({} if none)."""
  if config.export_only or state.steps_done >= config.steps:
    return {}
  # Made after keras.utils.set_random_seed: the shuffle's seed pairs with
  # the global one, so the order is the same on every run of the settings.
  dataset = shuffled_batches(trainer.images, config, state.steps_done)
  return loop.train_steps(
    config, state, dataset, trainer.loss_fn, trainer.heldout_fn
  )


def _evaluate(trainer, state) -> dict:
  """The held-out metrics of the weights as they are (nothing trained)."""
  return loop.evaluate(trainer.heldout_fn, state)


def _export(config, trainer, shaped, state, result) -> runs.TrainResult:
  """Exports the EMA weights; the result with the version folder."""
  metadata = dict(trainer.metadata)
  metadata.update(
    {
      "network": trainer.network,
      "training_config": shaped,
      **export.run_metadata(config, result, loop.device_description()),
    }
  )
  path = export.export(state.ema_model, config, metadata)
  return dataclasses.replace(result, export_dir=path)
