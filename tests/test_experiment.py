"""The section IV driver: results, figures, blocks and --resume."""

import json
import os

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf import experiment
from mtd_tf import priors


@pytest.fixture(scope="module")
def config():
  return experiment.default_config(
      "gaussian", snrs=(1.0, 10.0), trials=2, seed=3,
      options=em.EMOptions(max_iterations=8))


@pytest.fixture(scope="module")
def prior():
  return priors.GaussianPrior(np.arange(25.0).reshape(5, 5) % 5)


def test_results_and_figures(tmp_path, config, prior):
  results, arrays = experiment.run_experiment(config, prior=prior,
                                              log=lambda *_: None)
  assert len(results["runs"]) == 2 * 2 * len(experiment.METHODS)
  for run in results["runs"]:
    assert set(run) >= {"snr", "target_index", "method", "error",
                        "iterations", "seconds"}
    assert 0 < run["iterations"] <= 8
  summary = {(r["snr"], r["method"]) for r in results["summary"]}
  assert len(summary) == 2 * len(experiment.METHODS)
  paths = experiment.write_results(tmp_path, results, arrays)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["results.json", "error_vs_snr.png", "reconstructions.png",
       "measurements.png"])
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["parameters"]["learning_rate"] == 1e-3
  assert written["environment"]["tensorflow"]
  for name in ("error_vs_snr.png", "reconstructions.png"):
    assert open(paths[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_blocks_equal_one_execution_and_resume_skips_done_blocks(
    tmp_path, config, prior, monkeypatch):
  whole, _ = experiment.run_experiment(config, prior=prior,
                                       log=lambda *_: None)
  calls = []
  real = em.batched_em

  def failing_after_two(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("killed")
    return real(*args, **kwargs)

  monkeypatch.setattr(em, "batched_em", failing_after_two)
  partial = tmp_path / "partial"
  with pytest.raises(KeyboardInterrupt):
    experiment.run_experiment(config, prior=prior, log=lambda *_: None,
                              block_size=4, partial_dir=str(partial))
  assert len(os.listdir(partial)) == 2
  calls.clear()
  monkeypatch.setattr(em, "batched_em", real)
  counted = []

  def counting(*args, **kwargs):
    counted.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(em, "batched_em", counting)
  resumed, _ = experiment.run_experiment(
      config, prior=prior, log=lambda *_: None, block_size=4,
      partial_dir=str(partial), resume=True)
  assert len(counted) == 2  # 16 runs in blocks of 4: two were done.
  for a, b in zip(whole["runs"], resumed["runs"]):
    assert a["method"] == b["method"] and a["snr"] == b["snr"]
    assert a["iterations"] == b["iterations"]
    assert a["error"] == pytest.approx(b["error"], rel=1e-5, abs=1e-6)


def test_resume_ignores_blocks_of_another_experiment(tmp_path, config, prior):
  partial = tmp_path / "partial"
  experiment.run_experiment(config, prior=prior, log=lambda *_: None,
                            block_size=8, partial_dir=str(partial))
  other = experiment.default_config("gaussian", snrs=(1.0, 10.0), trials=2,
                                    seed=4,
                                    options=em.EMOptions(max_iterations=8))
  lines = []
  experiment.run_experiment(other, prior=prior, log=lines.append,
                            block_size=8, partial_dir=str(partial),
                            resume=True)
  assert not any("resumed" in line for line in lines)


def test_sigkill_then_resume_from_the_command_line(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  out = tmp_path / "exp"
  args = [sys.executable, "-m", "mtd_tf.experiment", "--dataset=gaussian",
          "--snrs=1,5,10", "--trials=2", "--max_iterations=40",
          "--block_size=2", f"--out_dir={out}", "--progress_every=0"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 180
  partial = out / "partial"
  while time.time() < deadline and proc.poll() is None:
    if partial.exists() and any(
        n.endswith(".npz") for n in os.listdir(partial)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert not (out / "results.json").exists()
  done = subprocess.run(args + ["--resume"], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "resumed" in done.stdout
  results = json.loads((out / "results.json").read_text())
  assert len(results["runs"]) == 3 * 2 * len(experiment.METHODS)
  assert not partial.exists()
