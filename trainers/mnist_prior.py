"""The MNIST prior of section IV.B: its data, loss, metrics and metadata.

Digits come from the MNIST train split only (`datasets.mnist_images`),
scaled to [0, 1]; the last ``heldout`` images of the split are held out. The
network is a time-conditioned U-Net trained by denoising score matching
(eq. 7, lambda(t) = sigma_t^2, t ~ U[eps, 1]); the held-out loss uses fixed
noise seeds, so it is comparable across steps and runs.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mtd_tf.model import datasets
from mtd_tf.priors import kinds
from mtd_tf.priors import networks
from mtd_tf.priors import sde as sde_lib
from trainers import configs
from trainers import export
from trainers import runs
from trainers import training

HELDOUT_BATCH = 256
HELDOUT_SEED = 12345


def _split(x, data, config):
  """(train images, held-out images): the last ones of x are held out."""
  heldout_count = min(data.heldout, len(x) // 5)
  train_x, heldout_x = x[: len(x) - heldout_count], x[len(x) - heldout_count :]
  configs.require(
    heldout_count > 0 and config.batch_size <= len(train_x),
    f"batch_size={config.batch_size} with {len(train_x)} training "
    f"images (and {heldout_count} held out): lower --batch_size or "
    "give more images.",
  )
  return train_x, heldout_x


def _network(data, size, sde) -> dict:
  return {
    "builder": "mnist_unet",
    "kwargs": {
      "image_size": size,
      "channels": list(data.channels),
      "embed_dim": data.embed_dim,
      "activation": data.activation,
      "beta_min": sde.beta_min,
      "beta_max": sde.beta_max,
    },
  }


def _loss_fn(data, sde):
  """The DSM loss (model, x0 [B, L, L], seed int32 [2]) -> float32 []."""

  def loss_fn(model, x0, seed):
    return sde_lib.denoising_score_matching_loss(
      lambda a, b: model([a, b], training=True), x0, sde, data.eps, seed=seed
    )

  return loss_fn


def _heldout_fn(data, sde, heldout_x):
  """ema_model -> {'heldout_loss'}: the mean DSM loss with fixed seeds."""
  compiled = {}  # One tf.function per EMA model, traced once.

  def heldout_fn(ema_model):
    if id(ema_model) not in compiled:
      compiled[id(ema_model)] = tf.function(
        lambda xb, seed: sde_lib.denoising_score_matching_loss(
          lambda a, b: ema_model([a, b], training=False),
          xb,
          sde,
          data.eps,
          seed=seed,
        )
      )
    batch_loss = compiled[id(ema_model)]
    losses = [
      float(
        batch_loss(
          heldout_x[i : i + HELDOUT_BATCH],
          tf.constant([HELDOUT_SEED, i], tf.int32),
        )
      )
      for i in range(0, len(heldout_x), HELDOUT_BATCH)
    ]
    return {"heldout_loss": float(np.mean(losses))}

  return heldout_fn


def _metadata(data, size, sde, train_count, heldout_count) -> dict:
  metadata = export.prior_metadata(
    "mnist",
    size,
    f"mnist_unet(channels={list(data.channels)}, embed_dim="
    f"{data.embed_dim}, activation={data.activation}), output / sigma_t",
    sde,
  )
  source = data.mnist_npz or "keras.datasets.mnist.load_data()"
  metadata.update(
    {
      "loss": "denoising score matching, eq. (7), lambda(t) = sigma_t^2, "
      f"t ~ U[{data.eps}, 1]",
      "training_data": (
        f"MNIST train split from {source}: first "
        f"{train_count} images for training, last "
        f"{heldout_count} held out; scaled to [0, 1]; "
        "x_test never used"
      ),
      "activation": data.activation,
      "channels": list(data.channels),
    }
  )
  return metadata


def mnist_trainer(
  config: configs.TrainConfig,
  data: configs.MnistDataConfig,
  images: np.ndarray | None = None,
) -> training.Trainer:
  """The MNIST prior's data, network, loss and metadata for `train`.

  Args:
    config: training options (the batch size is checked against the data).
    data: data and network options.
    images: optional float32 [N, L, L] in [0, 1] used instead of reading
      ``data.mnist_npz`` (tests).

  Raises:
    datasets.DatasetError: no usable MNIST file.
    TrainingError: too few images for the batch size, or images with NaN,
      Inf or pixels outside [0, 1].
    ValueError: an image size the U-Net cannot take.
  """
  sde = sde_lib.VPSDE()
  if images is None:
    x = datasets.mnist_images(data.mnist_npz or None, "train")
  else:
    x = np.asarray(images, np.float32)
  configs.check_images(
    x, data.mnist_npz or "the MNIST train split", *kinds.of("mnist").clip
  )
  train_x, heldout_x = _split(x, data, config)
  size = int(x.shape[1])
  network = _network(data, size, sde)
  networks.build_network(network)  # Refuses a bad size before any work.
  described = dataclasses.asdict(data)
  del described["mnist_npz"]  # Where the file is does not shape the weights.
  return training.Trainer(
    description={
      "trainer": "mnist",
      "data": described,
      "train_images": len(train_x),
      "image_size": size,
    },
    network=network,
    images=train_x,
    loss_fn=_loss_fn(data, sde),
    heldout_fn=_heldout_fn(data, sde, heldout_x),
    metadata=_metadata(data, size, sde, len(train_x), len(heldout_x)),
  )


def train_mnist_prior(
  config: configs.TrainConfig,
  data: configs.MnistDataConfig = configs.MnistDataConfig(),
  images: np.ndarray | None = None,
) -> runs.TrainResult:
  """Trains the MNIST prior of section IV.B with denoising score matching.

  Loss eq. (7) with lambda(t) = sigma_t^2, t ~ U[eps, 1]. Digits come from
  the train split only (`datasets.mnist_images`), scaled to [0, 1]; the last
  ``data.heldout`` images of the split are held out for the held-out loss
  (fixed noise seeds).

  Args:
    config: training options.
    data: data and network options.
    images: optional float32 [N, L, L] in [0, 1] used instead of reading
      ``data.mnist_npz`` (tests).

  Returns:
    The run's `runs.TrainResult`.
  """
  return training.train(config, mnist_trainer(config, data, images))
