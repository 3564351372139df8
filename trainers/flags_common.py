"""Flags shared by the trainer tools (only the tools import this).

TensorFlow-free: the tools' --help and --version stay fast.
"""

import os

from absl import flags

from mtd_tf import cli


def define_common_flags(
  fv, name, steps, batch_size, learning_rate, warmup_steps, ema_decay
):
  """Defines the flags of `training.TrainConfig` in `fv` with these defaults."""
  flags.DEFINE_string(
    "name", name, "Prior name: the model folder's name.", flag_values=fv
  )
  flags.DEFINE_integer(
    "steps",
    steps,
    "Total optimisation steps (a resumed run continues up to this count).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size", batch_size, "Examples per step.", flag_values=fv
  )
  flags.DEFINE_float(
    "learning_rate", learning_rate, "Peak Adam learning rate.", flag_values=fv
  )
  flags.DEFINE_integer(
    "warmup_steps", warmup_steps, "Linear warm-up steps.", flag_values=fv
  )
  flags.DEFINE_float(
    "final_lr_fraction",
    0.1,
    "Cosine decay ends at this fraction of the peak rate.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "grad_clip", 1.0, "Global-norm gradient clip (0: none).", flag_values=fv
  )
  flags.DEFINE_float(
    "weight_decay",
    0.0,
    "Decoupled weight decay (AdamW) when > 0.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "ema_decay", ema_decay, "EMA decay of exported weights.", flag_values=fv
  )
  flags.DEFINE_integer(
    "seed", 0, "Seed of data order, noise and init.", flag_values=fv
  )
  flags.DEFINE_string(
    "checkpoint_dir",
    "",
    "Folder of the training runs (default "
    "~/.cache/mtd_tf/checkpoints). A run resumes from its "
    "folder there.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "run_name",
    "",
    "The run's folder name (default <name>-<hash of the "
    "settings that shape the weights>). A run name with "
    "other stored settings is refused.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "checkpoint_every_secs",
    180.0,
    "Seconds between checkpoints (one more on Ctrl-C).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "log_every_steps", 100, "Steps between log lines.", flag_values=fv
  )
  flags.DEFINE_integer(
    "heldout_every_steps",
    500,
    "Steps between held-out evaluations.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "export_dir",
    os.path.join("mtd_priors", name),
    'Model folder the SavedModel version is written into ("none": no export).',
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "export_version",
    None,
    "Version number to export (default: the next free "
    "one). Published versions never change: an existing "
    "one is refused unless --overwrite.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "overwrite", False, "Replace an existing --export_version.", flag_values=fv
  )
  flags.DEFINE_bool(
    "export_only",
    False,
    "Export the run's latest checkpoint without training.",
    flag_values=fv,
  )


def train_config_from_flags(fv):
  """The frozen `training.TrainConfig` of parsed flags.

  Raises:
    cli.UsageError: a flag value the configuration refuses.
  """
  from trainers import training  # pylint: disable=g-import-not-at-top

  export_dir = "" if fv.export_dir in ("none", "") else fv.export_dir
  return usage_checked(
    training.TrainConfig,
    name=fv.name,
    steps=fv.steps,
    batch_size=fv.batch_size,
    learning_rate=fv.learning_rate,
    warmup_steps=fv.warmup_steps,
    final_lr_fraction=fv.final_lr_fraction,
    grad_clip=fv.grad_clip,
    weight_decay=fv.weight_decay,
    ema_decay=fv.ema_decay,
    seed=fv.seed,
    checkpoint_dir=fv.checkpoint_dir,
    run_name=fv.run_name,
    checkpoint_every_secs=fv.checkpoint_every_secs,
    log_every_steps=fv.log_every_steps,
    heldout_every_steps=fv.heldout_every_steps,
    export_dir=export_dir,
    version=fv.export_version,
    overwrite=fv.overwrite,
    export_only=fv.export_only,
  )


def usage_checked(config_class, **kwargs):
  """config_class(**kwargs), its refusals (ValueError) turned into usage errors."""
  try:
    return config_class(**kwargs)
  except ValueError as err:
    raise cli.UsageError(str(err)) from err


def print_summary(result):
  """The final one-line summary on stdout."""
  print(
    f"step {result.step} train_loss {result.train_loss:.3g} heldout_loss "
    f"{result.heldout_loss:.3g} seconds {result.train_seconds:.3g} run "
    f"{result.run_dir} export {result.export_dir or '-'}"
  )
