"""A prior's orientation classifier: a new version with the same score.

The classifier of quarter turns (`mtd_tf.priors.orientation`) is trained on
the prior's own MNIST training digits and exported beside the prior's
unchanged Keras score network, as a new version of the prior; `gauge` then
uses it to put estimates upright.
"""

import dataclasses
import functools
import os

from absl import logging
import keras
import numpy as np

from mtd_tf import priors
from mtd_tf.model import datasets
from mtd_tf.priors import kinds
from mtd_tf.priors import orientation
from mtd_tf.recovery import gauge
from trainers import configs
from trainers import export

ARCHITECTURE = (
  "conv3x3(32)-pool-conv3x3(64)-pool-conv3x3(64)-dense(128)-dense(4), "
  "logits of np.rot90 turns"
)


def _score_network_file(prior) -> str:
  """The prior's Keras score network file; PriorError if it has none."""
  keras_file = os.path.join(prior.path, priors.KERAS_FILE)
  if not os.path.isfile(keras_file):
    raise priors.PriorError(
      f"{prior.path} has no {priors.KERAS_FILE}: extend a prior exported "
      "with its Keras model (mnist_unet/2 or later)."
    )
  return keras_file


def _check_kind(prior, source) -> None:
  """Refuses (PriorError) a prior whose data fix no orientation.

  A classifier of quarter turns learns which way up the data are: only
  kinds with an orientation convention (`kinds.convention_of`, e.g.
  MNIST's upright digits) have one to learn.
  """
  convention = kinds.convention_of(prior.metadata) or {}
  if not convention.get("orientation"):
    fixed = sorted(n for n, k in kinds.KINDS.items() if k.orientation)
    raise priors.PriorError(
      f"--source={source} is a prior of kind "
      f"{prior.metadata.get('kind', '?')!r}, whose data fix no orientation "
      f"(mtd_tf.priors.kinds): extend a prior of kind {', '.join(fixed)}."
    )


def _check_images(x, prior, source_data) -> np.ndarray:
  """The digits, refused (TrainingError) unless [N, L, L] of the prior's L,
  finite and in its kind's pixel range."""
  size = int(prior.image_size)
  configs.require(
    x.ndim == 3 and x.shape[1:] == (size, size),
    f"{source_data}: the digits are {list(x.shape[1:])} images but the "
    f"prior's are {size} x {size}.",
  )
  clip = kinds.of(prior.metadata.get("kind", "")).clip or (-np.inf, np.inf)
  return configs.check_images(x, source_data, *clip)


def _metadata(prior, config, metrics, n_images, target, mnist_npz) -> dict:
  """The source prior's prior.json with the classifier's entries added."""
  source_data = (
    os.path.basename(mnist_npz)
    if mnist_npz
    else "keras.datasets.mnist.load_data()"
  )
  metadata = dict(prior.metadata)
  metadata.update(
    {
      "exported_from": (
        f"{os.path.basename(os.path.dirname(prior.path))}/"
        f"{os.path.basename(prior.path)} (same score weights; adds the "
        "orientation classifier)"
      ),
      "exported_at": export.utc_now(),
      "orientation_classifier": {
        "architecture": ARCHITECTURE,
        "training": (
          f"MNIST train split from {source_data}: first "
          f"{n_images - config.heldout} images, each epoch a random quarter "
          f"turn, blur sd U[0, {config.max_blur}], noise sd U[0, "
          f"{config.max_noise}], centred at "
          f"{list(target) if target else None}; last {config.heldout} held "
          "out"
        ),
        "config": dataclasses.asdict(config),
        **metrics,
      },
    }
  )
  return metadata


def train_orientation_prior(
  source: str,
  export_dir: str,
  config: orientation.OrientationConfig,
  mnist_npz: str = "",
  images: np.ndarray | None = None,
  version: int | None = None,
) -> str:
  """Exports a new version of a prior with an orientation classifier.

  The score network of `source` (its ``assets.extra/score_network.keras``)
  is exported unchanged beside a classifier of quarter turns
  (`orientation.train_classifier`) trained on the same MNIST train split as
  the prior, its last ``config.heldout`` digits held out (the prior's own
  held-out digits); x_test is never read. Examples are centred where the
  prior's convention puts its images, as the gauge centres its candidates.

  Args:
    source: the prior to extend (shipped name, model or version folder).
    export_dir: model folder the new version is written into.
    config: the classifier's `orientation.OrientationConfig`.
    mnist_npz: MNIST npz (only x_train is read); '' downloads.
    images: optional float32 [N, L, L] in [0, 1] instead of the file (tests).
    version: version number to write (None: the next free one).

  Returns:
    The version folder written.

  Raises (all before training):
    TrainingError: the export folder cannot be written or the version
      exists; digits of another size than the prior's, or with NaN, Inf
      or pixels outside the kind's range.
    priors.PriorError: the source cannot be loaded, has no Keras score
      network, or is of a kind that fixes no orientation.
    datasets.DatasetError: no usable MNIST file.
  """
  configs.check_export_dir(export_dir)
  export.refuse_existing_version(export_dir, version)
  prior = priors.load_prior(source)
  _check_kind(prior, source)
  keras_file = _score_network_file(prior)
  if images is None:
    x = datasets.mnist_images(mnist_npz or None, "train")
  else:
    x = np.asarray(images, np.float32)
  _check_images(x, prior, mnist_npz or "the MNIST train split")
  score_model = keras.models.load_model(keras_file)
  target = gauge.convention_centre(prior)
  centre = (
    None if target is None else functools.partial(gauge.centre, target=target)
  )
  model, metrics = orientation.train_classifier(
    x, config, centre=centre, log=lambda line: logging.info("%s", line)
  )
  metadata = _metadata(prior, config, metrics, len(x), target, mnist_npz)
  path = priors.export_prior(
    score_model,
    export_dir,
    metadata,
    version=version,
    orientation_model=model,
  )
  logging.info(
    "Exported %s (held-out accuracy %.4f degraded, %.4f clean).",
    path,
    metrics["heldout_accuracy"],
    metrics["heldout_accuracy_clean"],
  )
  return path
