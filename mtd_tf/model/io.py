"""Reading and writing measurements and estimates (.npz, .npy, .mrc).

One record, `Measurement`, carries a measurement and what is known about it;
the simulator returns it and the readers and writers take and give it. On
disk a measurement is an `.npz` with `measurement` [H, W] and, when known,
`sigma`, `image` (the truth), `corners` [p, 2], `rotations` [p],
`num_rotations`, `pixel_size`; a bare `.npy` array; or an `.mrc` micrograph
(read with `mrcfile` in permissive mode, cast to float32, pixel size in
angstroms kept) with an optional JSON sidecar `<name>.json` holding the same
ground-truth fields. Every write goes through `mtd_tf.base.atomic` (an `.mrc` and
its sidecar are replaced together). See docs/conventions.md.
"""

import dataclasses
import errno
import glob
import json
import os
import stat
import typing
import zipfile

import numpy as np

from mtd_tf.base import atomic
from mtd_tf.base import memory

__all__ = [
  "Measurement",
  "load_measurement",
  "save_measurement",
  "save_estimate",
  "interrupted_path",
  "expand_paths",
  "read_npy",
  "sidecar_path",
  "check_input_file",
  "NotARegularFileError",
  "MEASUREMENT_EXTENSIONS",
  "ESTIMATE_EXTENSIONS",
]

MEASUREMENT_EXTENSIONS = (".npz", ".npy", ".mrc", ".mrcs", ".map")
ESTIMATE_EXTENSIONS = (".npz", ".npy", ".mrc")
_TRUTH_FIELDS = ("sigma", "image", "corners", "rotations", "num_rotations")


@dataclasses.dataclass(frozen=True)
class Measurement:
  """A measurement and what is known about it (simulated or read from disk).

  Attributes:
    measurement: float32 [H, W] noisy measurement M of eq. (1).
    sigma: noise standard deviation, if known.
    image: the true image F [L, L], if known (simulations).
    corners: int64 [p, 2] top-left (row, col) of each planted copy, if known.
    rotations: int64 [p] rotation index k of each copy (angle 2 pi k / K).
    num_rotations: K used by the simulator, if known.
    pixel_size: angstroms per pixel, if known (.mrc header).
    requested_copies: p the simulator asked for; `len(corners)` may be
      smaller when the separation rule left no room (simulations only).
    path: the file it was read from ("" when made in memory).
  """

  measurement: np.ndarray
  sigma: typing.Optional[float] = None
  image: typing.Optional[np.ndarray] = None
  corners: typing.Optional[np.ndarray] = None
  rotations: typing.Optional[np.ndarray] = None
  num_rotations: typing.Optional[int] = None
  pixel_size: typing.Optional[float] = None
  requested_copies: typing.Optional[int] = None
  path: str = ""

  def truth(self):
    """{field: value} of the recorded ground truth (None fields left out)."""
    return {
      k: getattr(self, k) for k in _TRUTH_FIELDS if getattr(self, k) is not None
    }


def sidecar_path(path):
  """The JSON sidecar of an .mrc: `<name>.json` beside it."""
  return os.path.splitext(os.fspath(path))[0] + ".json"


class _FileError(ValueError):
  """A file that was read but holds the wrong thing (its message is final)."""


class NotARegularFileError(OSError):
  """An input path that names no regular file: a FIFO, a device, a link loop."""


_SPECIAL_FILES = (
  (stat.S_ISFIFO, "a FIFO (named pipe)"),
  (stat.S_ISCHR, "a character device"),
  (stat.S_ISBLK, "a block device"),
  (stat.S_ISSOCK, "a socket"),
)


def check_input_file(path, what="Measurement file"):
  """Refuses a path that is not a regular file, saying what it is instead.

  Nothing is opened: a FIFO or a device would block or never end.

  Args:
    path: the path given.
    what: how to call it in messages.

  Raises:
    FileNotFoundError: nothing there (or a link to nothing).
    IsADirectoryError: a folder.
    NotARegularFileError: a symlink loop, a FIFO, a device or a socket.
  """
  path = os.fspath(path)
  try:
    mode = os.stat(path).st_mode
  except OSError as err:
    if err.errno == errno.ELOOP:
      raise NotARegularFileError(
        f"{what} {path} is a symlink loop (a link that leads back to "
        "itself): fix the link or give the file it should point to."
      ) from None
    if os.path.islink(path):
      raise FileNotFoundError(
        f"{what} {path} is a link to {os.readlink(path)}, which does not exist."
      ) from None
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
      raise FileNotFoundError(f"{what} {path} does not exist.") from None
    raise NotARegularFileError(
      f"{what} {path} cannot be looked at: {err.strerror}."
    ) from None
  if stat.S_ISDIR(mode):
    raise IsADirectoryError(
      f"{what} {path} is a folder: give the files in it (e.g. "
      f"{os.path.join(path, '*.mrc')})."
    )
  if not stat.S_ISREG(mode):
    kind = next(
      (name for test, name in _SPECIAL_FILES if test(mode)), "a special file"
    )
    raise NotARegularFileError(
      f"{what} {path} is {kind}, not a regular file: give a measurement "
      "file (.npz, .npy or .mrc)."
    )


def load_measurement(path):
  """Reads a measurement file (.npz, .npy or .mrc with optional sidecar).

  Args:
    path: file path.

  Returns:
    `Measurement` with `path` set.

  Raises:
    FileNotFoundError: if the file does not exist.
    OSError: a folder, FIFO, device or symlink loop (`check_input_file`).
    ValueError: if it cannot be read, lacks a `measurement` key (.npz), or
      has an unknown extension.
  """
  path = os.fspath(path)
  check_input_file(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in MEASUREMENT_EXTENSIONS:
    raise ValueError(
      f"Unknown measurement file type {ext!r} ({path}); use .npz, .npy or .mrc."
    )
  try:
    if ext == ".npy":
      return Measurement(_load_npy(path), path=path)
    if ext == ".npz":
      return _load_npz(path)
    return _load_mrc(path)
  except _FileError:
    raise
  except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
    if "allow_pickle" in str(err):
      # Not an array file at all (text, or a pickle): the numpy hint to
      # load it unsafely is the wrong advice.
      raise ValueError(
        f"Could not read {path}: it is not a NumPy {ext} "
        "file of numbers (text, or pickled objects)."
      ) from None
    raise ValueError(
      f"Could not read {path}: {err}. Is it a valid {ext} file?"
    ) from None


def _check_npy_header(stream, available, name):
  """Refuses an .npy header whose shape needs more bytes than there are.

  Reads the header only, so a header that claims 149 GiB is refused before
  anything is allocated.

  Args:
    stream: binary file positioned at the start of the .npy data.
    available: bytes in the whole .npy (file or zip member).
    name: how to call it in messages.
  """
  version = np.lib.format.read_magic(stream)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
  else:
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
  del fortran
  if dtype.hasobject:
    raise _FileError(
      f"{name} holds Python objects, not numbers: save a numeric array."
    )
  needed = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
  have = available - stream.tell()
  if needed > have:
    raise _FileError(
      f"{name}: its header claims shape {tuple(shape)} of {dtype} "
      f"({needed / 2**30:.3g} GiB) but the file holds {have} bytes of "
      "data: the file is truncated or its header is wrong."
    )
  budget = memory.memory_budget()
  if budget is not None and needed > budget:
    # A compressed .npz of zeros is small on disk and huge in memory.
    raise _FileError(
      f"{name} holds an array of shape {tuple(shape)} of {dtype}: "
      f"{memory.format_bytes(needed)} to load, more than the "
      f"{memory.format_bytes(budget)} this machine can hold "
      f"({memory.budget_source()}): crop or split it into micrographs."
    )


def read_npy(path):
  """Reads a numeric .npy array, checking its header against the file size.

  Raises:
    ValueError: a header that claims more data than the file holds, object
      arrays, or a file that is not an .npy at all.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      _check_npy_header(f, os.path.getsize(path), path)
    except _FileError:
      raise
    except ValueError:
      raise _FileError(
        f"{path} is not a NumPy .npy file (no .npy header)."
      ) from None
  return np.load(path, allow_pickle=False)


_load_npy = read_npy


def _optional(data, key, cast):
  return cast(data[key]) if key in data.files else None


def _scalar(data, key, cast, path):
  """A number stored in an .npz, or None; one line if it is not one number."""
  if key not in data.files:
    return None
  value = np.asarray(data[key])
  if (
    value.size != 1
    or not np.issubdtype(value.dtype, np.number)
    or (np.iscomplexobj(value))
  ):
    raise _FileError(
      f"{path}: '{key}' must be one real number, got shape "
      f"{value.shape} of {value.dtype}."
    )
  return cast(value.reshape(()))


def _check_npz_members(path):
  """Checks each member's .npy header against its size before loading."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    return  # np.load gives the message.
  with archive:
    for info in archive.infolist():
      if info.filename.endswith(".npy"):
        with archive.open(info) as member:
          _check_npy_header(
            member, info.file_size, f"{path}['{info.filename[:-4]}']"
          )


def _load_npz(path):
  _check_npz_members(path)
  with np.load(path, allow_pickle=False) as data:
    if "measurement" not in data.files:
      raise _FileError(
        f"{path} has no 'measurement' array (it holds {sorted(data.files)});"
        " save the measurement under the key 'measurement'."
      )
    return Measurement(
      measurement=data["measurement"],
      sigma=_scalar(data, "sigma", float, path),
      image=_optional(data, "image", np.asarray),
      corners=_optional(data, "corners", np.asarray),
      rotations=_optional(data, "rotations", np.asarray),
      num_rotations=_scalar(data, "num_rotations", int, path),
      pixel_size=_scalar(data, "pixel_size", float, path),
      path=path,
    )


def _load_mrc(path):
  import warnings  # pylint: disable=g-import-not-at-top

  import mrcfile  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    # Permissive mode warns about a header that disagrees with the file;
    # the size check below turns that into a refusal.
    warnings.simplefilter("ignore", RuntimeWarning)
    with mrcfile.open(path, permissive=True) as mrc:
      if mrc.data is None:
        raise _FileError(_missing_mrc_data(path, mrc.header))
      raw = mrc.data
      expected = 1024 + int(mrc.header.nsymbt) + raw.nbytes
      actual = os.path.getsize(path)
      if expected != actual:
        raise _FileError(
          f"{path}: its header (mode {int(mrc.header.mode)}, {raw.dtype}, "
          f"{' x '.join(map(str, raw.shape))}) needs {expected} bytes but "
          f"the file has {actual}: the header is wrong or the file "
          "truncated; fix the header (mode, nx, ny, nz) first."
        )
      if np.iscomplexobj(raw):
        raise _FileError(
          f"{path} holds complex values (mode "
          f"{int(mrc.header.mode)}): give a real micrograph."
        )
      data = np.asarray(raw, dtype=np.float32)
      if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
      voxel = float(mrc.voxel_size.x)
  truth = _read_sidecar(sidecar_path(path))

  def array(key):
    return np.asarray(truth[key]) if truth.get(key) is not None else None

  def number(key, cast):
    if truth.get(key) is None:
      return None
    try:
      return cast(truth[key])
    except (TypeError, ValueError):
      raise _FileError(
        f"sidecar {sidecar_path(path)}: '{key}' must be a "
        f"number, got {truth[key]!r}."
      ) from None

  return Measurement(
    measurement=data,
    sigma=number("sigma", float),
    image=array("image"),
    corners=array("corners"),
    rotations=array("rotations"),
    num_rotations=number("num_rotations", int),
    pixel_size=voxel if voxel > 0 else None,
    path=path,
  )


def _missing_mrc_data(path, header):
  """Why an .mrc has no data block: truncated, or no MRC header at all."""
  import mrcfile  # pylint: disable=g-import-not-at-top

  actual = os.path.getsize(path)
  try:
    dtype = mrcfile.utils.dtype_from_mode(header.mode)
  except ValueError:
    return (
      f"{path} is not an MRC file (its header's mode {int(header.mode)} is "
      "none of MRC's): the file is corrupt or of another kind."
    )
  shape = [int(header.nx), int(header.ny), int(header.nz)]
  if min(shape) < 1:
    return (
      f"{path}: its header gives the size {' x '.join(map(str, shape))}: "
      "the file is corrupt or not an MRC file."
    )
  needed = 1024 + int(header.nsymbt) + int(np.prod(shape)) * dtype.itemsize
  return (
    f"{path}: its header (mode {int(header.mode)}, {dtype}, "
    f"{' x '.join(map(str, shape))}) needs {needed} bytes but the file has "
    f"{actual}: the file is truncated (an interrupted copy?) or its header "
    "is wrong."
  )


def _read_sidecar(path):
  """The sidecar's fields ({} when there is none); one line if it is bad."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      truth = json.load(f)
  except (OSError, ValueError) as err:
    raise _FileError(
      f"Could not read the sidecar {path}: {err}; fix or remove it."
    ) from None
  if not isinstance(truth, dict):
    raise _FileError(
      f"The sidecar {path} holds a JSON {type(truth).__name__}"
      ", not an object of fields (sigma, image, ...); fix or "
      "remove it."
    )
  return truth


def _extension(path, allowed):
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in allowed:
    raise ValueError(
      f"Unknown output type {ext!r} ({path}); use {', '.join(allowed)}."
    )
  return ext


def save_measurement(path, record):
  """Writes a `Measurement` (.npz, .npy, or .mrc with a JSON sidecar).

  An `.npy` holds the bare array (the ground truth is dropped); an `.npz`
  holds everything; an `.mrc` holds the array and pixel size, its sidecar
  `<name>.json` the ground truth, and both are replaced together.

  Args:
    path: output path; its extension picks the format.
    record: `Measurement`.

  Raises:
    FileNotFoundError: if the output folder does not exist.
    ValueError: on an unknown extension.
  """
  path = os.fspath(path)
  ext = _extension(path, (".npz", ".npy", ".mrc"))
  measurement = np.asarray(record.measurement, np.float32)
  fields = record.truth()
  if record.pixel_size is not None:
    fields["pixel_size"] = record.pixel_size
  if ext == ".npz":
    with atomic.atomic_file(path) as tmp, open(tmp, "wb") as f:
      np.savez(
        f,
        measurement=measurement,
        **{k: np.asarray(v) for k, v in fields.items()},
      )
  elif ext == ".npy":
    with atomic.atomic_file(path) as tmp, open(tmp, "wb") as f:
      np.save(f, measurement)
  else:
    truth = {k: np.asarray(v).tolist() for k, v in record.truth().items()}
    if not truth:
      with atomic.atomic_file(path) as tmp:
        _write_mrc(tmp, measurement, record.pixel_size)
      return
    with atomic.atomic_files([path, sidecar_path(path)]) as (tmp, tmp_json):
      _write_mrc(tmp, measurement, record.pixel_size)
      with open(tmp_json, "w") as f:
        json.dump(truth, f)


def _write_mrc(tmp, array, pixel_size):
  import mrcfile  # pylint: disable=g-import-not-at-top

  with mrcfile.new(tmp, overwrite=True) as mrc:
    mrc.set_data(np.asarray(array, np.float32))
    if pixel_size:
      mrc.voxel_size = float(pixel_size)


def save_estimate(path, estimate, **metadata):
  """Writes an estimate [L, L] as .npz (with metadata), .npy or .mrc.

  Args:
    path: output path.
    estimate: array [L, L].
    **metadata: arrays or numbers stored beside it in an .npz (None values
      are left out; `pixel_size` also goes into an .mrc header).

  Raises:
    FileNotFoundError: if the output folder does not exist.
    ValueError: on an unknown extension.
  """
  path = os.fspath(path)
  ext = _extension(path, ESTIMATE_EXTENSIONS)
  estimate = np.asarray(estimate, np.float32)
  with atomic.atomic_file(path) as tmp:
    if ext == ".npz":
      with open(tmp, "wb") as f:
        np.savez(
          f,
          estimate=estimate,
          **{k: np.asarray(v) for k, v in metadata.items() if v is not None},
        )
    elif ext == ".npy":
      with open(tmp, "wb") as f:
        np.save(f, estimate)
    else:
      _write_mrc(tmp, estimate, metadata.get("pixel_size"))


def interrupted_path(path):
  """Where an interrupted run writes its estimate instead of `path`.

  An `.npz` carries the mark itself (`interrupted=True`), so it is `path`;
  a bare `.npy` or `.mrc` cannot, so it goes to `<name>.interrupted.npy` /
  `<name>.interrupted.mrc` beside it and `path` is not written: a partial
  estimate is never mistaken for a final one.
  """
  path = os.fspath(path)
  stem, ext = os.path.splitext(path)
  if ext.lower() == ".npz":
    return path
  return f"{stem}.interrupted{ext}"


def expand_paths(specs):
  """Expands a list of paths and glob patterns, in order, without repeats.

  Raises:
    FileNotFoundError: if a pattern matches nothing or a path is missing.
    OSError: a path that is a folder, FIFO, device or symlink loop
      (`check_input_file`).
    ValueError: an empty name (a stray comma in a list).
  """
  out, seen = [], set()
  for number, spec in enumerate(specs, 1):
    spec = os.fspath(spec)
    if not spec.strip():
      raise ValueError(
        f"Measurement {number} of {len(specs)} is an empty file name (a "
        "stray comma?): give file names separated by commas."
      )
    # A name that exists is a file, even if it looks like a pattern
    # (m[1].npz); only other names are globbed.
    if glob.has_magic(spec) and not os.path.exists(spec):
      matches = sorted(glob.glob(spec))
    else:
      matches = [spec]
    if not matches:
      raise FileNotFoundError(f"No file matches {spec!r}.")
    for match in matches:
      check_input_file(match)
      # Two spellings of one file (m.npz, ./m.npz, a link) are read once.
      real = os.path.realpath(match)
      if real not in seen:
        seen.add(real)
        out.append(match)
  return out
