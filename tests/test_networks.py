"""Tests of mtd_tf/networks.py: shapes, dynamic batch, time conditioning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import networks
from mtd_tf import sde as sde_lib


@pytest.mark.parametrize('batch', [1, 37])
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
  with pytest.raises(ValueError, match='perfect square'):
    networks.gaussian_score_mlp(24)


@pytest.mark.parametrize('activation', ['logsigmoid', 'swish'])
@pytest.mark.parametrize('batch', [1, 37])
def test_unet_shapes_and_time_conditioning(activation, batch):
  model = networks.mnist_unet(28, channels=(8, 16, 16), embed_dim=16,
                              activation=activation, groups=4)
  convs = [l for l in model.layers
           if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
  assert 9 <= len(convs) <= 12  # "about ten convolutional layers"
  x = tf.random.uniform([batch, 28, 28])
  out_a = model([x, tf.fill([batch], 0.01)]).numpy()
  out_b = model([x, tf.fill([batch], 0.5)]).numpy()
  assert out_a.shape == (batch, 28, 28)
  assert np.all(np.isfinite(out_a))
  assert not np.allclose(out_a, out_b)


def test_unet_output_is_divided_by_sigma():
  model = networks.mnist_unet(28, channels=(8, 16, 16), embed_dim=16, groups=4)
  layer = model.get_layer('score')
  h = tf.ones([2, 28, 28])
  t = tf.constant([0.01, 0.5])
  sigma = sde_lib.VPSDE().sigma(t).numpy()
  np.testing.assert_allclose(layer(h, t).numpy()[:, 0, 0], 1.0 / sigma,
                             rtol=1e-5)


def test_unet_rejects_bad_size():
  with pytest.raises(ValueError, match='divisible'):
    networks.mnist_unet(30, channels=(8, 16, 16))


def test_unknown_activation():
  with pytest.raises(ValueError, match='Unknown activation'):
    networks.mnist_unet(28, activation='relu6x')
