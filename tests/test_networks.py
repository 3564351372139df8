"""Tests of mtd_tf/networks.py: shapes, serialisation, rebuilt shipped priors."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf.priors import networks
from mtd_tf.priors import sde as sde_lib


@pytest.mark.parametrize("batch", [1, 37])
def test_gaussian_mlp_shapes_and_layers(batch):
  model = networks.gaussian_score_mlp(25, 32)
  dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
  assert len(dense) == 3
  assert [l.units for l in dense] == [32, 32, 25]
  x = tf.random.normal([batch, 5, 5])
  out = model([x, tf.fill([batch], 0.3)])
  assert out.shape == (batch, 5, 5)
  # The paper's network ignores t.
  out2 = model([x, tf.fill([batch], 0.9)])
  np.testing.assert_allclose(out, out2)


def test_gaussian_mlp_rejects_non_square():
  with pytest.raises(ValueError, match="perfect square"):
    networks.gaussian_score_mlp(24)


@pytest.mark.parametrize("activation", ["logsigmoid", "swish"])
@pytest.mark.parametrize("batch", [1, 37])
def test_unet_shapes_and_time_conditioning(activation, batch):
  model = networks.mnist_unet(
    28, channels=(8, 16, 16), embed_dim=16, activation=activation, groups=4
  )
  convs = [
    l
    for l in model.layers
    if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
  ]
  assert 9 <= len(convs) <= 12  # "about ten convolutional layers"
  x = tf.random.uniform([batch, 28, 28])
  out_a = model([x, tf.fill([batch], 0.01)]).numpy()
  out_b = model([x, tf.fill([batch], 0.5)]).numpy()
  assert out_a.shape == (batch, 28, 28)
  assert np.all(np.isfinite(out_a))
  assert not np.allclose(out_a, out_b)


def test_unet_output_is_divided_by_sigma():
  model = networks.mnist_unet(28, channels=(8, 16, 16), embed_dim=16, groups=4)
  layer = model.get_layer("score")
  h = tf.ones([2, 28, 28])
  t = tf.constant([0.01, 0.5])
  sigma = sde_lib.VPSDE().sigma(t).numpy()
  np.testing.assert_allclose(
    layer(h, t).numpy()[:, 0, 0], 1.0 / sigma, rtol=1e-5
  )


def test_unet_rejects_bad_size():
  with pytest.raises(ValueError, match="divisible"):
    networks.mnist_unet(30, channels=(8, 16, 16))


def test_unknown_activation():
  with pytest.raises(ValueError, match="Unknown activation"):
    networks.mnist_unet(28, activation="relu6x")


REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = [("gaussian_fc/1", 5), ("mnist_unet/1", 28)]


def _tiny_unet(activation="logsigmoid"):
  return networks.mnist_unet(
    28, channels=(8, 16, 16), embed_dim=16, activation=activation, groups=4
  )


def test_no_lambda_layers_and_named_activations():
  model = _tiny_unet()
  assert not [l for l in model.layers if isinstance(l, keras.layers.Lambda)]
  acts = {
    l.activation for l in model.layers if isinstance(l, keras.layers.Activation)
  }
  assert acts == {keras.activations.log_sigmoid}


@pytest.mark.parametrize(
  "layer",
  [
    networks.GaussianFourierTime(16, scale=3.0, seed=5, name="fourier"),
    networks.DivideBySigma(0.2, 15.0, name="divide"),
  ],
)
def test_custom_layers_round_trip_their_config(layer):
  config = layer.get_config()
  clone = type(layer).from_config(config)
  assert clone.get_config() == config
  assert keras.saving.get_registered_object(
    f"mtd_tf>{type(layer).__name__}"
  ) is type(layer)


def test_divide_by_sigma_uses_its_own_sde():
  layer = networks.DivideBySigma(0.2, 15.0)
  t = tf.constant([0.01, 0.5])
  sigma = sde_lib.VPSDE(0.2, 15.0).std(t).numpy()
  np.testing.assert_allclose(
    layer(tf.ones([2, 3, 3]), t).numpy()[:, 0, 0], 1.0 / sigma, rtol=1e-6
  )


_FRESH_PROCESS = """
import sys
import numpy as np
import keras
import tensorflow as tf
import mtd_tf.priors.networks  # registers the layers
model = keras.models.load_model(sys.argv[1])
data = np.load(sys.argv[2])
x, t = tf.constant(data["x"]), tf.constant(data["t"])
before = model([x, t]).numpy()
optimizer = keras.optimizers.Adam(1e-2)
with tf.GradientTape() as tape:
  loss = tf.reduce_mean(tf.square(model([x, t], training=True)))
grads = tape.gradient(loss, model.trainable_variables)
assert all(g is not None for g in grads)
optimizer.apply_gradients(zip(grads, model.trainable_variables))
after = model([x, t]).numpy()
np.savez(sys.argv[3], before=before, after=after)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
  "build", [lambda: networks.gaussian_score_mlp(25, 16), _tiny_unet]
)
def test_keras_file_loads_in_a_fresh_process_and_trains(tmp_path, build):
  model = build()
  size = model.input_shape[0][1]
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, size, size)).astype(np.float32)
  t = np.array([0.01, 0.3, 0.9], np.float32)
  path = tmp_path / "net.keras"
  model.save(path)
  np.savez(tmp_path / "in.npz", x=x, t=t)
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  res = subprocess.run(
    [
      sys.executable,
      "-c",
      _FRESH_PROCESS,
      str(path),
      str(tmp_path / "in.npz"),
      str(tmp_path / "out.npz"),
    ],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_array_equal(out["before"], model([x, t]).numpy())
  assert not np.allclose(out["after"], out["before"])  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("name, size", SHIPPED)
def test_rebuilt_shipped_prior_matches_its_saved_model(name, size):
  folder = REPO / "saved_models" / name
  model = networks.network_from_saved_model(str(folder))
  serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
  rng = np.random.default_rng(1)
  x = tf.constant(rng.uniform(size=(5, size, size)), tf.float32)
  t = tf.constant([1e-3, 0.01, 0.1, 0.5, 1.0])
  expected = serve(x=x, t=t)["score"].numpy()
  got = model([x, t]).numpy()
  scale = np.abs(expected).max(axis=(1, 2), keepdims=True)
  np.testing.assert_array_less(np.abs(got - expected) / scale, 1e-5)


def test_network_config_of_old_and_new_prior_json():
  old = {
    "kind": "gaussian",
    "image_size": 5,
    "architecture": "gaussian_score_mlp(dim=25, hidden=256), softplus",
  }
  assert networks.network_config(old) == {
    "builder": "gaussian_score_mlp",
    "kwargs": {"dim": 25, "hidden": 256},
  }
  old_unet = {
    "kind": "mnist",
    "image_size": 28,
    "channels": [8, 16],
    "activation": "swish",
    "beta_min": 0.1,
    "beta_max": 20.0,
    "architecture": "mnist_unet(channels=[8, 16], embed_dim=16, "
    "activation=swish), output / sigma_t",
  }
  config = networks.network_config(old_unet)
  assert config["kwargs"]["embed_dim"] == 16
  assert networks.network_config({"network": config}) == config
  model = networks.build_network(config)
  assert model.get_layer("score").get_config()["beta_max"] == 20.0
  with pytest.raises(networks.NetworkError, match="no network"):
    networks.network_config(
      {"kind": "gaussian", "image_size": 5, "architecture": "exact"}
    )


def test_weights_of_another_network_are_refused(tmp_path):
  folder = REPO / "saved_models" / "gaussian_fc" / "1"
  with pytest.raises(networks.NetworkError, match="shape"):
    networks.load_weights_from_saved_model(
      networks.gaussian_score_mlp(25, 16), str(folder)
    )
  with pytest.raises(networks.NetworkError, match="missing"):
    networks.load_weights_from_saved_model(_tiny_unet(), str(folder))


@pytest.mark.parametrize("name", ["gaussian_fc", "mnist_unet"])
def test_shipped_keras_file_loads_matches_and_trains(name):
  """Each shipped prior's newest version carries a .keras file that
  keras.models.load_model reads (no custom_objects), that gives the
  SavedModel's scores, and that trains a step."""
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top

  prior = priors.load_prior(name)
  path = os.path.join(prior.path, "assets.extra", "score_network.keras")
  model = keras.models.load_model(path)
  size = prior.image_size
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (8, size, size)).astype(np.float32)
  t = rng.uniform(0.01, 1, 8).astype(np.float32)
  before = model([x, t], training=False).numpy()
  np.testing.assert_allclose(
    before,
    prior.network_score(x, t).numpy(),
    rtol=1e-5,
    atol=1e-5 * np.abs(before).max(),
  )
  optimizer = keras.optimizers.Adam(1e-3)
  weights = [w.numpy().copy() for w in model.trainable_weights]
  with tf.GradientTape() as tape:
    loss = sde_lib.denoising_score_matching_loss(
      lambda xt, tt: model([xt, tt], training=True), tf.constant(x), seed=[1, 2]
    )
  grads = tape.gradient(loss, model.trainable_weights)
  optimizer.apply_gradients(zip(grads, model.trainable_weights))
  assert np.isfinite(float(loss))
  assert any(
    not np.array_equal(w, v.numpy())
    for w, v in zip(weights, model.trainable_weights)
  )
