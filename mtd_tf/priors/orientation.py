"""A classifier of quarter turns: which rotation of an image is upright.

The patch likelihood (eq. 13-15) is the same for an image F and for its
rotations R_k F in Phi (eq. 11), so only the data set's convention fixes the
orientation an estimate is returned in (`gauge`). The score prior ranks
orientations only through a proxy, the size of its score ||s(R_k F, t)||
(eq. 6-8), which puts 84 % of clean MNIST test digits upright (1,000 digits,
100 per class; 13 % a half turn off, 3 % a quarter turn). This module learns
the quantity itself, p(upright | R_k F), from the prior's own training
digits: a small convolutional network trained to tell which of four quarter
turns was applied to an image (self-supervised rotation prediction,
Gidaris, Singh and Komodakis, ICLR 2018), on digits degraded like EM
estimates (blurred, noisy) and centred as `gauge.centre` centres them.
It is exported with the score network as part of the prior
(`priors.export_prior(..., orientation_model=...)`) and used by
`gauge.orientation_scores`.

Digits nearly symmetric under a half turn (a '1', a '0', an '8') and the
pair '6' / '9' stay ambiguous for any classifier; `gauge.fix_gauge` hedges
orientations by the classifier's probabilities there (`gauge.aligned_mix`).
"""

import dataclasses
import math
import time

import numpy as np

__all__ = [
  "NUM_TURNS",
  "OrientationConfig",
  "OrientationError",
  "classifier",
  "degrade",
  "training_examples",
  "upright_log_probs",
  "train_classifier",
]

# Quarter turns told apart: label k means the image was turned k times by
# np.rot90 (counter-clockwise) before it was centred.
NUM_TURNS = 4


class OrientationError(ValueError):
  """Bad input to the orientation classifier's training."""


@dataclasses.dataclass(frozen=True)
class OrientationConfig:
  """Training options of the orientation classifier.

  Attributes:
    epochs: passes over the digits; each pass draws fresh turns and
      degradations.
    batch_size: examples per step.
    learning_rate: Adam's rate.
    max_blur: Gaussian blur sd (pixels) drawn from U[0, max_blur] per image.
    max_noise: noise sd drawn from U[0, max_noise] per image (images in
      [0, 1]).
    heldout: digits at the end of the set kept out of training for the
      reported accuracy.
    seed: seeds the network's initialisation, the turns and degradations.
  """

  epochs: int = 30
  batch_size: int = 128
  learning_rate: float = 1e-3
  max_blur: float = 1.2
  max_noise: float = 0.2
  heldout: int = 1024
  seed: int = 0

  def __post_init__(self):
    checks = (
      (self.epochs >= 1, f"epochs={self.epochs} must be at least 1."),
      (
        self.batch_size >= 1,
        f"batch_size={self.batch_size} must be at least 1.",
      ),
      (
        math.isfinite(self.learning_rate) and self.learning_rate > 0,
        f"learning_rate={self.learning_rate} must be positive.",
      ),
      (
        math.isfinite(self.max_blur) and self.max_blur >= 0,
        f"max_blur={self.max_blur} must be >= 0.",
      ),
      (
        math.isfinite(self.max_noise) and self.max_noise >= 0,
        f"max_noise={self.max_noise} must be >= 0.",
      ),
      (self.heldout >= 1, f"heldout={self.heldout} must be at least 1."),
    )
    for ok, message in checks:
      if not ok:
        raise OrientationError(message)


def classifier(image_size, seed=0):
  """The network: images x float32 [B, L, L] -> logits [B, NUM_TURNS].

  Three 3x3 convolutions (32, 64, 64 channels, two 2x2 poolings) and a
  dense layer of 128: position matters (a turn moves strokes across the
  frame), so the features are flattened, not pooled globally.
  """
  import keras  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(int(seed))
  size = int(image_size)
  return keras.Sequential(
    [
      keras.Input((size, size), name="x"),
      keras.layers.Reshape((size, size, 1)),
      keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
      keras.layers.Flatten(),
      keras.layers.Dense(128, activation="relu"),
      keras.layers.Dense(NUM_TURNS, name="logits"),
    ],
    name="orientation_classifier",
  )


def degrade(images, rng, max_blur=1.2, max_noise=0.2):
  """Images blurred and noised like EM estimates.

  Args:
    images: float [B, L, L] in [0, 1].
    rng: a numpy Generator.
    max_blur: each image's blur sd is U[0, max_blur] pixels.
    max_noise: each image's noise sd is U[0, max_noise].

  Returns:
    float32 [B, L, L].
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  images = np.asarray(images, np.float64)
  out = np.empty_like(images)  # [B, L, L]
  blur = rng.uniform(0.0, max_blur, len(images))  # [B]
  for i, (image, sd) in enumerate(zip(images, blur)):
    out[i] = ndimage.gaussian_filter(image, sd) if sd > 0.05 else image
  noise = rng.uniform(0.0, max_noise, (len(images), 1, 1))  # [B, 1, 1]
  out += noise * rng.standard_normal(images.shape)
  return out.astype(np.float32)


def training_examples(images, rng, max_blur=1.2, max_noise=0.2, centre=None):
  """One labelled example per image: a random quarter turn, degraded, centred.

  Args:
    images: float [B, L, L] upright images in [0, 1].
    rng: a numpy Generator.
    max_blur, max_noise: see `degrade`.
    centre: None (examples not moved), or a callable float [B, L, L] ->
      float [B, L, L] applied to the turned examples, as
      `gauge.orientation_scores` centres its candidates, e.g.
      ``functools.partial(gauge.centre, target=(14.0, 14.0))`` (gauge sits
      on a floor above priors, so the caller passes it in).

  Returns:
    (x float32 [B, L, L], labels int32 [B]): x[i] is images[i] turned
    labels[i] times by np.rot90.
  """
  degraded = degrade(images, rng, max_blur, max_noise)  # [B, L, L]
  labels = rng.integers(0, NUM_TURNS, len(degraded)).astype(np.int32)  # [B]
  turned = np.empty_like(degraded)  # [B, L, L]
  for k in range(NUM_TURNS):
    chosen = labels == k
    turned[chosen] = np.rot90(degraded[chosen], k, axes=(1, 2))
  if centre is not None:
    turned = centre(turned)
  return np.asarray(turned, np.float32), labels


def upright_log_probs(logits):
  """log p(upright) of each image from the classifier's logits [..., 4]."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  log_norm = top[..., 0] + np.log(np.sum(np.exp(logits - top), axis=-1))
  return logits[..., 0] - log_norm


def _accuracy(model, images, rng, config, centre):
  x, labels = training_examples(
    images, rng, config.max_blur, config.max_noise, centre
  )
  logits = model.predict(x, batch_size=512, verbose=0)  # [B, 4]
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def train_classifier(images, config=OrientationConfig(), centre=None, log=None):
  """Trains the orientation classifier on upright images.

  Args:
    images: float [N, L, L] upright images in [0, 1] (the prior's training
      digits); the last `config.heldout` are held out.
    config: an `OrientationConfig`.
    centre: None, or the callable float [B, L, L] -> float [B, L, L] that
      moves examples where the prior's convention puts its images (see
      `training_examples`).
    log: callable taking one line of progress (None: silent).

  Returns:
    (model, metrics): the Keras model (x [B, L, L] -> logits [B, 4]) and a
    dict with train_accuracy, heldout_accuracy (degraded held-out digits,
    one random turn each), heldout_accuracy_clean (undegraded),
    examples_seen and training_time_seconds.

  Raises:
    OrientationError: too few images for the held-out set and a batch.
    KeyboardInterrupt: passed on (nothing is returned half-trained).
  """
  import keras  # pylint: disable=g-import-not-at-top

  images = np.asarray(images, np.float32)
  if images.ndim != 3 or images.shape[1] != images.shape[2]:
    raise OrientationError(
      f"images must be [N, L, L], got shape {images.shape}."
    )
  if len(images) < config.heldout + config.batch_size:
    raise OrientationError(
      f"{len(images)} images for heldout={config.heldout} and "
      f"batch_size={config.batch_size}: give more images or lower both."
    )
  train_x = images[: len(images) - config.heldout]  # [N - H, L, L]
  heldout_x = images[len(images) - config.heldout :]  # [H, L, L]
  rng = np.random.default_rng(config.seed)
  model = classifier(images.shape[1], config.seed)
  model.compile(
    optimizer=keras.optimizers.Adam(config.learning_rate),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  start = time.monotonic()
  train_accuracy = float("nan")
  for epoch in range(config.epochs):
    x, labels = training_examples(
      train_x[rng.permutation(len(train_x))],
      rng,
      config.max_blur,
      config.max_noise,
      centre,
    )
    history = model.fit(
      x, labels, batch_size=config.batch_size, epochs=1, verbose=0
    )
    train_accuracy = float(history.history["accuracy"][-1])
    if log is not None:
      elapsed = time.monotonic() - start
      rate = (epoch + 1) * len(train_x) / elapsed
      eta = (config.epochs - epoch - 1) * len(train_x) / rate
      log(
        f"epoch {epoch + 1}/{config.epochs}: loss "
        f"{history.history['loss'][-1]:.4f}, accuracy {train_accuracy:.4f}, "
        f"{rate:.0f} images/s, ETA {eta:.0f} s"
      )
  # The exported model carries the weights only, not the optimiser's state.
  trained = model
  model = classifier(images.shape[1], config.seed)
  model.set_weights(trained.get_weights())
  check = np.random.default_rng(config.seed + 1)
  metrics = {
    "train_accuracy": train_accuracy,
    "heldout_accuracy": _accuracy(model, heldout_x, check, config, centre),
    "heldout_accuracy_clean": _accuracy(
      model,
      heldout_x,
      check,
      dataclasses.replace(config, max_blur=0.0, max_noise=0.0),
      centre,
    ),
    "examples_seen": int(config.epochs * len(train_x)),
    "training_time_seconds": round(time.monotonic() - start, 1),
  }
  return model, metrics
