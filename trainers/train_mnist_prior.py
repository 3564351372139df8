"""Trains the MNIST score prior (section IV.B) by denoising score matching.

  train-mnist-prior --mnist_npz=../shared/data/mnist.npz --steps=20000
  python -m trainers.train_mnist_prior --mnist_npz=../shared/data/mnist.npz \
      --steps=20000 --export_dir=saved_models/mnist_unet/1

Checkpoints go to ~/.cache/mtd_tf/mnist_unet/ (resumed automatically);
``--export_only`` exports the latest checkpoint's EMA weights.
"""

from absl import app
from absl import flags
from absl import logging

from trainers import flags_common
from trainers import training

flags_common.define_common_flags('mnist_unet', steps=20000, batch_size=64,
                                 learning_rate=1e-3, warmup_steps=200,
                                 ema_decay=0.999)
flags.DEFINE_string('mnist_npz', '',
                    'MNIST npz in keras.datasets.mnist layout (only x_train '
                    'is read). Empty: keras.datasets.mnist.load_data().')
flags.DEFINE_integer('heldout', 1024, 'Train-split images held out at the end.')
flags.DEFINE_list('channels', ['32', '64', '128'],
                  'U-Net channels per resolution level.')
flags.DEFINE_integer('embed_dim', 128, 'Time-embedding width.')
flags.DEFINE_enum('activation', 'swish', ['swish', 'logsigmoid', 'softplus'],
                  "Activation ('logsigmoid' is the paper's).")
flags.DEFINE_float('eps', 1e-5, 'Smallest diffusion time of the loss.')

FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = flags_common.train_config_from_flags(FLAGS)
  data = training.MnistDataConfig(
      mnist_npz=FLAGS.mnist_npz, heldout=FLAGS.heldout,
      channels=tuple(int(c) for c in FLAGS.channels),
      embed_dim=FLAGS.embed_dim, activation=FLAGS.activation, eps=FLAGS.eps)
  result = training.train_mnist_prior(config, data)
  logging.info('Done: %s', result)
  print(f'step {result.step} train_loss {result.train_loss:.4f} heldout_loss '
        f'{result.heldout_loss:.4f} seconds {result.train_seconds:.0f} '
        f'export {result.export_dir or "-"}')


def run():
  app.run(main)


if __name__ == '__main__':
  run()
