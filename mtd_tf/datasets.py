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

__all__ = ["load_mnist", "shipped_digits", "mnist_initialisation"]


def load_mnist(path=None):
  """Loads MNIST as uint8 arrays.

  Args:
    path: a `.npz` with x_train, y_train, x_test, y_test; None downloads with
      `keras.datasets.mnist.load_data()` (needs internet).

  Returns:
    ((x_train, y_train), (x_test, y_test)), x as uint8 [n, 28, 28].

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file lacks one of the four keys.
  """
  if path is None:
    import keras  # pylint: disable=g-import-not-at-top
    return keras.datasets.mnist.load_data()
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"MNIST file {path} does not exist; pass --mnist_npz=PATH to a file "
        "with x_train, y_train, x_test, y_test.")
  with np.load(path) as data:
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
    if missing:
      raise ValueError(f"{path} lacks the keys {sorted(missing)}; expected the "
                       "layout of keras.datasets.mnist.load_data().")
    return ((data["x_train"], data["y_train"]),
            (data["x_test"], data["y_test"]))


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
    return {"targets": data["targets"] / 255.0,
            "target_indices": data["target_indices"],
            "target_labels": data["target_labels"],
            "init_digits": data["init_digits"] / 255.0,
            "init_indices": data["init_indices"]}


def mnist_initialisation():
  """Table I's F(0) for MNIST: the mean of ten training digits, [28, 28]."""
  return shipped_digits()["init_digits"].mean(axis=0)
