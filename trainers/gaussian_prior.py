"""The Gaussian prior of section IV.A: its data, loss, metrics and metadata.

Training data are ``num_samples`` draws of N(mu, I) on L x L images, with mu
one seeded draw from {0, ..., 4}^(L*L) (docs/conventions.md); the network is
the paper's three-layer MLP, trained by implicit score matching (eq. 5, the
exact Jacobian trace). The exact score -(x - mu) is known, so the held-out
metrics include the network's relative error against it.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mtd_tf.priors import sde as sde_lib
from trainers import configs
from trainers import export
from trainers import runs
from trainers import training

HELDOUT_SAMPLES = 1000


def gaussian_mean(data: configs.GaussianDataConfig) -> np.ndarray:
  """mu float32 [L, L], entries iid uniform on {0, ..., 4}, seeded."""
  rng = np.random.default_rng(data.mu_seed)
  size = data.image_size
  return rng.integers(0, 5, size=(size, size)).astype(np.float32)


def gaussian_samples(data: configs.GaussianDataConfig) -> np.ndarray:
  """num_samples draws of N(mu, I), float32 [num_samples, L, L]."""
  rng = np.random.default_rng(data.data_seed)
  mu = gaussian_mean(data)
  noise = rng.standard_normal((data.num_samples,) + mu.shape)
  return (mu + noise).astype(np.float32)


def _heldout_samples(data, mu) -> np.ndarray:
  """HELDOUT_SAMPLES fresh draws of N(mu, I), float32 [1000, L, L]."""
  rng = np.random.default_rng(data.data_seed + 1000)
  size = data.image_size
  noise = rng.standard_normal((HELDOUT_SAMPLES, size, size))
  return (mu + noise).astype(np.float32)


def _loss_fn(model, x, seed):
  del seed  # The exact trace draws nothing.
  return sde_lib.implicit_score_matching_loss(
    lambda a, b: model([a, b], training=True), x
  )


def _heldout_fn(fresh, mu):
  """ema_model -> the ISM loss and relative score error on fresh samples."""

  def heldout_fn(ema_model):
    def score_fn(a, b):
      return ema_model([a, b], training=False)

    loss = sde_lib.implicit_score_matching_loss(score_fn, fresh)
    pred = score_fn(tf.constant(fresh), tf.zeros([len(fresh)])).numpy()
    exact = -(fresh - mu)
    rel = np.linalg.norm(pred - exact) / np.linalg.norm(exact)
    return {"heldout_loss": float(loss), "relative_score_error": float(rel)}

  return heldout_fn


def _metadata(data, mu, sde) -> dict:
  size = data.image_size
  metadata = export.prior_metadata(
    "gaussian",
    size,
    f"gaussian_score_mlp(dim={size * size}, hidden={data.hidden}), softplus",
    sde,
  )
  metadata.update(
    {
      "mu": mu.reshape(-1).astype(float).tolist(),
      "mu_seed": data.mu_seed,
      "data_seed": data.data_seed,
      "loss": "implicit score matching, eq. (5), exact Jacobian trace",
      "training_data": (
        f"{data.num_samples} samples of N(mu, I), {size}x"
        f"{size}; mu iid uniform on {{0..4}} drawn with "
        f"numpy default_rng({data.mu_seed}), samples with "
        f"default_rng({data.data_seed})"
      ),
    }
  )
  return metadata


def gaussian_trainer(
  config: configs.TrainConfig, data: configs.GaussianDataConfig
) -> training.Trainer:
  """The Gaussian prior's data, network, loss and metadata for `train`.

  Raises:
    TrainingError: a batch larger than the training set.
  """
  configs.require(
    config.batch_size <= data.num_samples,
    f"batch_size={config.batch_size} exceeds num_samples="
    f"{data.num_samples}: lower --batch_size.",
  )
  sde = sde_lib.VPSDE()
  mu = gaussian_mean(data)
  size = data.image_size
  return training.Trainer(
    description={"trainer": "gaussian", "data": dataclasses.asdict(data)},
    network={
      "builder": "gaussian_score_mlp",
      "kwargs": {"dim": size * size, "hidden": data.hidden},
    },
    images=gaussian_samples(data),
    loss_fn=_loss_fn,
    heldout_fn=_heldout_fn(_heldout_samples(data, mu), mu),
    metadata=_metadata(data, mu, sde),
  )


def train_gaussian_prior(
  config: configs.TrainConfig,
  data: configs.GaussianDataConfig = configs.GaussianDataConfig(),
) -> runs.TrainResult:
  """Trains the Gaussian prior of section IV.A with implicit score matching.

  Loss eq. (5) (exact Jacobian trace) on ``data.num_samples`` samples of
  N(mu, I); held-out metrics on 1,000 fresh samples: the ISM loss and the
  relative L2 error against the exact score -(x - mu).

  Args:
    config: training options.
    data: data and network options.

  Returns:
    The run's `runs.TrainResult`.
  """
  return training.train(config, gaussian_trainer(config, data))
