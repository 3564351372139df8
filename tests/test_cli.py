"""The command-line tools end to end, and their exit codes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
  folder = tmp_path_factory.mktemp("cli")
  done = _run("mtd_tf.simulate", "--digit=3", "--snr=10", "--seed=1",
              "--out=m.npz", cwd=folder)
  assert done.returncode == 0, done.stderr
  assert "12 copies" in done.stdout
  return folder


def test_simulate_then_reconstruct_recovers_a_digit(measurement):
  done = _run("mtd_tf.reconstruct", "--measurement=m.npz", "--image_size=28",
              "--init=truth+0.3", "--out=est.npz", cwd=measurement)
  assert done.returncode == 0, done.stderr
  assert "EM iteration 10 / 100" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["initial_error"] == pytest.approx(0.3, abs=1e-6)
  assert summary["error"] < 0.15
  # The oracle-alignment floor is printed too, and EM gets close to it.
  assert 0.05 < summary["oracle_alignment_error"] < summary["error"]
  assert summary["error"] < 1.5 * summary["oracle_alignment_error"]
  with np.load(measurement / "est.npz") as est:
    assert est["estimate"].shape == (28, 28)
    assert float(est["error"]) == pytest.approx(summary["error"])


@pytest.mark.parametrize("args,code,message", [
    (["--bogus"], 2, "Unknown command line flag 'bogus'"),
    (["--image_size=x"], 2, "invalid literal"),
    (["--measurement=m.npz"], 2, "--image_size is required"),
    (["--measurement=m.npz", "--image_size=28", "--out=no/such/dir/e.npz"], 2,
     "does not exist"),
    (["--measurement=m.npz", "--image_size=28", "--init=cubic"], 2,
     "Unknown --init"),
    (["--measurement=missing.npz", "--image_size=28"], 1, "does not exist"),
    (["--measurement=m.npz", "--image_size=29"], 1, "not a multiple"),
    (["--measurement=m.npz", "--image_size=28", "--sigma=-1"], 1, "sigma"),
])
def test_reconstruct_errors(measurement, args, code, message):
  done = _run("mtd_tf.reconstruct", *args, cwd=measurement)
  assert done.returncode == code
  assert message in done.stderr
  assert "Traceback" not in done.stderr


def test_same_command_same_output_bytes(measurement):
  outputs = []
  for name in ("a.npz", "b.npz"):
    done = _run("mtd_tf.reconstruct", "--measurement=m.npz",
                "--image_size=28", "--max_iterations=5", f"--out={name}",
                cwd=measurement)
    assert done.returncode == 0, done.stderr
    with np.load(measurement / name) as est:
      outputs.append(est["estimate"].tobytes())
  assert outputs[0] == outputs[1]


def test_several_mrc_micrographs_by_glob(tmp_path):
  for seed in (1, 2):
    done = _run("mtd_tf.simulate", "--digit=3", "--snr=10", f"--seed={seed}",
                "--pixel_size=1.5", f"--out=mic{seed}.mrc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
  assert (tmp_path / "mic1.json").exists()
  done = _run("mtd_tf.reconstruct", "--measurement=mic*.mrc",
              "--image_size=28", "--init=truth+0.3", "--out=est.mrc",
              cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("2 measurement(s)")
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["error"] < 0.12
  import mrcfile  # pylint: disable=g-import-not-at-top
  with mrcfile.open(tmp_path / "est.mrc") as mrc:
    assert mrc.data.shape == (28, 28)
    assert float(mrc.voxel_size.x) == pytest.approx(1.5)


REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad_files(measurement):
  """Broken inputs beside the good measurement."""
  with np.load(measurement / "m.npz") as good:
    m = good["measurement"]
  np.save(measurement / "cube.npy", np.zeros((28, 28, 3)))
  np.save(measurement / "empty.npy", np.zeros((0, 0)))
  nan = m.copy()
  nan[5, 5] = np.nan
  np.savez(measurement / "nan.npz", measurement=nan, sigma=1.0)
  np.savez(measurement / "nokey.npz", data=m)
  np.savez(measurement / "odd.npz", measurement=m[:300, :301], sigma=1.0)
  (measurement / "notes.txt").write_text("not a measurement")
  (measurement / "not_a_model").mkdir(exist_ok=True)
  return measurement


@pytest.mark.parametrize("args,code,message", [
    (["--measurement=cube.npy"], 1, "must be a 2-D array"),
    (["--measurement=empty.npy", "--sigma=1"], 1, "is empty"),
    (["--measurement=nan.npz"], 1, "NaN or Inf"),
    (["--measurement=nokey.npz"], 1, "no 'measurement' array"),
    (["--measurement=odd.npz"], 1, "--crop"),
    (["--measurement=notes.txt"], 1, "Unknown measurement file type"),
    (["--measurement=m.npz", "--prior=not_a_model"], 1, "not a SavedModel"),
    (["--measurement=m.npz", "--num_rotations=0"], 1, "num_rotations"),
    (["--measurement=m.npz", "--sigma=nan"], 1, "sigma"),
    (["--measurement=m.npz", "--max_iterations=many"], 2, "invalid literal"),
])
def test_reconstruct_bad_input_table(bad_files, args, code, message):
  done = _run("mtd_tf.reconstruct", "--image_size=28", *args, cwd=bad_files)
  assert done.returncode == code, done.stderr
  assert message in done.stderr
  assert "Traceback" not in done.stderr
  # One line says it all (TensorFlow's own start-up lines may precede it).
  assert message in done.stderr.strip().splitlines()[-1]


def test_prior_of_another_image_size(bad_files):
  done = _run("mtd_tf.reconstruct", "--image_size=28", "--measurement=m.npz",
              f"--prior={REPO / 'saved_models' / 'gaussian_fc' / '1'}",
              cwd=bad_files)
  assert done.returncode == 1
  assert "L is 28" in done.stderr and "Traceback" not in done.stderr


def test_crop_flag_instead_of_error(bad_files):
  done = _run("mtd_tf.reconstruct", "--image_size=28", "--measurement=odd.npz",
              "--crop", "--max_iterations=2", "--out=cropped.npz",
              cwd=bad_files)
  assert done.returncode == 0, done.stderr
  assert (bad_files / "cropped.npz").exists()


def test_simulate_errors(tmp_path):
  done = _run("mtd_tf.simulate", "--digit=3", "--out=m.npz", cwd=tmp_path)
  assert done.returncode == 1 and "exactly one of snr and sigma" in done.stderr
  done = _run("mtd_tf.simulate", "--snr=1", "--out=m.npz", cwd=tmp_path)
  assert done.returncode == 2 and "exactly one of --image" in done.stderr
  assert "Traceback" not in done.stderr
