"""Tests of mtd_tf/datasets.py: the one MNIST reader and the shipped digits."""

import numpy as np
import pytest

from mtd_tf.model import datasets


def _fake_mnist(path, **overrides):
  arrays = dict(
    x_train=np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28),
    y_train=np.array([3, 4]),
    x_test=np.full((1, 28, 28), 255, np.uint8),
    y_test=np.array([7]),
  )
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


def test_load_mnist_reads_the_keras_layout(tmp_path):
  path = _fake_mnist(tmp_path / "m.npz")
  (x_train, y_train), (x_test, y_test) = datasets.load_mnist(str(path))
  assert x_train.shape == (2, 28, 28) and x_train.dtype == np.uint8
  np.testing.assert_array_equal(y_train, [3, 4])
  assert x_test.shape == (1, 28, 28) and list(y_test) == [7]


def test_mnist_images_scales_one_split(tmp_path):
  path = _fake_mnist(
    tmp_path / "m.npz", y_train=None, x_test=None, y_test=None
  )  # Only x_train: enough for training.
  x = datasets.mnist_images(str(path), "train")
  assert x.dtype == np.float32 and x.shape == (2, 28, 28)
  np.testing.assert_allclose(
    x.ravel(), (np.arange(2 * 784) % 256) / 255.0, rtol=1e-6
  )
  with pytest.raises(datasets.DatasetError, match="lacks the keys"):
    datasets.mnist_images(str(path), "test")
  with pytest.raises(datasets.DatasetError, match="split='valid'"):
    datasets.mnist_images(str(path), "valid")


def test_real_mnist(mnist_npz):
  (x_train, _), (x_test, _) = datasets.load_mnist(mnist_npz)
  assert x_train.shape[1:] == (28, 28) and x_test.shape == (10000, 28, 28)
  x = datasets.mnist_images(mnist_npz)
  assert x.shape == x_train.shape and 0.0 <= x.min() < x.max() <= 1.0


def _one_line(err):
  message = str(err.value)
  assert "\n" not in message
  return message


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    datasets.load_mnist(str(tmp_path / "absent.npz"))
  assert "--mnist_npz" in _one_line(err)


@pytest.mark.parametrize(
  "content, message",
  [
    ("text", "not an .npz file of arrays"),
    ("npy", "single array"),
    ("keys", "lacks the keys ['x_test', 'y_test']"),
    ("shape", "expected numbers [n, 28, 28]"),
  ],
)
def test_wrong_files_are_refused_in_one_line(tmp_path, content, message):
  path = tmp_path / "mnist.npz"
  if content == "text":
    path.write_text("hello")
  elif content == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros((2, 28, 28)))
  elif content == "keys":
    _fake_mnist(path, x_test=None, y_test=None)
  else:
    _fake_mnist(path, x_train=np.zeros((2, 32, 32), np.uint8))
  with pytest.raises(datasets.DatasetError) as err:
    datasets.load_mnist(str(path))
  assert message in _one_line(err)


def test_no_internet_says_pass_mnist_npz(monkeypatch):
  import keras  # pylint: disable=g-import-not-at-top

  def offline():
    raise Exception("URL fetch failure on https://storage.googleapis.com")

  monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
  for path in (None, ""):
    with pytest.raises(datasets.DatasetError) as err:
      datasets.load_mnist(path)
    assert "--mnist_npz" in _one_line(err) and "no internet" in str(err.value)


def test_shipped_digits():
  digits = datasets.shipped_digits()
  assert digits["targets"].shape == (10, 28, 28)
  assert sorted(digits["target_labels"]) == list(range(10))
  assert 0.0 <= digits["targets"].min() and digits["targets"].max() <= 1.0
  np.testing.assert_allclose(
    datasets.mnist_initialisation(), digits["init_digits"].mean(axis=0)
  )
