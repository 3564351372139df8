"""Trains the 5x5 Gaussian score prior (section IV.A) by implicit score matching.

  train-gaussian-prior --steps=6000
  python -m trainers.train_gaussian_prior --steps=6000 --export_dir=saved_models/gaussian_fc/1
"""

from absl import app
from absl import flags
from absl import logging

from trainers import flags_common
from trainers import training

flags_common.define_common_flags('gaussian_fc', steps=6000, batch_size=256,
                                 learning_rate=1e-3, warmup_steps=100,
                                 ema_decay=0.999)
flags.DEFINE_integer('image_size', 5, 'L of the Gaussian images.')
flags.DEFINE_integer('num_samples', 10000, 'Training samples of N(mu, I).')
flags.DEFINE_integer('mu_seed', 2024, 'Seed of the one draw of mu.')
flags.DEFINE_integer('data_seed', 1, 'Seed of the training samples.')
flags.DEFINE_integer('hidden', 256, 'Hidden width of the MLP.')

FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = flags_common.train_config_from_flags(FLAGS)
  data = training.GaussianDataConfig(
      image_size=FLAGS.image_size, num_samples=FLAGS.num_samples,
      mu_seed=FLAGS.mu_seed, data_seed=FLAGS.data_seed, hidden=FLAGS.hidden)
  result = training.train_gaussian_prior(config, data)
  logging.info('Done: %s', result)
  print(f'step {result.step} train_loss {result.train_loss:.4f} heldout_loss '
        f'{result.heldout_loss:.4f} seconds {result.train_seconds:.0f} '
        f'metrics {result.metrics} export {result.export_dir or "-"}')


def run():
  app.run(main)


if __name__ == '__main__':
  run()
