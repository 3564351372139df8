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


def recommended_result(data, sigma, init):
  """The recommended method on `data` (micrographs, or streamed ones) with
  sigma and rho by EM, flattened: winner, sigma, estimate [36]."""
  # Deferred: the workers import this module before TensorFlow starts.
  import dataclasses  # pylint: disable=g-import-not-at-top

  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf import recovery  # pylint: disable=g-import-not-at-top
  from mtd_tf.recovery import recommended  # pylint: disable=g-import-not-at-top

  size = np.shape(init)[0]
  options, recovery_options = recommended.recommended_options(
    em.EMOptions(dtype="float64", chunk_size=16), size
  )
  options = dataclasses.replace(options, estimate_sigma=True)
  found = recovery.multistart_em(
    [data],
    size,
    [1.2 * sigma],
    inits=np.asarray(init)[None],
    m_step=options.m_step,
    options=options,
    recovery=recovery_options,
  )
  return np.concatenate(
    [
      [float(found.winner[0]), float(found.sigma[0]), len(found.groups)],
      found.estimate[0].ravel(),
    ]
  )
