"""Measurement and estimate files: formats, ground truth, atomic writes."""

import json
import os

import numpy as np
import pytest

from mtd_tf.base import memory
from mtd_tf.model import io
from mtd_tf.model import simulation


@pytest.fixture
def sim(rng):
  return simulation.simulate_measurement(
    rng.uniform(0, 1, (5, 5)), snr=2.0, seed=1
  )


def test_simulator_returns_the_one_record(sim):
  assert isinstance(sim, io.Measurement)
  assert set(sim.truth()) == {
    "sigma",
    "image",
    "corners",
    "rotations",
    "num_rotations",
  }


def test_npz_round_trip(tmp_path, sim):
  path = tmp_path / "m.npz"
  io.save_measurement(path, sim)
  got = io.load_measurement(path)
  assert isinstance(got, io.Measurement) and got.path == str(path)
  np.testing.assert_array_equal(got.measurement, sim.measurement)
  assert got.sigma == pytest.approx(sim.sigma)
  np.testing.assert_array_equal(got.corners, sim.corners)
  np.testing.assert_array_equal(got.rotations, sim.rotations)
  np.testing.assert_allclose(got.image, sim.image)
  assert got.num_rotations == 4
  assert os.listdir(tmp_path) == ["m.npz"]


def test_npy_is_a_bare_measurement(tmp_path, sim):
  path = tmp_path / "m.npy"
  io.save_measurement(path, sim)
  got = io.load_measurement(path)
  np.testing.assert_array_equal(got.measurement, sim.measurement)
  assert got.sigma is None and got.image is None


def test_mrc_keeps_pixel_size_and_sidecar(tmp_path, sim):
  import dataclasses  # pylint: disable=g-import-not-at-top

  path = tmp_path / "m.mrc"
  io.save_measurement(path, dataclasses.replace(sim, pixel_size=1.34))
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.mrc"]
  assert json.loads((tmp_path / "m.json").read_text())["sigma"] == (
    pytest.approx(sim.sigma)
  )
  got = io.load_measurement(path)
  assert got.measurement.dtype == np.float32
  np.testing.assert_array_equal(got.measurement, sim.measurement)
  assert got.pixel_size == pytest.approx(1.34, rel=1e-6)
  np.testing.assert_array_equal(got.corners, sim.corners)
  est = tmp_path / "est.mrc"
  io.save_estimate(est, sim.image, pixel_size=got.pixel_size)
  assert io.load_measurement(est).pixel_size == pytest.approx(1.34, rel=1e-6)


def test_mrc_and_sidecar_are_replaced_together(tmp_path, sim, monkeypatch):
  path = tmp_path / "m.mrc"
  io.save_measurement(path, sim)
  before = {n: (tmp_path / n).read_bytes() for n in ("m.mrc", "m.json")}

  def explode(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(json, "dump", explode)
  other = simulation.simulate_measurement(sim.image, snr=5.0, seed=2)
  with pytest.raises(RuntimeError):
    io.save_measurement(path, other)
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.mrc"]
  assert {n: (tmp_path / n).read_bytes() for n in before} == before


def test_npz_without_measurement_key(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, data=np.zeros((5, 5)))
  with pytest.raises(ValueError, match="no 'measurement' array"):
    io.load_measurement(path)


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    io.load_measurement(tmp_path / "nope.npz")
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="Could not read"):
    io.load_measurement(broken)
  other = tmp_path / "m.txt"
  other.write_text("1 2 3")
  with pytest.raises(ValueError, match="Unknown measurement file type"):
    io.load_measurement(other)


def test_broken_sidecar_is_a_one_line_error(tmp_path, sim):
  path = tmp_path / "m.mrc"
  io.save_measurement(path, sim)
  (tmp_path / "m.json").write_text("{not json")
  with pytest.raises(ValueError, match="Could not read"):
    io.load_measurement(path)


def test_output_folder_must_exist(tmp_path, sim):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    io.save_measurement(tmp_path / "no" / "m.npz", sim)


def test_unknown_output_type(tmp_path, sim):
  with pytest.raises(ValueError, match="Unknown output type"):
    io.save_measurement(tmp_path / "m.tif", sim)
  with pytest.raises(ValueError, match="Unknown output type"):
    io.save_estimate(tmp_path / "e.png", sim.image)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch, sim):
  def explode(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(np, "savez", explode)
  with pytest.raises(RuntimeError):
    io.save_measurement(tmp_path / "m.npz", sim)
  assert os.listdir(tmp_path) == []


def test_estimate_metadata_round_trip(tmp_path):
  estimate = np.arange(9.0).reshape(3, 3)
  io.save_estimate(
    tmp_path / "e.npz", estimate, sigma=0.5, error=None, interrupted=True
  )
  with np.load(tmp_path / "e.npz") as data:
    assert sorted(data.files) == ["estimate", "interrupted", "sigma"]
    np.testing.assert_array_equal(data["estimate"], estimate)
    assert bool(data["interrupted"])


def test_expand_paths(tmp_path, sim):
  for name in ("b.npy", "a.npy"):
    io.save_measurement(tmp_path / name, sim)
  got = io.expand_paths([str(tmp_path / "*.npy"), str(tmp_path / "a.npy")])
  assert [os.path.basename(p) for p in got] == ["a.npy", "b.npy"]
  with pytest.raises(FileNotFoundError, match="No file matches"):
    io.expand_paths([str(tmp_path / "*.mrc")])


def test_bad_files_are_refused_in_one_line(tmp_path):
  """Issue 12: each input that used to crash, mislead or be misread."""
  rng = np.random.default_rng(0)
  measurement = rng.standard_normal((10, 10)).astype(np.float32)
  # An .npz whose sigma is a vector: name the key, not a numpy TypeError.
  np.savez(tmp_path / "v.npz", measurement=measurement, sigma=np.ones(3))
  with pytest.raises(ValueError, match=r"'sigma' must be one real number"):
    io.load_measurement(tmp_path / "v.npz")
  # A text file named .npy: no allow_pickle hint.
  (tmp_path / "t.npy").write_text("hello world\n")
  with pytest.raises(ValueError, match="not a NumPy .npy file") as info:
    io.load_measurement(tmp_path / "t.npy")
  assert "allow_pickle" not in str(info.value)


def _huge_npy(path, member_size=64):
  header = (
    "{'descr': '<f4', 'fortran_order': False, 'shape': (200000, 200000), }"
  )
  header = header + " " * (118 - len(header)) + "\n"
  return (
    b"\x93NUMPY\x01\x00"
    + len(header).to_bytes(2, "little")
    + header.encode()
    + b"\0" * member_size
  )


def test_npy_header_that_claims_149_gib_is_refused_before_allocating(
  tmp_path, monkeypatch
):
  (tmp_path / "h.npy").write_bytes(_huge_npy(tmp_path / "h.npy"))
  # np.load must never be reached (it would try to allocate 149 GiB).
  monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("allocated"))
  with pytest.raises(
    ValueError,
    match=r"claims shape \(200000, 200000\).*149 "
    "GiB",
  ):
    io.load_measurement(tmp_path / "h.npy")
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(tmp_path / "h.npz", "w") as archive:
    archive.writestr("measurement.npy", _huge_npy(None))
  with pytest.raises(ValueError, match="149 GiB"):
    io.load_measurement(tmp_path / "h.npz")


def test_mrc_whose_mode_header_lies_is_refused(tmp_path):
  import mrcfile  # pylint: disable=g-import-not-at-top

  path = tmp_path / "lie.mrc"
  with mrcfile.new(path) as mrc:
    mrc.set_data(np.ones((8, 8), np.float32))
  data = bytearray(path.read_bytes())
  data[12:16] = (0).to_bytes(4, "little")  # mode 0 (int8) over float32 data
  path.write_bytes(bytes(data))
  with pytest.raises(
    ValueError,
    match=r"header \(mode 0, int8.*the header is "
    "wrong",
  ):
    io.load_measurement(path)


def test_complex_mrc_is_refused(tmp_path):
  import mrcfile  # pylint: disable=g-import-not-at-top

  path = tmp_path / "c.mrc"
  with mrcfile.new(path) as mrc:
    mrc.set_data(np.full((8, 8), 1 + 1j, np.complex64))
  with pytest.raises(ValueError, match="complex values"):
    io.load_measurement(path)


def test_sidecar_that_is_a_list_names_the_sidecar(tmp_path, sim):
  path = tmp_path / "m.mrc"
  io.save_measurement(path, sim)
  (tmp_path / "m.json").write_text("[1, 2]")
  with pytest.raises(
    ValueError, match="sidecar .*m.json holds a JSON list"
  ) as info:
    io.load_measurement(path)
  assert "valid .mrc" not in str(info.value)
  (tmp_path / "m.json").write_text('{"sigma": "x"}')
  with pytest.raises(ValueError, match="'sigma' must be a number"):
    io.load_measurement(path)


def test_glob_only_when_the_name_is_not_a_file_and_one_file_read_once(
  tmp_path, sim, monkeypatch
):
  io.save_measurement(tmp_path / "m[1].npz", sim)
  assert io.expand_paths([str(tmp_path / "m[1].npz")]) == [
    str(tmp_path / "m[1].npz")
  ]
  monkeypatch.chdir(tmp_path)
  io.save_measurement("a.npz", sim)
  os.symlink("a.npz", "link.npz")
  assert io.expand_paths(
    ["a.npz", "./a.npz", str(tmp_path / "a.npz"), "link.npz"]
  ) == ["a.npz"]


def test_errors_name_the_output_not_the_temporary(tmp_path):
  path = tmp_path / "e.mrc"

  def fail(name):
    raise ValueError(f"cannot write {name}")

  from mtd_tf.base import atomic  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError) as info:
    with atomic.atomic_file(path) as tmp:
      fail(tmp)
  assert str(info.value) == f"cannot write {path}"
  with pytest.raises(OSError) as info:
    with atomic.atomic_file(path) as tmp:
      open(os.path.join(tmp, "x"), "w")  # tmp is a file: ENOTDIR
  assert ".tmp-" not in str(info.value)
  assert os.listdir(tmp_path) == []


def test_paths_that_are_not_files_say_what_they_are(tmp_path, sim):
  """Each of these said "does not exist" (issue 26, case 12)."""
  good = tmp_path / "m.npz"
  io.save_measurement(good, sim)
  (tmp_path / "folder").mkdir()
  os.mkfifo(tmp_path / "fifo.npz")
  (tmp_path / "loop.npz").symlink_to(tmp_path / "loop.npz")
  (tmp_path / "dangling.npz").symlink_to(tmp_path / "gone.npz")
  cases = [
    (tmp_path / "folder", IsADirectoryError, "is a folder"),
    (tmp_path / "fifo.npz", io.NotARegularFileError, "is a FIFO"),
    (tmp_path / "loop.npz", io.NotARegularFileError, "is a symlink loop"),
    (tmp_path / "dangling.npz", FileNotFoundError, "gone.npz, which does"),
    (tmp_path / "nope.npz", FileNotFoundError, "does not exist"),
  ]
  if os.path.exists("/dev/zero"):
    cases.append(("/dev/zero", io.NotARegularFileError, "character device"))
  for path, kind, message in cases:
    # Neither opens the path (a FIFO would block, /dev/zero never end).
    with pytest.raises(kind, match=message):
      io.load_measurement(path)
    with pytest.raises(kind, match=message):
      io.expand_paths([str(good), str(path)])
  with pytest.raises(ValueError, match="2 of 2 is an empty file name"):
    io.expand_paths([str(good), ""])


def test_interrupted_estimates_of_bare_formats_get_a_marked_name():
  assert io.interrupted_path("out/e.npz") == "out/e.npz"
  assert io.interrupted_path("out/e.npy") == "out/e.interrupted.npy"
  assert io.interrupted_path("e.MRC") == "e.interrupted.MRC"


def test_truncated_or_random_mrc_says_which(tmp_path, sim):
  path = tmp_path / "m.mrc"
  io.save_measurement(path, io.Measurement(sim.measurement))
  data = path.read_bytes()
  cut = tmp_path / "cut.mrc"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="cut.mrc: its header .* truncated"):
    io.load_measurement(cut)
  noise = tmp_path / "noise.mrc"
  noise.write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(ValueError, match="noise.mrc is not an MRC file"):
    io.load_measurement(noise)


def test_an_array_larger_than_memory_is_refused_from_its_header(
  tmp_path, monkeypatch
):
  # A compressed .npz is small on disk; its header says what it would take.
  path = tmp_path / "zeros.npz"
  np.savez_compressed(path, measurement=np.zeros((1024, 1024), np.float32))
  assert path.stat().st_size < 20_000
  monkeypatch.setattr(memory, "memory_budget", lambda *a, **k: 2**20)
  with pytest.raises(ValueError, match=r"4 MiB to load, more than the 1 MiB"):
    io.load_measurement(path)
