"""Measurement and estimate files: formats, ground truth, atomic writes."""

import json
import os

import numpy as np
import pytest

from mtd_tf import io
from mtd_tf import simulation


@pytest.fixture
def sim(rng):
  return simulation.simulate_measurement(rng.uniform(0, 1, (5, 5)), snr=2.0,
                                         seed=1)


def test_simulator_returns_the_one_record(sim):
  assert isinstance(sim, io.Measurement)
  assert set(sim.truth()) == {"sigma", "image", "corners", "rotations",
                              "num_rotations"}


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
      pytest.approx(sim.sigma))
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
  io.save_estimate(tmp_path / "e.npz", estimate, sigma=0.5, error=None,
                   interrupted=True)
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
