"""Draws probability-flow samples from an exported prior into a PNG grid.

  python -m mtd_tf.sample_prior --prior=saved_models/mnist_unet/1 \
      --out=docs/mnist_samples.png

The probability-flow ODE (`mtd_tf.sde.probability_flow_sample`) runs in the
network's units x with the prior's raw score, from t = 1 to t = eps; samples
are mapped back to image units F = (x - offset) / scale.
"""

import os
import tempfile

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


def sample_images(prior, num_samples: int = 64, seed: int = 0,
                  eps: float = 1e-3, rtol: float = 1e-3, atol: float = 1e-3):
  """Probability-flow samples from a loaded prior.

  Args:
    prior: a `mtd_tf.priors.SavedModelPrior`.
    num_samples: how many images.
    seed: seed of the initial N(0, I) draw.
    eps, rtol, atol: see `mtd_tf.sde.probability_flow_sample`.

  Returns:
    (float32 [num_samples, L, L] images in image units, evaluations int).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtd_tf import sde as sde_lib  # pylint: disable=g-import-not-at-top
  size = prior.image_size
  score = tf.function(prior.network_score)
  x, evaluations = sde_lib.probability_flow_sample(
      score, [num_samples, size, size], prior.sde, eps=eps, rtol=rtol,
      atol=atol, seed=seed)
  images = (x.numpy() - prior.offset) / prior.scale
  return images.astype(np.float32), int(evaluations)


def save_grid(images, path: str, clip=(0.0, 1.0), title: str = ''):
  """Writes images [n, L, L] as a square grid PNG (temp file, then rename)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(images)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + (0.4 if title
                                                              else 0)))
  for ax in np.ravel(axes):
    ax.axis('off')
  for ax, image in zip(np.ravel(axes), images):
    shown = np.clip(image, *clip) if clip else image
    ax.imshow(shown, cmap='gray', vmin=clip[0] if clip else None,
              vmax=clip[1] if clip else None)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0, right=1, bottom=0,
                      top=0.93 if title else 1)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.png', dir=folder, prefix='.tmp-')
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv):
  del argv
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  prior = priors.load_prior(FLAGS.prior)
  images, evaluations = sample_images(prior, FLAGS.num_samples, FLAGS.seed,
                                      FLAGS.eps)
  clip = (0.0, 1.0) if prior.metadata.get('kind') == 'mnist' else None
  title = (f"{prior.metadata.get('kind', '')} prior, step "
           f"{prior.metadata.get('steps', '?')}, probability-flow ODE "
           f"({evaluations} score evaluations)")
  save_grid(images, FLAGS.out, clip=clip, title=title)
  print(f'Wrote {len(images)} samples to {FLAGS.out} ({evaluations} score '
        'evaluations).')


def run():
  flags.DEFINE_string('prior', 'saved_models/mnist_unet/1',
                      'Exported prior folder.')
  flags.DEFINE_string('out', 'docs/mnist_samples.png', 'Output PNG.')
  flags.DEFINE_integer('num_samples', 64, 'Number of samples.')
  flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
  flags.DEFINE_float('eps', 1e-3, 'Final diffusion time.')
  app.run(main)


if __name__ == '__main__':
  run()
