"""`mtd-simulate`: flags to a measurement file; refusals before any work."""

import os

import numpy as np
import pytest

from mtd_tf import simulate


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    simulate.run(["mtd-simulate", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--digit", "--snr", "--size_factor", "--density", "--out"):
    assert flag in out
  assert "Example:" in out and "--image_size" not in out


def test_writes_the_measurement_and_its_truth(tmp_path, run_tool):
  done = run_tool(
    "mtd_tf.simulate",
    "--digit=3",
    "--snr=10",
    "--seed=1",
    "--out=m.npz",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("Wrote m.npz: 308 x 308 measurement, 12 copies")
  with np.load(tmp_path / "m.npz") as data:
    assert data["measurement"].shape == (308, 308)
    assert data["corners"].shape == (12, 2)
    assert float(data["sigma"]) > 0
  assert os.listdir(tmp_path) == ["m.npz"]


@pytest.mark.parametrize(
  "args,message",
  [
    (["--digit=3", "--out=m.npz"], "exactly one of --snr and --sigma"),
    (["--snr=1", "--out=m.npz"], "exactly one of --image"),
    (["--digit=11", "--snr=1"], "--digit must be 0..9"),
    (["--digit=3", "--snr=0"], "--snr must be positive"),
    (["--digit=3", "--snr=1", "--density=-1"], "--density must be positive"),
    (["--digit=3", "--snr=1", "--size_factor=0"], "--size_factor"),
    (
      ["--digit=3", "--snr=1", "--density=0.9", "--size_factor=4"],
      "asks for 14 copies but at most 4 fit",
    ),
    (["--digit=3", "--snr=1", "--size_factor=100000"], "GiB"),
    (["--digit=3", "--snr=1e-60"], "overflows float32"),
    (["--digit=3", "--snr=1e-300"], "overflows float32"),
    (["--digit=3", "--snr=1", "--density=1e9"], "use a density of at most"),
    (["--digit=3", "--snr=1", "--out=no/such/m.npz"], "does not exist"),
    (["--digit=3", "--snr=1", "--out=m.txt"], "extension"),
    (["--digit=3", "--snr=1", "--min_separation=0"], "--min_separation"),
    (["--digit=3", "--snr=1", "--rotations=spiral"], "--rotations"),
    (
      ["--digit=3", "--snr=1", "--density=0.3", "--min_separation=60"],
      "or a smaller min_separation",
    ),
  ],
)
def test_refused_before_any_work(tmp_path, args, message, run_tool):
  done = run_tool("mtd_tf.simulate", *args, cwd=tmp_path)
  assert done.returncode in (1, 2), done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert "Traceback" not in done.stderr
  assert os.listdir(tmp_path) == []


def test_flag_refusals_are_usage_errors(tmp_path, run_tool):
  for args in (
    ["--digit=3", "--density=0.9", "--size_factor=4", "--snr=1"],
    ["--digit=3", "--snr=1e-60"],
    ["--digit=3"],
  ):
    assert run_tool("mtd_tf.simulate", *args, cwd=tmp_path).returncode == 2


def test_bad_separation_and_rotations_are_one_line_usage_errors(
  tmp_path, run_tool
):
  for args in (
    ["--digit=3", "--snr=1", "--min_separation=-2"],
    ["--digit=3", "--snr=1", "--rotations=spiral"],
  ):
    done = run_tool("mtd_tf.simulate", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_touching_continuous_copies(tmp_path, run_tool):
  image = np.random.default_rng(0).uniform(0.5, 1.0, (5, 5))
  np.save(tmp_path / "f.npy", image)
  args = ["--image=f.npy", "--snr=5", "--density=0.3", "--out=m.npz"]
  done = run_tool(
    "mtd_tf.simulate",
    *args,
    "--min_separation=5",
    "--rotations=continuous",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "55 x 55 measurement, 36 copies," in done.stdout
  assert "continuous rotations" in done.stdout
  with np.load(tmp_path / "m.npz") as data:
    corners, angles = data["corners"], data["rotations"]
    assert int(data["num_rotations"]) == 0
  assert angles.dtype == np.float64 and len(angles) == 36
  for i in range(len(corners)):
    for j in range(i):
      assert np.max(np.abs(corners[i] - corners[j])) >= 5
  # The paper's spacing cannot place them all.
  done = run_tool("mtd_tf.simulate", *args, "--seed=1", cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "fit the separation rule" in done.stdout
