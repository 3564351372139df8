"""Atomic outputs: a file, a set of files, or a folder appears whole or not at all.

Every output of the library goes through here. Each is written to a hidden
temporary name in the destination folder, flushed to disk (fsync), given the
permissions the user's umask asks for (temporary files are created 0600),
and renamed into place; on any error, or Ctrl-C, the temporary is removed
and nothing that existed before is touched. An OSError (a full disk, a
read-only folder) names the output being written, never a temporary.

An output that is a symbolic link is written through: the link stays and
its target is replaced (atomically, beside the target), as a shell's
``>`` or ``cp`` would write through it; a link whose target's folder is
missing is refused.
"""

import contextlib
import os
import shutil
import tempfile

__all__ = [
  "atomic_file",
  "atomic_files",
  "atomic_directory",
  "check_output_path",
]


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_file(path):
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _fsync_dir(path):
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _destination(path):
  """Where `path` is written: its link's target for a symbolic link."""
  path = os.fspath(path)
  return os.path.realpath(path) if os.path.islink(path) else path


def _folder_of(path):
  folder = os.path.dirname(os.path.abspath(_destination(path)))
  if not os.path.isdir(folder):
    link = (
      f" (where the link {os.fspath(path)} points)"
      if os.path.islink(path)
      else ""
    )
    raise FileNotFoundError(
      f"Output folder {folder}{link} does not exist: create it first "
      f"(mkdir -p {folder}) or choose another output path."
    )
  return folder


def check_output_path(path, extensions=None, inputs=()):
  """Refuses an output path before any work: one line saying what to change.

  Args:
    path: the output file the caller will write.
    extensions: allowed extensions (e.g. (".npz", ".npy", ".mrc")) or None.
    inputs: paths the run reads; the output may not be one of them (compared
      by real path, so two spellings of one file are caught).

  Returns:
    The absolute output path.

  Raises:
    ValueError: a folder, a wrong extension, or one of the inputs.
    FileNotFoundError / PermissionError: a missing or read-only folder.
  """
  path = os.fspath(path)
  absolute = os.path.abspath(path)
  if os.path.isdir(absolute):
    raise ValueError(f"Output {path} is a folder: give a file name.")
  if extensions is not None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
      raise ValueError(
        f"Output {path} has extension {ext or '(none)'!r}: use "
        f"one of {', '.join(extensions)}."
      )
  folder = _folder_of(absolute)
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PermissionError(
      f"Output folder {folder} is not writable: choose another output path."
    )
  real = os.path.realpath(absolute)
  for source in inputs:
    if os.path.realpath(os.fspath(source)) == real:
      raise ValueError(
        f"Output {path} is also an input: choose another "
        "output path so the input is not overwritten."
      )
  return absolute


def _without_temporaries(message, tmps, paths):
  for tmp, path in zip(tmps, paths):
    message = message.replace(tmp, path).replace(
      os.path.basename(tmp), os.path.basename(path)
    )
  return message


def _name_output(err, tmps, paths):
  """Makes an OSError name the output(s) being written, not a temporary.

  An error without a file name (a write that found the disk full) gets the
  output's path; one that names a temporary gets the output's instead.
  """
  if isinstance(err.filename, str):
    err.filename = _without_temporaries(err.filename, tmps, paths)
  elif err.filename is None and err.errno is not None:
    err.filename = ", ".join(paths)
  if isinstance(err.filename2, str):
    err.filename2 = _without_temporaries(err.filename2, tmps, paths)
  if err.errno is None and not any(p in str(err) for p in paths):
    renamed = OSError(f"Could not write {', '.join(paths)}: {err}")
    raise renamed from None
  raise err


@contextlib.contextmanager
def atomic_files(paths):
  """Yields temporary paths; renames them all to `paths` on success.

  The set is replaced together: nothing is renamed until every temporary is
  complete and on disk.

  Args:
    paths: output paths (their folders must exist).

  Yields:
    A list of temporary paths, one per output, with the same extensions.
  """
  paths = [os.fspath(p) for p in paths]
  # A link is written through: its target is replaced, the link stays.
  targets = [_destination(p) for p in paths]
  tmps = []
  try:
    for path, target in zip(paths, targets, strict=True):
      folder = _folder_of(target)
      suffix = os.path.splitext(path)[1]
      try:
        handle, tmp = tempfile.mkstemp(
          prefix=".tmp-", suffix=suffix, dir=folder
        )
      except OSError as err:
        err.filename = path
        raise
      os.close(handle)
      tmps.append(tmp)
    try:
      yield list(tmps)
    except OSError as err:
      # Name the output the user asked for, never the temporary.
      _name_output(err, tmps, paths)
    except Exception as err:  # pylint: disable=broad-except
      message = _without_temporaries(str(err), tmps, paths)
      if message != str(err):
        try:
          renamed = type(err)(message)
        except Exception:  # pylint: disable=broad-except
          raise err from None
        raise renamed from None
      raise
    mode = 0o666 & ~_umask()
    try:
      for tmp in tmps:
        os.chmod(tmp, mode)
        _fsync_file(tmp)
      for tmp, target in zip(tmps, targets, strict=True):
        os.replace(tmp, target)
    except OSError as err:
      _name_output(err, tmps, paths)
    for folder in {os.path.dirname(os.path.abspath(p)) for p in targets}:
      _fsync_dir(folder)
  finally:
    for tmp in tmps:
      if os.path.exists(tmp):
        os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path):
  """Yields a temporary path beside `path`; renames it to `path` on success."""
  with atomic_files([path]) as (tmp,):
    yield tmp


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
  """Yields an empty temporary folder that becomes `path` on success.

  Args:
    path: the folder to create; its parent is created if missing.
    overwrite: replace an existing `path` (else FileExistsError before any
      work).

  Raises:
    FileExistsError: `path` exists and overwrite is False.
  """
  # A link is written through: its target is replaced, the link stays.
  path = os.path.abspath(_destination(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
      f"{path} exists: choose another name (or overwrite it explicitly)."
    )
  parent = os.path.dirname(path)
  created = _missing_folders(parent)
  os.makedirs(parent, exist_ok=True)
  try:
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
  except BaseException:
    _remove_empty(created)
    raise
  done = False
  try:
    yield tmp
    mode = 0o777 & ~_umask()
    os.chmod(tmp, mode)
    for root, _, files in os.walk(tmp):
      for name in files:
        _fsync_file(os.path.join(root, name))
    if os.path.exists(path):
      old = tempfile.mkdtemp(
        prefix=f".old-{os.path.basename(path)}-", dir=parent
      )
      os.rmdir(old)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      if os.path.exists(path):
        raise FileExistsError(f"{path} appeared while it was being written.")
      os.rename(tmp, path)
    _fsync_dir(parent)
    done = True
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if not done:
      # A failed write leaves no folder it created (empty) behind.
      _remove_empty(created)


def _missing_folders(folder):
  """The folders `os.makedirs(folder)` would create, deepest first."""
  missing = []
  folder = os.path.abspath(folder)
  while not os.path.exists(folder):
    missing.append(folder)
    up = os.path.dirname(folder)
    if up == folder:
      break
    folder = up
  return missing


def _remove_empty(folders):
  """Removes the given folders, deepest first, while they are empty."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return
