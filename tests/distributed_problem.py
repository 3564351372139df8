"""The small EM problem shared by the distribution tests and their workers."""

import numpy as np

from mtd_tf.model import simulation


def problem():
  """(image [6, 6], sigma, init [6, 6], four micrographs of the image)."""
  rng = np.random.default_rng(21)
  image = rng.uniform(0, 1, (6, 6))
  micrographs = [
    simulation.simulate_measurement(
      image, sigma=0.4, seed=s, measurement_shape=(48, 60)
    ).measurement
    for s in range(4)
  ]
  init = image + 0.2 * rng.standard_normal(image.shape)
  return image, 0.4, init, micrographs
