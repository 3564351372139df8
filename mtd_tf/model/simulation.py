"""The MTD measurement model with ground truth, eq. (1)-(2).

M = sum_i R_{k_i} F placed at corner c_i, plus iid N(0, sigma^2) noise, on an
H x W grid (square N x N with N = size_factor * L in the paper). As in
section IV and docs/conventions.md: p = round(density H W / L^2) copies,
corners uniform on {0..H-L} x {0..W-L} and rejected when closer than the
minimum separation s (Chebyshev) to a planted one; rotations uniform over
Phi (or, continuous, uniform on [0, 2 pi)); SNR = ||F||_F^2 / (L^2 sigma^2).

The minimum separation s (`min_separation`, pixels, Chebyshev distance
between top-left corners):
  s = 2L (default, eq. 2 of the paper): every L x L patch meets at most one
    copy, as the patch model of eq. (9) assumes;
  L <= s < 2L: copies may touch (s = L: side by side, no gap) but never
    overlap; a patch may then meet two copies;
  1 <= s < L: copies overlap, and add where they do (as projections of
    particles that overlap in a micrograph).

`check_parameters` refuses, before any work, a request that cannot be
honoured: more copies than the separation rule can place, a measurement
larger than the machine's memory, or noise that overflows float32.

`base.memory.available_memory` and `base.memory.memory_budget` are the one home of "what this
machine can hold" for every size check of the package (the simulator's,
EM's in `em.EMOptions.check_size`, the experiments'): a refusal compares
its estimate with `memory.MEMORY_FRACTION` of the memory the kernel reports
available. The module loads no TensorFlow, so the tools' checks run before
it does.
"""

import math

import numpy as np

from mtd_tf.base import memory
from mtd_tf.base import table1
from mtd_tf.base import validation
from mtd_tf.model import io

__all__ = [
  "simulate_measurement",
  "requested_copies",
  "sigma_from_snr",
  "snr_from_sigma",
  "place_corners",
  "max_copies",
  "memory_bytes",
  "max_sigma",
  "check_parameters",
  "SimulationError",
  "rotate_continuous",
  "min_separation_of",
  "ROTATION_MODES",
  "CONTINUOUS_NUM_ROTATIONS",
  "ERROR_ANGLES",
]

# How the copies are turned: by one of the K angles 2 pi k / K ("discrete",
# the paper's) or by an angle uniform on [0, 2 pi) ("continuous", as
# particles in a micrograph).
ROTATION_MODES = ("discrete", "continuous")
# EM's K on continuous-rotation data when none is given: a grid of angles
# 22.5 degrees apart, fine enough that the nearest one is close to any turn.
CONTINUOUS_NUM_ROTATIONS = 16
# The error of an estimate of continuous-rotation data is minimised over
# this many angles, np.linspace(0, 2 pi, ERROR_ANGLES, endpoint=False).
ERROR_ANGLES = 360

# Bytes per pixel while simulating: the clean float64 image, the float64
# noise draw, their float64 sum and the float32 result.
_BYTES_PER_PIXEL = 8 + 8 + 8 + 4
# |noise| stays below this many sigma over any realistic measurement.
_NOISE_SIGMAS = 10.0


class SimulationError(ValueError):
  """A simulation request that cannot be honoured, with what to change."""


def sigma_from_snr(image, snr):
  """sigma = ||F||_F / (L sqrt(SNR)) (docs/conventions.md, section I)."""
  image = np.asarray(image, np.float64)
  snr = validation.positive_finite(snr, "snr")
  return float(np.linalg.norm(image) / (image.shape[0] * math.sqrt(snr)))


def snr_from_sigma(image, sigma):
  """SNR = ||F||_F^2 / (L^2 sigma^2)."""
  image = np.asarray(image, np.float64)
  return float(np.sum(image**2) / (image.shape[0] ** 2 * sigma**2))


def min_separation_of(image_size, min_separation=None):
  """The Chebyshev distance kept between corners, checked.

  Args:
    image_size: L.
    min_separation: pixels, an integer >= 1 (L: copies touch; below L they
      overlap); None: the paper's 2L.

  Returns:
    int, the separation s.

  Raises:
    SimulationError: min_separation is not an integer >= 1.
  """
  if min_separation is None:
    return 2 * int(image_size)
  if isinstance(min_separation, (bool, np.bool_)) or not isinstance(
    min_separation, (int, np.integer)
  ):
    raise SimulationError(
      f"min_separation must be a whole number of pixels, got "
      f"{min_separation!r}: use 2L (the paper's), L (touching copies) or "
      "down to 1 (overlapping copies)."
    )
  if int(min_separation) < 1:
    raise SimulationError(
      f"min_separation must be >= 1 pixel, got {min_separation}: use 2L "
      "(the paper's), L (touching copies) or down to 1 (overlapping copies)."
    )
  return int(min_separation)


def max_copies(measurement_shape, image_size, min_separation=None):
  """The most copies the separation rule can place in a measurement.

  Corners lie in an (H - L + 1) x (W - L + 1) box; cut it into cells of side
  s (the separation): two corners in one cell are closer than s, so each
  cell holds at most one, and the lattice of spacing s attains the bound.

  Args:
    measurement_shape: (H, W).
    image_size: L.
    min_separation: s in pixels (None: the paper's 2L).

  Returns:
    int, ceil((H - L + 1) / s) * ceil((W - L + 1) / s).
  """
  height, width = (int(v) for v in measurement_shape)
  size = int(image_size)
  spacing = min_separation_of(size, min_separation)
  return (-(-(height - size + 1) // spacing)) * (
    -(-(width - size + 1) // spacing)
  )


def memory_bytes(measurement_shape, image_size=None, num_rotations=None):
  """Bytes the simulator holds at once for a measurement of this shape.

  With image_size and num_rotations, also the taps of a rotation that is
  not a quarter turn (`rotations.rotate_image`: L^2 x 16 indices and
  weights, and the gathered pixels).
  """
  height, width = (int(v) for v in measurement_shape)
  needed = _BYTES_PER_PIXEL * height * width
  if image_size is not None and num_rotations is not None:
    if int(num_rotations) not in (1, 2, 4):
      needed += 3 * 8 * 16 * int(image_size) ** 2
  return needed


def max_sigma(image_size):
  """The largest sigma whose patches' squared norms stay finite in float32.

  The E-step keeps ||M_m||^2 of every L x L patch in float32; with
  |noise| < 10 sigma that is below (10 sigma L)^2.
  """
  return math.sqrt(float(np.finfo(np.float32).max)) / (
    _NOISE_SIGMAS * int(image_size)
  )


def requested_copies(measurement_shape, image_size, density):
  """p = round(density H W / L^2), the copies a measurement is asked for."""
  height, width = measurement_shape
  return int(round(density * height * width / image_size**2))


def check_parameters(
  image_size,
  measurement_shape,
  density,
  sigma,
  available_bytes=None,
  num_rotations=None,
  min_separation=None,
):
  """Refuses a simulation that cannot be honoured, before any work.

  Args:
    image_size: L.
    measurement_shape: (H, W).
    density: p L^2 / (H W).
    sigma: noise standard deviation.
    available_bytes: memory to fit in (default: `memory.memory_budget()`).
    num_rotations: K, to count the memory of an interpolated rotation
      (None: not counted).
    min_separation: Chebyshev distance s kept between corners, in pixels
      (None: the paper's 2L); the p copies must fit `max_copies` at it.

  Returns:
    p, the number of copies requested.

  Raises:
    SimulationError: a bad min_separation, the copies cannot be placed, the
      measurement would not fit in memory, or sigma overflows float32.
  """
  size = int(image_size)
  spacing = min_separation_of(size, min_separation)
  height, width = (int(v) for v in measurement_shape)
  if height < size or width < size:
    raise SimulationError(
      f"measurement shape {height} x {width} is smaller than the image "
      f"({size} x {size})."
    )
  needed = memory_bytes((height, width), size, num_rotations)
  budget = memory.memory_budget(available_bytes)
  if budget is not None and needed > budget:
    given = memory.budget_source(available_bytes)
    raise SimulationError(
      f"A {height} x {width} measurement of {size} x {size} images needs "
      f"about {needed / 2**30:.3g} GiB to simulate but this machine can "
      f"give it {budget / 2**30:.3g} GiB ({given}): use a smaller size "
      "factor or image."
    )
  requested = requested_copies((height, width), size, density)
  most = max_copies((height, width), size, spacing)
  if requested > most:
    closer = (
      f" or a smaller min_separation (down to {size}: touching copies)"
      if spacing > size
      else ""
    )
    raise SimulationError(
      f"density {density:.3g} asks for {requested} copies but at most "
      f"{most} fit {spacing} pixels apart in {height} x {width}: use a "
      f"density of at most {most * size**2 / (height * width):.3g}"
      f"{closer}."
    )
  limit = max_sigma(size)
  if not sigma < limit:
    raise SimulationError(
      f"sigma {sigma:.3g} overflows float32 (it must be below "
      f"{limit:.3g}): use a larger SNR or a smaller sigma."
    )
  return requested


def place_corners(
  measurement_shape,
  image_size,
  num_copies,
  rng,
  max_attempts_per_copy=2000,
  *,
  min_separation=None,
):
  """Draws corners uniformly with Chebyshev separation >= s (eq. 2: s = 2L).

  Candidates are drawn one at a time and rejected when closer than s to a
  corner already placed (the same draws for any s, so the default's corners
  are the paper's rule's).

  Args:
    measurement_shape: (H, W).
    image_size: L.
    num_copies: p, the copies wanted.
    rng: `np.random.Generator`.
    max_attempts_per_copy: candidates drawn per wanted copy at most.
    min_separation: s in pixels (None: 2L; L: touching copies; below L
      copies overlap).

  Returns:
    int64 [p', 2] corners, p' <= num_copies (fewer only if no room was found).
  """
  spacing = min_separation_of(image_size, min_separation)
  height, width = measurement_shape
  corners = np.zeros((0, 2), np.int64)
  attempts = 0
  budget = max_attempts_per_copy * max(num_copies, 1)
  while len(corners) < num_copies and attempts < budget:
    attempts += 1
    candidate = np.array(
      [
        rng.integers(0, height - image_size + 1),
        rng.integers(0, width - image_size + 1),
      ]
    )
    if len(corners):
      chebyshev = np.max(np.abs(corners - candidate), axis=1)
      if np.any(chebyshev < spacing):
        continue
    corners = np.vstack([corners, candidate])
  return corners


def rotate_continuous(image, angle):
  """The image rotated counter-clockwise by `angle` radians about its centre.

  Cubic-spline interpolation (scipy.ndimage.rotate, order 3), zero outside
  the frame; at multiples of pi / 2 it equals the exact quarter turn
  (np.rot90) up to rounding.

  Args:
    image: float [L, L].
    angle: radians.

  Returns:
    float64 [L, L].
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  return ndimage.rotate(
    np.asarray(image, np.float64),
    np.degrees(angle),
    reshape=False,
    order=3,
    mode="constant",
    cval=0.0,
  )


def simulate_measurement(
  image,
  snr=None,
  sigma=None,
  *,
  size_factor=table1.SIZE_FACTOR,
  density=table1.DENSITY,
  num_rotations=table1.NUM_ROTATIONS,
  seed=None,
  measurement_shape=None,
  continuous_rotations=False,
  min_separation=None,
):
  """Simulates an MTD measurement of `image` (eq. 1).

  Args:
    image: array [L, L], the target F.
    snr: signal-to-noise ratio ||F||^2 / (L^2 sigma^2); give snr or sigma.
    sigma: noise standard deviation; give snr or sigma.
    size_factor: N / L (Table I: 11).
    density: p L^2 / N^2 (Table I: 0.1).
    num_rotations: K, rotations drawn uniformly from {2 pi k / K}.
    seed: int (or sequence of ints) seed; the same seed gives the same
      measurement.
    measurement_shape: optional (H, W) instead of a square
      N = size_factor * L; the copy count then follows density * H W / L^2.
    continuous_rotations: rotate each copy by an angle uniform on
      [0, 2 pi) (cubic-spline interpolation about the frame centre, as in
      real micrographs) instead of one of the K angles; `rotations` then
      holds the angles in radians (float64) and num_rotations is 0.
    min_separation: Chebyshev distance between the copies' corners, in
      pixels (None: the paper's 2L, so that every L x L patch meets at most
      one copy; L: copies may touch; 1..L-1: copies overlap and add where
      they do). See the module docstring.

  Returns:
    `io.Measurement` with a float32 measurement [H, W] and the ground truth
    (image, corners, rotations, num_rotations, requested_copies).

  Raises:
    ValueError: on a non-square or non-finite image, on both or neither of
      snr and sigma, on non-positive sigma, snr, density or K, or on a
      min_separation that is not a whole number >= 1;
      `SimulationError` on a request `check_parameters` refuses.
  """
  image = validation.image_array(image)
  size = image.shape[0]
  if (snr is None) == (sigma is None):
    raise ValueError("Give exactly one of snr and sigma.")
  if sigma is None:
    sigma = sigma_from_snr(image, snr)
  sigma = validation.positive_finite(sigma, "sigma")
  density = validation.positive_finite(density, "density")
  if int(num_rotations) < 1:
    raise ValueError(f"num_rotations must be >= 1, got {num_rotations}.")
  if measurement_shape is None:
    if int(size_factor) < 1:
      raise ValueError(f"size_factor must be >= 1, got {size_factor}.")
    measurement_shape = (size_factor * size, size_factor * size)
  height, width = (int(v) for v in measurement_shape)
  requested = check_parameters(
    size,
    (height, width),
    density,
    sigma,
    num_rotations=None if continuous_rotations else int(num_rotations),
    min_separation=min_separation,
  )
  # Deferred: the rotations module loads TensorFlow, which the checks above
  # (and the tools that run them first) do not need.
  from mtd_tf.model import rotations as rotations_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  corners = place_corners(
    (height, width), size, requested, rng, min_separation=min_separation
  )
  clean = np.zeros((height, width), np.float64)  # [H, W]
  if continuous_rotations:
    rotation_ids = rng.uniform(0.0, 2 * np.pi, size=len(corners))
    for (row, col), angle in zip(corners, rotation_ids):
      copy = rotate_continuous(image, angle)  # [L, L]
      clean[row : row + size, col : col + size] += copy
  else:
    rotation_ids = rng.integers(0, num_rotations, size=len(corners))
    # Only the drawn rotations' operators: K may be huge (a fine angle grid)
    # while the copies are few.
    for (row, col), k in zip(corners, rotation_ids):
      copy = rotations_lib.rotate_image(image, int(k), int(num_rotations))
      clean[row : row + size, col : col + size] += copy  # [L, L]
  noisy = clean + sigma * rng.standard_normal((height, width))  # [H, W]
  return io.Measurement(
    measurement=noisy.astype(np.float32),
    sigma=float(sigma),
    image=image.astype(np.float32),
    corners=corners,
    rotations=(
      rotation_ids if continuous_rotations else rotation_ids.astype(np.int64)
    ),
    num_rotations=0 if continuous_rotations else int(num_rotations),
    requested_copies=requested,
  )
