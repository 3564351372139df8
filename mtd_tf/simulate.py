"""The MTD measurement model, eq. (1)-(2), and `python -m mtd_tf.simulate`.

M = sum_i R_{k_i} F placed at corner c_i, plus iid N(0, sigma^2) noise, on an
N x N grid with N = size_factor * L. As in the paper's section IV and
CONVENTIONS: p = round(density N^2 / L^2) copies, corners uniform on
{0..N-L}^2 and rejected when closer than 2L (Chebyshev) to a planted one, so
that every L x L patch meets at most one copy; rotations uniform over Phi;
SNR = ||F||_F^2 / (L^2 sigma^2).
"""

import dataclasses
import math

import numpy as np

from mtd_tf import rotations as rotations_lib
from mtd_tf import validation

__all__ = ["Measurement", "simulate_measurement", "sigma_from_snr",
           "snr_from_sigma"]


@dataclasses.dataclass(frozen=True)
class Measurement:
  """A simulated measurement and its ground truth.

  Attributes:
    measurement: float32 [N, N] (or [H, W]) noisy measurement.
    sigma: noise standard deviation.
    image: the true image [L, L].
    corners: int [p, 2] top-left (row, col) of each planted copy.
    rotations: int [p] rotation index k of each copy, angle 2 pi k / K.
    num_rotations: K.
    requested_copies: p asked for; `len(corners)` may be smaller when the
      separation rule left no room.
  """
  measurement: np.ndarray
  sigma: float
  image: np.ndarray
  corners: np.ndarray
  rotations: np.ndarray
  num_rotations: int
  requested_copies: int

  @property
  def snr(self):
    return snr_from_sigma(self.image, self.sigma)


def sigma_from_snr(image, snr):
  """sigma = ||F||_F / (L sqrt(SNR)) (CONVENTIONS, section I)."""
  image = np.asarray(image, np.float64)
  snr = validation.positive_finite(snr, "snr")
  return float(np.linalg.norm(image) / (image.shape[0] * math.sqrt(snr)))


def snr_from_sigma(image, sigma):
  """SNR = ||F||_F^2 / (L^2 sigma^2)."""
  image = np.asarray(image, np.float64)
  return float(np.sum(image**2) / (image.shape[0]**2 * sigma**2))


def place_corners(measurement_shape, image_size, num_copies, rng,
                  max_attempts_per_copy=2000):
  """Draws corners uniformly with Chebyshev separation >= 2L (eq. 2).

  Returns:
    int64 [p', 2] corners, p' <= num_copies (fewer only if no room was found).
  """
  height, width = measurement_shape
  corners = np.zeros((0, 2), np.int64)
  attempts = 0
  budget = max_attempts_per_copy * max(num_copies, 1)
  while len(corners) < num_copies and attempts < budget:
    attempts += 1
    candidate = np.array([rng.integers(0, height - image_size + 1),
                          rng.integers(0, width - image_size + 1)])
    if len(corners):
      chebyshev = np.max(np.abs(corners - candidate), axis=1)
      if np.any(chebyshev < 2 * image_size):
        continue
    corners = np.vstack([corners, candidate])
  return corners


def simulate_measurement(image, snr=None, sigma=None, *, size_factor=11,
                         density=0.1, num_rotations=4, seed=None,
                         measurement_shape=None):
  """Simulates an MTD measurement of `image` (eq. 1).

  Args:
    image: array [L, L], the target F.
    snr: signal-to-noise ratio ||F||^2 / (L^2 sigma^2); give snr or sigma.
    sigma: noise standard deviation; give snr or sigma.
    size_factor: N / L (11 in the paper).
    density: p L^2 / N^2 (0.1 in the paper).
    num_rotations: K, rotations drawn uniformly from {2 pi k / K}.
    seed: int seed; the same seed gives the same measurement.
    measurement_shape: optional (H, W), multiples of L, instead of a square
      N = size_factor * L; the copy count then follows density * H W / L^2.

  Returns:
    A `Measurement` with a float32 measurement.

  Raises:
    ValueError: on a non-square or non-finite image, on both or neither of
      snr and sigma, or on non-positive sigma, snr, density or K.
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
  if height < size or width < size:
    raise ValueError(
        f"measurement_shape {measurement_shape} is smaller than the image "
        f"({size} x {size}).")
  rng = np.random.default_rng(seed)
  requested = int(round(density * height * width / size**2))
  corners = place_corners((height, width), size, requested, rng)
  rotation_ids = rng.integers(0, num_rotations, size=len(corners))
  mats = rotations_lib.rotation_matrices(size, int(num_rotations))
  clean = np.zeros((height, width), np.float64)
  for (row, col), k in zip(corners, rotation_ids):
    copy = (mats[k] @ image.reshape(-1)).reshape(size, size)
    clean[row:row + size, col:col + size] += copy
  noisy = clean + sigma * rng.standard_normal((height, width))
  return Measurement(
      measurement=noisy.astype(np.float32),
      sigma=float(sigma),
      image=image.astype(np.float32),
      corners=corners,
      rotations=rotation_ids.astype(np.int64),
      num_rotations=int(num_rotations),
      requested_copies=requested)


# ----------------------------------------------------------------------------
# python -m mtd_tf.simulate
# ----------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("image", None, "Target image, a .npy [L, L] file.")
  flags.DEFINE_integer("digit", None,
                       "Use the shipped MNIST test digit of this class (0-9).")
  flags.DEFINE_integer("mnist_index", None,
                       "Use MNIST test-split digit number I (needs "
                       "--mnist_npz or internet).")
  flags.DEFINE_string("mnist_npz", None,
                      "MNIST .npz (x_train, y_train, x_test, y_test); default "
                      "keras.datasets.mnist.load_data().")
  flags.DEFINE_float("snr", None, "Signal-to-noise ratio ||F||^2/(L^2 sigma^2).")
  flags.DEFINE_float("sigma", None, "Noise standard deviation (instead of "
                     "--snr).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("size_factor", 11, "N / L.")
  flags.DEFINE_float("density", 0.1, "p L^2 / N^2.")
  flags.DEFINE_integer("num_rotations", 4, "K.")
  flags.DEFINE_float("pixel_size", None, "Angstroms per pixel to record "
                     "(in the .mrc header, or the .npz).")
  flags.DEFINE_string("out", "measurement.npz",
                      "Output .npz, .npy or .mrc (with a .json sidecar).")


def _target_image(flag_values):
  from mtd_tf import datasets  # pylint: disable=g-import-not-at-top
  from mtd_tf import cli  # pylint: disable=g-import-not-at-top
  chosen = [n for n in ("image", "digit", "mnist_index")
            if flag_values[n].value is not None]
  if len(chosen) != 1:
    raise cli.UsageError("Give exactly one of --image, --digit and "
                         "--mnist_index.")
  if flag_values.image is not None:
    if not flag_values.image.endswith(".npy"):
      raise cli.UsageError("--image must be a .npy file holding an [L, L] "
                           "array.")
    return np.load(flag_values.image, allow_pickle=False)
  if flag_values.digit is not None:
    if not 0 <= flag_values.digit <= 9:
      raise cli.UsageError(f"--digit must be 0..9, got {flag_values.digit}.")
    return datasets.shipped_digits()["targets"][flag_values.digit]
  (_, _), (x_test, _) = datasets.load_mnist(flag_values.mnist_npz)
  if not 0 <= flag_values.mnist_index < len(x_test):
    raise cli.UsageError(f"--mnist_index must be in 0..{len(x_test) - 1}.")
  return x_test[flag_values.mnist_index] / 255.0


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mtd_tf import cli  # pylint: disable=g-import-not-at-top
  from mtd_tf import io  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  fv = flags.FLAGS
  image = _target_image(fv)
  sim = simulate_measurement(image, snr=fv.snr, sigma=fv.sigma,
                             size_factor=fv.size_factor, density=fv.density,
                             num_rotations=fv.num_rotations, seed=fv.seed)
  io.save_measurement(fv.out, sim.measurement, sigma=sim.sigma,
                      image=sim.image, corners=sim.corners,
                      rotations=sim.rotations,
                      num_rotations=sim.num_rotations,
                      pixel_size=fv.pixel_size)
  placed = len(sim.corners)
  note = ("" if placed == sim.requested_copies else
          f" (only {placed} of {sim.requested_copies} fit the separation rule)")
  print(f"Wrote {fv.out}: {sim.measurement.shape[0]} x "
        f"{sim.measurement.shape[1]} measurement, {placed} copies{note}, "
        f"L={image.shape[0]}, SNR={sim.snr:.4g}, sigma={sim.sigma:.4g}.")


def run():
  from mtd_tf import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
