"""Atomic outputs: umask, nothing left on error, sets replaced together."""

import os

import pytest

from mtd_tf.base import atomic


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield
  os.umask(old)


def test_file_gets_the_umask_permissions(tmp_path, umask_027):
  del umask_027
  path = tmp_path / "out.txt"
  with atomic.atomic_file(path) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path)
    with open(tmp, "w") as f:
      f.write("done")
  assert path.read_text() == "done"
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert os.listdir(tmp_path) == ["out.txt"]


def test_folder_gets_the_umask_permissions(tmp_path, umask_027):
  del umask_027
  target = tmp_path / "folder"
  with atomic.atomic_directory(target) as tmp:
    with open(os.path.join(tmp, "a"), "w") as f:
      f.write("a")
  assert os.stat(target).st_mode & 0o777 == 0o750
  assert os.listdir(target) == ["a"]


def test_error_leaves_nothing_and_keeps_the_old_file(tmp_path):
  path = tmp_path / "out.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic.atomic_file(path) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("disk full")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]


def test_keyboard_interrupt_leaves_nothing(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with atomic.atomic_file(tmp_path / "new.txt") as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []


def test_set_is_replaced_together(tmp_path):
  a, b = tmp_path / "a.mrc", tmp_path / "a.json"
  a.write_text("old a")
  b.write_text("old b")
  with pytest.raises(RuntimeError):
    with atomic.atomic_files([a, b]) as (tmp_a, tmp_b):
      with open(tmp_a, "w") as f:
        f.write("new a")
      raise RuntimeError("failed before the sidecar was written")
  assert (a.read_text(), b.read_text()) == ("old a", "old b")
  with atomic.atomic_files([a, b]) as (tmp_a, tmp_b):
    assert tmp_a.endswith(".mrc") and tmp_b.endswith(".json")
    for tmp, text in ((tmp_a, "new a"), (tmp_b, "new b")):
      with open(tmp, "w") as f:
        f.write(text)
  assert (a.read_text(), b.read_text()) == ("new a", "new b")
  assert sorted(os.listdir(tmp_path)) == ["a.json", "a.mrc"]


def test_output_equal_to_an_input_is_refused_by_real_path(tmp_path):
  source = tmp_path / "m.npz"
  source.write_bytes(b"data")
  link = tmp_path / "link.npz"
  link.symlink_to(source)
  with pytest.raises(ValueError, match="also an input"):
    atomic.check_output_path(link, (".npz",), inputs=[source])
  with pytest.raises(ValueError, match="also an input"):
    atomic.check_output_path(
      tmp_path / "." / "m.npz", (".npz",), inputs=[str(link)]
    )
  assert atomic.check_output_path(
    tmp_path / "e.npz", (".npz",), inputs=[source]
  ) == str(tmp_path / "e.npz")


@pytest.mark.parametrize(
  "name,error,match",
  [
    ("e.txt", ValueError, "extension"),
    ("missing/e.npz", FileNotFoundError, "does not exist"),
    (".", ValueError, "is a folder"),
  ],
)
def test_bad_output_paths(tmp_path, name, error, match):
  with pytest.raises(error, match=match):
    atomic.check_output_path(tmp_path / name, (".npz",))


def test_existing_folder_is_not_overwritten_unless_asked(tmp_path):
  target = tmp_path / "f"
  target.mkdir()
  (target / "old").write_text("old")
  with pytest.raises(FileExistsError):
    with atomic.atomic_directory(target):
      pass
  with atomic.atomic_directory(target, overwrite=True) as tmp:
    with open(os.path.join(tmp, "new"), "w") as f:
      f.write("new")
  assert os.listdir(target) == ["new"]
  assert sorted(os.listdir(tmp_path)) == ["f"]
