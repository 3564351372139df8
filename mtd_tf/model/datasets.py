"""Target images: MNIST digits (section IV B) and the shipped digit file.

MNIST comes from a local `.npz` in the layout of
`keras.datasets.mnist.load_data()` (keys x_train, y_train, x_test, y_test),
or from Keras' download when no path is given. Digits are scaled to [0, 1],
the scale the MNIST prior was trained on. The package ships a small file
with ten test-split digits (one per class, never seen by the prior) and the
ten training digits whose mean is Table I's initialisation, so that the demo
runs on a machine with nothing but the repository.
"""

import importlib.resources
import os

import numpy as np

__all__ = [
  "load_mnist",
  "mnist_images",
  "shipped_digits",
  "mnist_initialisation",
  "DatasetError",
]


class DatasetError(ValueError):
  """A data file or source that cannot be used, with what to do instead."""


_SPLITS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


def _read_mnist(path, keys):
  """The one reader of MNIST: the arrays `keys` as uint8, checked.

  Args:
    path: a `.npz` in the layout of keras.datasets.mnist.load_data(), or None
      for Keras' download (needs internet, or Keras' cached copy).
    keys: which of x_train, y_train, x_test, y_test to return.

  Returns:
    dict key -> array; x arrays uint8 [n, 28, 28], y arrays [n].
  """
  if path is None or os.fspath(path) == "":
    import keras  # pylint: disable=g-import-not-at-top

    try:
      (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(
        "Could not download MNIST with keras.datasets.mnist.load_data() "
        f"({type(e).__name__}; no internet?): pass --mnist_npz=PATH to a "
        "local mnist.npz."
      ) from e
    arrays = dict(
      x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    return {key: arrays[key] for key in keys}
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"MNIST file {path} does not exist: pass --mnist_npz=PATH to a file "
      "with x_train, y_train, x_test, y_test."
    )
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    # numpy's own message suggests allow_pickle, which would be unsafe here.
    raise DatasetError(
      f"{path} is not an .npz file of arrays: pass the "
      "mnist.npz of keras.datasets.mnist."
    ) from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise DatasetError(
      f"{path} is a single array, not an .npz with x_train, "
      "y_train, x_test, y_test: pass the mnist.npz of "
      "keras.datasets.mnist."
    )
  with data:
    missing = set(keys) - set(data.files)
    if missing:
      raise DatasetError(
        f"{path} lacks the keys {sorted(missing)}; expected "
        "the layout of keras.datasets.mnist.load_data()."
      )
    arrays = {key: data[key] for key in keys}
  for key, value in arrays.items():
    if key.startswith("x") and (
      value.ndim != 3
      or value.shape[1:] != (28, 28)
      or not np.issubdtype(value.dtype, np.number)
    ):
      raise DatasetError(
        f"{path}: {key} has shape {value.shape} and dtype "
        f"{value.dtype}, expected numbers [n, 28, 28]."
      )
  return arrays


def load_mnist(path=None):
  """Loads MNIST as uint8 arrays.

  Args:
    path: a `.npz` with x_train, y_train, x_test, y_test; None (or "")
      downloads with `keras.datasets.mnist.load_data()` (needs internet).

  Returns:
    ((x_train, y_train), (x_test, y_test)), x as uint8 [n, 28, 28].

  Raises:
    FileNotFoundError: if `path` does not exist.
    DatasetError: the file is not an .npz, lacks one of the four keys or
      holds images of another shape; or the download failed.
  """
  arrays = _read_mnist(path, _SPLITS["train"] + _SPLITS["test"])
  return (
    (arrays["x_train"], arrays["y_train"]),
    (arrays["x_test"], arrays["y_test"]),
  )


def mnist_images(path=None, split="train"):
  """One split's MNIST images scaled to [0, 1] (only x_<split> is read).

  Args:
    path: as for `load_mnist`; the file needs only the key x_<split>.
    split: "train" or "test".

  Returns:
    float32 [n, 28, 28] in [0, 1].
  """
  if split not in _SPLITS:
    raise DatasetError(f"split={split!r}: use 'train' or 'test'.")
  key = _SPLITS[split][0]
  return _read_mnist(path, (key,))[key].astype(np.float32) / 255.0


def shipped_digits():
  """The digits shipped with the package, scaled to [0, 1].

  Returns:
    dict with "targets" float64 [10, 28, 28] (test split, one per class
    0..9), "target_indices" (their indices in the MNIST test split),
    "init_digits" float64 [10, 28, 28] (the first ten training digits) and
    "init_indices".
  """
  ref = importlib.resources.files("mtd_tf") / "data" / "mnist_digits.npz"
  with importlib.resources.as_file(ref) as path, np.load(path) as data:
    return {
      "targets": data["targets"] / 255.0,
      "target_indices": data["target_indices"],
      "target_labels": data["target_labels"],
      "init_digits": data["init_digits"] / 255.0,
      "init_indices": data["init_indices"],
    }


def mnist_initialisation():
  """Table I's F(0) for MNIST: the mean of ten training digits, [28, 28]."""
  return shipped_digits()["init_digits"].mean(axis=0)
