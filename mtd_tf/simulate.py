"""`mtd-simulate`: simulates an MTD measurement of one image, with its truth.

Plants rotated copies of a target image (a .npy file, a shipped MNIST test
digit, or an MNIST test-split digit) in noise, as in section IV (N = 11 L,
density 0.1, K = 4 by default), and writes the measurement with its ground
truth (.npz, or .mrc with a .json sidecar; a .npy keeps only the array).
--rotations=continuous turns each copy by an angle uniform on [0, 2 pi)
(recorded in radians) instead of one of K; --min_separation sets how close
copies' corners may come (default 2L, the paper's: L lets copies touch,
below L they overlap and add).

Example:
  mtd-simulate --digit=3 --snr=10 --out=m.npz
"""

import dataclasses
import typing

from absl import flags

from mtd_tf import cli
from mtd_tf.base import atomic
from mtd_tf.base import table1
from mtd_tf.base import validation
from mtd_tf.model import datasets
from mtd_tf.model import io
from mtd_tf.model import simulation


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
  """What to simulate and where to write it (see the flags' help)."""

  out: str
  image: typing.Optional[str] = None
  digit: typing.Optional[int] = None
  mnist_index: typing.Optional[int] = None
  mnist_npz: typing.Optional[str] = None
  snr: typing.Optional[float] = None
  sigma: typing.Optional[float] = None
  seed: int = 0
  size_factor: int = table1.SIZE_FACTOR
  density: float = table1.DENSITY
  num_rotations: int = table1.NUM_ROTATIONS
  pixel_size: typing.Optional[float] = None
  rotations: str = "discrete"
  min_separation: typing.Optional[int] = None


def define_flags(fv):
  flags.DEFINE_string(
    "image", None, "Target image, a .npy [L, L] file.", flag_values=fv
  )
  flags.DEFINE_integer(
    "digit",
    None,
    "Use the shipped MNIST test digit of this class (0-9).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "mnist_index",
    None,
    "Use MNIST test-split digit number I (needs --mnist_npz or internet).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "mnist_npz",
    None,
    "MNIST .npz (x_train, y_train, x_test, y_test); default "
    "keras.datasets.mnist.load_data().",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "snr", None, "Signal-to-noise ratio ||F||^2/(L^2 sigma^2).", flag_values=fv
  )
  flags.DEFINE_float(
    "sigma",
    None,
    "Noise standard deviation (instead of --snr).",
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.DEFINE_integer(
    "size_factor", table1.SIZE_FACTOR, "N / L.", flag_values=fv
  )
  flags.DEFINE_float("density", table1.DENSITY, "p L^2 / N^2.", flag_values=fv)
  flags.DEFINE_integer(
    "num_rotations",
    table1.NUM_ROTATIONS,
    "K (discrete rotations only).",
    flag_values=fv,
  )
  cli.define_placement_flags(
    fv, "cubic interpolation; --num_rotations is then unused"
  )
  flags.DEFINE_float(
    "pixel_size",
    None,
    "Angstroms per pixel to record (in the .mrc header, or the .npz).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out",
    "measurement.npz",
    "Output .npz, .npy or .mrc (with a .json sidecar).",
    flag_values=fv,
  )


def _config(fv):
  """The frozen config, with the flag checks that need no data."""
  chosen = [
    n for n in ("image", "digit", "mnist_index") if fv[n].value is not None
  ]
  if len(chosen) != 1:
    raise cli.UsageError(
      "Give exactly one of --image, --digit and --mnist_index."
    )
  if (fv.snr is None) == (fv.sigma is None):
    raise cli.UsageError("Give exactly one of --snr and --sigma.")
  if fv.image is not None and not fv.image.endswith(".npy"):
    raise cli.UsageError("--image must be a .npy file holding an [L, L] array.")
  if fv.digit is not None and not 0 <= fv.digit <= 9:
    raise cli.UsageError(f"--digit must be 0..9, got {fv.digit}.")
  for name in ("snr", "sigma", "density", "pixel_size"):
    value = fv[name].value
    if value is not None and not 0 < value < float("inf"):
      raise cli.UsageError(
        f"--{name} must be positive and finite, got {value}."
      )
  if fv.size_factor < 1:
    raise cli.UsageError(f"--size_factor must be >= 1, got {fv.size_factor}.")
  if fv.num_rotations < 1:
    raise cli.UsageError(
      f"--num_rotations must be >= 1, got {fv.num_rotations}."
    )
  if fv.min_separation is not None and fv.min_separation < 1:
    raise cli.UsageError(
      f"--min_separation must be >= 1 pixel, got {fv.min_separation} "
      "(2L: the paper's; L: touching copies; below L: overlapping)."
    )
  return SimulateConfig(
    out=fv.out,
    image=fv.image,
    digit=fv.digit,
    mnist_index=fv.mnist_index,
    mnist_npz=fv.mnist_npz,
    snr=fv.snr,
    sigma=fv.sigma,
    seed=fv.seed,
    size_factor=fv.size_factor,
    density=fv.density,
    num_rotations=fv.num_rotations,
    pixel_size=fv.pixel_size,
    rotations=fv.rotations,
    min_separation=fv.min_separation,
  )


def _target_image(config):
  import numpy as np  # pylint: disable=g-import-not-at-top

  if config.image is not None:
    return np.load(config.image, allow_pickle=False)
  if config.digit is not None:
    return datasets.shipped_digits()["targets"][config.digit]
  (_, _), (x_test, _) = datasets.load_mnist(config.mnist_npz)
  if not 0 <= config.mnist_index < len(x_test):
    raise cli.UsageError(f"--mnist_index must be in 0..{len(x_test) - 1}.")
  return x_test[config.mnist_index] / 255.0


def main(fv):
  config = _config(fv)
  try:
    atomic.check_output_path(
      config.out,
      (".npz", ".npy", ".mrc"),
      inputs=[p for p in (config.image, config.mnist_npz) if p],
    )
  except (ValueError, OSError) as err:
    raise cli.UsageError(f"--out: {err}") from None
  image = validation.image_array(_target_image(config), "target image")
  size = image.shape[0]
  sigma = (
    config.sigma
    if config.sigma is not None
    else simulation.sigma_from_snr(image, config.snr)
  )
  shape = (config.size_factor * size,) * 2
  continuous = config.rotations == "continuous"
  try:
    simulation.check_parameters(
      size,
      shape,
      config.density,
      sigma,
      num_rotations=None if continuous else config.num_rotations,
      min_separation=config.min_separation,
    )
  except simulation.SimulationError as err:
    raise cli.UsageError(str(err)) from None
  sim = simulation.simulate_measurement(
    image,
    sigma=sigma,
    size_factor=config.size_factor,
    density=config.density,
    num_rotations=config.num_rotations,
    seed=config.seed,
    continuous_rotations=continuous,
    min_separation=config.min_separation,
  )
  sim = dataclasses.replace(sim, pixel_size=config.pixel_size)
  io.save_measurement(config.out, sim)
  placed = len(sim.corners)
  note = (
    ""
    if placed == sim.requested_copies
    else f" (only {placed} of {sim.requested_copies} fit the separation rule)"
  )
  snr = simulation.snr_from_sigma(sim.image, sim.sigma)
  print(
    f"Wrote {config.out}: {shape[0]} x {shape[1]} measurement, "
    f"{placed} copies{note}, L={size}, SNR={snr:.3g}, "
    f"sigma={sim.sigma:.3g}"
    + (", continuous rotations." if continuous else ".")
  )


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
