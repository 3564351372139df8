"""absl flags shared by the trainer mains (only the mains import this)."""

from absl import flags

from trainers import training


def define_common_flags(name, steps, batch_size, learning_rate, warmup_steps,
                        ema_decay):
  """Defines the flags of `training.TrainConfig` with per-trainer defaults."""
  flags.DEFINE_string('name', name, 'Prior name: saved_models/<name>/<version>.')
  flags.DEFINE_integer('steps', steps, 'Total optimisation steps (a resumed '
                       'run continues up to this count).')
  flags.DEFINE_integer('batch_size', batch_size, 'Examples per step.')
  flags.DEFINE_float('learning_rate', learning_rate, 'Peak Adam learning rate.')
  flags.DEFINE_integer('warmup_steps', warmup_steps, 'Linear warm-up steps.')
  flags.DEFINE_float('final_lr_fraction', 0.1,
                     'Cosine decay ends at this fraction of the peak rate.')
  flags.DEFINE_float('grad_clip', 1.0, 'Global-norm gradient clip (0: none).')
  flags.DEFINE_float('weight_decay', 0.0,
                     'Decoupled weight decay (AdamW) when > 0.')
  flags.DEFINE_float('ema_decay', ema_decay, 'EMA decay of exported weights.')
  flags.DEFINE_integer('seed', 0, 'Seed of data order, noise and init.')
  flags.DEFINE_string('checkpoint_dir', '',
                      'Checkpoint and TensorBoard folder (default '
                      '~/.cache/mtd_tf/<name>/). Training resumes from it.')
  flags.DEFINE_float('checkpoint_every_secs', 180.0,
                     'Seconds between checkpoints.')
  flags.DEFINE_integer('log_every_steps', 100, 'Steps between log lines.')
  flags.DEFINE_integer('heldout_every_steps', 500,
                       'Steps between held-out evaluations.')
  flags.DEFINE_string('export_dir', '',
                      'SavedModel version folder written at the end (default '
                      'saved_models/<name>/<version>; "none" skips export).')
  flags.DEFINE_integer('version', 1, 'Version folder number of the export.')
  flags.DEFINE_bool('export_only', False,
                    'Export the latest checkpoint without training.')


def train_config_from_flags(flag_values) -> training.TrainConfig:
  """Builds the frozen TrainConfig from parsed flags."""
  f = flag_values
  if f.export_dir == 'none':
    export_dir = ''
  else:
    export_dir = f.export_dir or f'saved_models/{f.name}/{f.version}'
  return training.TrainConfig(
      name=f.name, steps=f.steps, batch_size=f.batch_size,
      learning_rate=f.learning_rate, warmup_steps=f.warmup_steps,
      final_lr_fraction=f.final_lr_fraction, grad_clip=f.grad_clip, weight_decay=f.weight_decay,
      ema_decay=f.ema_decay, seed=f.seed,
      checkpoint_dir=f.checkpoint_dir or training.default_checkpoint_dir(f.name),
      checkpoint_every_secs=f.checkpoint_every_secs,
      log_every_steps=f.log_every_steps,
      heldout_every_steps=f.heldout_every_steps, export_dir=export_dir,
      export_only=f.export_only)
