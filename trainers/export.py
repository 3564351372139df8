"""Export of a trained prior: its prior.json metadata and the export call.

A prior's ``prior.json`` (`mtd_tf.priors.export_prior`) holds what its kind
needs to be loaded (`prior_metadata`), how it was trained (`run_metadata`:
the run's stored settings and the number of steps actually trained, so it
always describes the weights it ships with) and where it came from.
Published versions never change: an existing version is refused before any
work (`check_target`), and so is an export folder that could not be
written (`configs.check_export_dir`: a file in its place, a read-only
parent).
"""

import os
import time

from absl import logging
import keras

import mtd_tf
from mtd_tf import priors
from mtd_tf.base import table1
from mtd_tf.priors import sde as sde_lib
from trainers import configs
from trainers import runs


def utc_now() -> str:
  """The time now, e.g. '2024-05-01T12:00:00Z', as prior.json records it."""
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def refuse_existing_version(export_dir: str, version: int | None):
  """TrainingError if export_dir/version exists (None: the next free one)."""
  if version is None:
    return
  target = os.path.join(export_dir, str(version))
  if os.path.exists(target):
    raise configs.TrainingError(
      f"{target} exists and published versions never "
      "change: pass another --export_version (or none for "
      "the next free one), or --overwrite."
    )


def check_target(config: configs.TrainConfig):
  """Refuses, before any work, an export folder that cannot be written or
  an existing version."""
  if config.export_dir:
    configs.check_export_dir(config.export_dir)
    if not config.overwrite:
      refuse_existing_version(config.export_dir, config.version)


def prior_metadata(
  kind: str, image_size: int, architecture: str, sde: sde_lib.VPSDE
) -> dict:
  """The prior.json entries every score prior of the trainers carries.

  Args:
    kind: 'gaussian' or 'mnist'.
    image_size: L of the prior's L x L images.
    architecture: a one-line description of the network.
    sde: the VP-SDE the network was trained for.
  """
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


def run_metadata(
  config: configs.TrainConfig, result: runs.TrainResult, device: str
) -> dict:
  """The prior.json entries that say how the exported weights were trained.

  Args:
    config: the training options.
    result: the run's `runs.TrainResult` before the export.
    device: the machine that trained (`loop.device_description`).
  """
  return {
    "run": os.path.basename(result.run_dir),
    "steps": result.step,
    "training_time_seconds": round(result.train_seconds, 1),
    "device": device,
    "final_train_loss": result.train_loss,
    "final_heldout_loss": result.heldout_loss,
    "heldout_metrics": result.metrics,
    "mtd_tf_version": mtd_tf.__version__,
    "batch_size": config.batch_size,
    "learning_rate": config.learning_rate,
    "ema_decay": config.ema_decay,
    "seed": config.seed,
    "exported_at": utc_now(),
  }


def export(
  model: keras.Model, config: configs.TrainConfig, metadata: dict
) -> str:
  """Exports model as a version of config.export_dir; returns its folder.

  The version is config.version (None: the next free one), replaced only
  with config.overwrite.
  """
  path = priors.export_prior(
    model,
    config.export_dir,
    metadata,
    version=config.version,
    overwrite=config.overwrite,
  )
  logging.info("Exported %s at step %d.", path, metadata["steps"])
  return path
