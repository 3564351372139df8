"""Reading and writing measurements and estimates (.npz, .npy, .mrc).

A measurement file is an `.npz` with `measurement` [H, W] and, when known,
`sigma`, `image` (the truth), `corners` [p, 2], `rotations` [p],
`num_rotations`; a bare `.npy` array; or an `.mrc` micrograph (read with
`mrcfile` in permissive mode, cast to float32, pixel size in angstroms kept)
with an optional JSON sidecar `<name>.json` holding the same ground-truth
fields. Every file is written under a temporary name in its folder and
renamed when complete, so an interrupted write never leaves a partial file.
"""

import contextlib
import dataclasses
import glob
import json
import os
import tempfile
import typing

import numpy as np

__all__ = ["MeasurementFile", "load_measurement", "save_measurement",
           "save_estimate", "expand_paths", "atomic_path"]


@dataclasses.dataclass(frozen=True)
class MeasurementFile:
  """A measurement and what is known about it.

  Attributes:
    measurement: float32 [H, W].
    path: where it was read from.
    sigma: noise standard deviation, if recorded.
    image: the true image [L, L], if recorded (simulations).
    corners: int [p, 2], if recorded.
    rotations: int [p], if recorded.
    num_rotations: K used by the simulator, if recorded.
    pixel_size: angstroms per pixel (from an .mrc header), if known.
  """
  measurement: np.ndarray
  path: str = ""
  sigma: typing.Optional[float] = None
  image: typing.Optional[np.ndarray] = None
  corners: typing.Optional[np.ndarray] = None
  rotations: typing.Optional[np.ndarray] = None
  num_rotations: typing.Optional[int] = None
  pixel_size: typing.Optional[float] = None


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path`; renames it to `path` on success.

  Raises:
    FileNotFoundError: if the folder of `path` does not exist.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"Output folder {folder} does not exist; create it first "
        f"(mkdir -p {folder}) or choose another output path.")
  suffix = os.path.splitext(path)[1]
  handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
  os.close(handle)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _sidecar(path):
  return os.path.splitext(path)[0] + ".json"


def load_measurement(path):
  """Reads a measurement file (.npz, .npy or .mrc).

  Args:
    path: file path.

  Returns:
    `MeasurementFile`.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: if it cannot be read, lacks a `measurement` key (.npz), or
      has an unknown extension.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Measurement file {path} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == ".npy":
      return MeasurementFile(np.load(path, allow_pickle=False), path)
    if ext == ".npz":
      return _load_npz(path)
    if ext in (".mrc", ".mrcs", ".map"):
      return _load_mrc(path)
  except (OSError, EOFError, ValueError) as err:
    if isinstance(err, _MissingKey):
      raise
    raise ValueError(f"Could not read {path}: {err}. Is it a valid {ext} "
                     "file?") from None
  raise ValueError(f"Unknown measurement file type {ext!r} ({path}); use "
                   ".npz, .npy or .mrc.")


class _MissingKey(ValueError):
  pass


def _optional(data, key, cast):
  return cast(data[key]) if key in data.files else None


def _load_npz(path):
  with np.load(path, allow_pickle=False) as data:
    if "measurement" not in data.files:
      raise _MissingKey(
          f"{path} has no 'measurement' array (it holds {sorted(data.files)});"
          " save the measurement under the key 'measurement'.")
    return MeasurementFile(
        measurement=data["measurement"],
        path=path,
        sigma=_optional(data, "sigma", float),
        image=_optional(data, "image", np.asarray),
        corners=_optional(data, "corners", np.asarray),
        rotations=_optional(data, "rotations", np.asarray),
        num_rotations=_optional(data, "num_rotations", int),
        pixel_size=_optional(data, "pixel_size", float))


def _load_mrc(path):
  import mrcfile  # pylint: disable=g-import-not-at-top
  with mrcfile.open(path, permissive=True) as mrc:
    if mrc.data is None:
      raise ValueError("no data block")
    data = np.asarray(mrc.data, dtype=np.float32)
    if data.ndim == 3 and data.shape[0] == 1:
      data = data[0]
    voxel = float(mrc.voxel_size.x)
  truth = {}
  if os.path.isfile(_sidecar(path)):
    with open(_sidecar(path)) as f:
      truth = json.load(f)
  return MeasurementFile(
      measurement=data,
      path=path,
      sigma=truth.get("sigma"),
      image=np.asarray(truth["image"]) if "image" in truth else None,
      corners=np.asarray(truth["corners"]) if "corners" in truth else None,
      rotations=(np.asarray(truth["rotations"]) if "rotations" in truth
                 else None),
      num_rotations=truth.get("num_rotations"),
      pixel_size=voxel if voxel > 0 else None)


def save_measurement(path, measurement, *, sigma=None, image=None,
                     corners=None, rotations=None, num_rotations=None,
                     pixel_size=None):
  """Writes a measurement (.npz, .npy or .mrc with a JSON sidecar), atomically.

  Args:
    path: output path; its extension picks the format.
    measurement: array [H, W].
    sigma, image, corners, rotations, num_rotations: ground truth to record.
    pixel_size: angstroms per pixel (.mrc header; also kept in .npz).

  Raises:
    FileNotFoundError: if the output folder does not exist.
    ValueError: on an unknown extension.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  fields = {"sigma": sigma, "image": image, "corners": corners,
            "rotations": rotations, "num_rotations": num_rotations,
            "pixel_size": pixel_size}
  fields = {k: v for k, v in fields.items() if v is not None}
  measurement = np.asarray(measurement, np.float32)
  if ext == ".npz":
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, measurement=measurement,
               **{k: np.asarray(v) for k, v in fields.items()})
  elif ext == ".npy":
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.save(f, measurement)
  elif ext == ".mrc":
    _write_mrc(path, measurement, pixel_size)
    truth = {k: np.asarray(v).tolist() for k, v in fields.items()
             if k != "pixel_size"}
    if truth:
      with atomic_path(_sidecar(path)) as tmp, open(tmp, "w") as f:
        json.dump(truth, f)
  else:
    raise ValueError(f"Unknown output type {ext!r} ({path}); use .npz, .npy "
                     "or .mrc.")


def _write_mrc(path, array, pixel_size):
  import mrcfile  # pylint: disable=g-import-not-at-top
  with atomic_path(path) as tmp:
    with mrcfile.new(tmp, overwrite=True) as mrc:
      mrc.set_data(np.asarray(array, np.float32))
      if pixel_size:
        mrc.voxel_size = float(pixel_size)


def save_estimate(path, estimate, **metadata):
  """Writes an estimate [L, L] as .npz (with metadata), .npy or .mrc.

  Args:
    path: output path.
    estimate: array [L, L].
    **metadata: arrays or numbers stored beside it in an .npz
      (`pixel_size` also goes into an .mrc header).
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  estimate = np.asarray(estimate, np.float32)
  if ext == ".npz":
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, estimate=estimate, **{k: np.asarray(v) for k, v in
                                        metadata.items() if v is not None})
  elif ext == ".npy":
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.save(f, estimate)
  elif ext == ".mrc":
    _write_mrc(path, estimate, metadata.get("pixel_size"))
  else:
    raise ValueError(f"Unknown output type {ext!r} ({path}); use .npz, .npy "
                     "or .mrc.")


def expand_paths(specs):
  """Expands a list of paths and glob patterns, in order, without repeats.

  Raises:
    FileNotFoundError: if a pattern matches nothing or a path is missing.
  """
  out = []
  for spec in specs:
    spec = os.fspath(spec)
    matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not matches:
      raise FileNotFoundError(f"No file matches {spec!r}.")
    for match in matches:
      if not os.path.isfile(match):
        raise FileNotFoundError(f"Measurement file {match} does not exist.")
      if match not in out:
        out.append(match)
  return out
