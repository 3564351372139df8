"""`mtd-reconstruct` end to end: recovers a digit; exit codes; one-line errors."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import mtd_tf
from mtd_tf import reconstruct

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
TOOLS = ("simulate", "reconstruct", "experiment", "demo", "bench", "serving")


def _run(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=300)


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    reconstruct.run(["mtd-reconstruct", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--measurement", "--image_size", "--prior", "--out", "--quiet"):
    assert flag in out
  assert "Example:" in out and "--dataset" not in out


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    reconstruct.run(["mtd-reconstruct", "--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == (
      f"mtd-reconstruct (mtd_tf) {mtd_tf.__version__}")


def test_all_tools_import_and_show_help_in_one_process(capsys):
  for tool in TOOLS:
    module = importlib.import_module(f"mtd_tf.{tool}")
    with pytest.raises(SystemExit) as exit_info:
      module.run([f"mtd-{tool}", "--help"])
    assert exit_info.value.code == 0, tool
    assert "Example:" in capsys.readouterr().out, tool


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
  folder = tmp_path_factory.mktemp("reconstruct")
  done = _run("mtd_tf.simulate", "--digit=3", "--snr=10", "--seed=1",
              "--out=m.npz", cwd=folder)
  assert done.returncode == 0, done.stderr
  assert "12 copies" in done.stdout
  return folder


@pytest.mark.slow
def test_simulate_then_reconstruct_recovers_a_digit(measurement):
  done = _run("mtd_tf.reconstruct", "--measurement=m.npz", "--image_size=28",
              "--init=truth+0.3", "--out=est.npz", cwd=measurement)
  assert done.returncode == 0, done.stderr
  assert "EM iteration 10 / 100" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["initial_error"] == pytest.approx(0.3, abs=1e-6)
  assert summary["error"] < 0.15
  # The oracle-alignment floor is reported too, and EM gets close to it.
  assert 0.05 < summary["oracle_alignment_error"] < summary["error"]
  assert summary["error"] < 1.5 * summary["oracle_alignment_error"]
  with np.load(measurement / "est.npz") as est:
    assert est["estimate"].shape == (28, 28)
    assert float(est["error"]) == pytest.approx(summary["error"])


@pytest.mark.slow
def test_quiet_prints_only_the_summary(measurement):
  done = _run("mtd_tf.reconstruct", "--measurement=m.npz", "--image_size=28",
              "--max_iterations=2", "--out=quiet.npz", "--quiet",
              cwd=measurement)
  assert done.returncode == 0, done.stderr
  assert "EM iteration" not in done.stderr
  assert "measurement(s)" not in done.stderr
  assert len(done.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize("args,code,message", [
    (["--bogus"], 2, "Unknown command line flag 'bogus'"),
    (["--image_size=x"], 2, "invalid literal"),
    (["--measurement=m.npz"], 2, "--image_size is required"),
    (["--measurement=m.npz", "--image_size=28", "--out=no/such/dir/e.npz"], 2,
     "does not exist"),
    (["--measurement=m.npz", "--image_size=28", "--out=e.txt"], 2,
     "extension"),
    (["--measurement=m.npz", "--image_size=28", "--out=m.npz"], 2,
     "also an input"),
    (["--measurement=m.npz", "--image_size=28", "--init=cubic"], 2,
     "Unknown init"),
    (["--measurement=m.npz", "--image_size=28", "--sigma=-1"], 2, "sigma"),
    (["--measurement=m.npz", "--image_size=28", "--sigma=nan"], 2, "sigma"),
    (["--measurement=m.npz", "--image_size=28", "--num_rotations=0"], 2,
     "num_rotations"),
    (["--measurement=missing.npz", "--image_size=28"], 1, "does not exist"),
    (["--measurement=m.npz", "--image_size=29"], 1, "not a multiple"),
])
def test_reconstruct_errors(measurement, args, code, message):
  done = _run("mtd_tf.reconstruct", *args, cwd=measurement)
  assert done.returncode == code, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert "Traceback" not in done.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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
  assert "2 measurement(s)" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["measurements"] == 2
  assert summary["error"] < 0.12
  import mrcfile  # pylint: disable=g-import-not-at-top
  with mrcfile.open(tmp_path / "est.mrc") as mrc:
    assert mrc.data.shape == (28, 28)
    assert float(mrc.voxel_size.x) == pytest.approx(1.5)


@pytest.mark.slow
def test_streamed_micrographs_give_the_in_memory_estimate(tmp_path):
  """--memory_budget=0 streams the files from disk: the same estimate."""
  for seed in (1, 2):
    done = _run("mtd_tf.simulate", "--digit=3", "--snr=10", f"--seed={seed}",
                f"--out=mic{seed}.mrc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
  common = ["--measurement=mic*.mrc", "--image_size=28", "--init=truth+0.3",
            "--max_iterations=5", "--tolerance=0", "--acceleration=none"]
  streamed = _run("mtd_tf.reconstruct", *common, "--memory_budget=0",
                  "--out=streamed.npz", cwd=tmp_path)
  in_memory = _run("mtd_tf.reconstruct", *common, "--stream=never",
                   "--out=memory.npz", cwd=tmp_path)
  for done in (streamed, in_memory):
    assert done.returncode == 0, done.stderr
  a = json.loads(streamed.stdout.strip().splitlines()[-1])
  b = json.loads(in_memory.stdout.strip().splitlines()[-1])
  assert a["streamed"] and not b["streamed"]
  with np.load(tmp_path / "streamed.npz") as x, np.load(
      tmp_path / "memory.npz") as y:
    np.testing.assert_allclose(x["estimate"], y["estimate"], rtol=1e-4,
                               atol=1e-5)
  assert a["final_log_likelihood"] == pytest.approx(b["final_log_likelihood"],
                                                    rel=1e-6)


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
    (["--measurement=m.npz", "--max_iterations=many"], 2, "invalid literal"),
])
def test_reconstruct_bad_input_table(bad_files, args, code, message):
  done = _run("mtd_tf.reconstruct", "--image_size=28", *args, cwd=bad_files)
  assert done.returncode == code, done.stderr
  assert "Traceback" not in done.stderr
  # One line says it all (TensorFlow's own start-up lines may precede it).
  assert message in done.stderr.strip().splitlines()[-1]


def test_prior_of_another_image_size(bad_files):
  done = _run("mtd_tf.reconstruct", "--image_size=28", "--measurement=m.npz",
              "--prior=gaussian_fc", cwd=bad_files)
  assert done.returncode == 1
  assert "L is 28" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_crop_flag_instead_of_error(bad_files):
  done = _run("mtd_tf.reconstruct", "--image_size=28", "--measurement=odd.npz",
              "--crop", "--max_iterations=2", "--out=cropped.npz",
              cwd=bad_files)
  assert done.returncode == 0, done.stderr
  assert (bad_files / "cropped.npz").exists()
