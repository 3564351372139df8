"""Checks of user input, with one-line messages that say what to do.

Every public entry point of mtd_tf validates its arguments here, in numpy,
before any TensorFlow graph sees them, so that bad input never surfaces as a
traceback from deep inside TensorFlow.
"""

import math

import numpy as np

__all__ = [
  "positive_finite",
  "image_array",
  "measurement_array",
  "enough_patches",
  "MIN_PATCHES_PER_SIDE",
]

# A micrograph holds at least this many patches along each side. In the
# patch model (eq. 9) a patch holds a copy shifted by up to 2L - 1 pixels
# on each axis (zero-padded to 2L), a copy that begins in it and runs into
# its neighbours; a micrograph of one patch row or column holds no such
# neighbours, so most shifts describe copies outside it. Two patches per
# side is the least grid on which every shift of a copy lies inside.
MIN_PATCHES_PER_SIDE = 2


def positive_finite(value, name):
  """Returns float(value); raises ValueError unless finite and > 0."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(
      f"{name} must be a positive number, got {value!r}."
    ) from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be positive and finite, got {value}.")
  return value


def image_array(image, name="image"):
  """An L x L finite float64 array, or ValueError."""
  image = np.asarray(image)
  if np.iscomplexobj(image) or not (
    np.issubdtype(image.dtype, np.number) or image.dtype == bool
  ):
    # Casting would silently drop an imaginary part.
    raise ValueError(f"{name} must hold real numbers, got dtype {image.dtype}.")
  image = image.astype(np.float64)
  if image.ndim != 2 or image.shape[0] != image.shape[1] or image.size == 0:
    raise ValueError(
      f"{name} must be a non-empty square 2-D array [L, L], got shape "
      f"{image.shape}."
    )
  if not np.all(np.isfinite(image)):
    raise ValueError(f"{name} contains NaN or Inf values; clean it first.")
  return image


def measurement_array(measurement, image_size, crop=False, name="measurement"):
  """Checks a measurement against the patch grid of docs/conventions.md.

  Args:
    measurement: array [H, W].
    image_size: L.
    crop: if True, trailing rows and columns beyond a multiple of L are
      dropped; otherwise such a size is an error.
    name: how to call the array in messages.

  Returns:
    float32 array [H', W'] with H', W' multiples of L.

  Raises:
    ValueError: if the array is not 2-D, is empty, is smaller than L, holds
      NaN or Inf, or (without crop) has a side that is not a multiple of L.
  """
  array = np.asarray(measurement)
  if array.ndim != 2:
    raise ValueError(
      f"{name} must be a 2-D array [H, W], got {array.ndim}-D with shape "
      f"{array.shape}."
    )
  if array.size == 0:
    raise ValueError(f"{name} is empty (shape {array.shape}).")
  if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
    raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}.")
  size = int(image_size)
  if size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}.")
  height, width = array.shape
  if size > min(height, width):
    raise ValueError(
      f"image_size L={size} is larger than the {name} ({height} x {width}); "
      "L must fit inside it."
    )
  if height % size or width % size:
    if not crop:
      raise ValueError(
        f"{name} shape {height} x {width} is not a multiple of image_size "
        f"L={size}; crop it to {height - height % size} x "
        f"{width - width % size} (crop=True, or --crop on the command line)."
      )
    array = array[: height - height % size, : width - width % size]
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    raise ValueError(
      f"{name} contains NaN or Inf values; mask or clean them before "
      "reconstruction."
    )
  return array


def enough_patches(shape, image_size, name="measurement"):
  """Refuses a micrograph of fewer than 2 x 2 patches (MIN_PATCHES_PER_SIDE).

  Args:
    shape: (H, W) of the micrograph as EM sees it (after any crop).
    image_size: L.
    name: how to call it in messages.

  Raises:
    ValueError: a side shorter than MIN_PATCHES_PER_SIDE * L, saying what
      to change.
  """
  size = int(image_size)
  height, width = (int(n) for n in shape)
  least = MIN_PATCHES_PER_SIDE
  if height // size < least or width // size < least:
    raise ValueError(
      f"{name} is {height} x {width}: with L={size} it holds "
      f"{height // size} x {width // size} patches, and EM needs at least "
      f"{least} x {least} (sides >= {least * size}) to place a copy at "
      "every shift: give a larger micrograph or a smaller image_size."
    )
