"""`mtd-demo`: refusals before work; the shipped-digit demo end to end."""

import json
import os

import pytest
import tool_process

from mtd_tf import demo


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.run(["mtd-demo", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--digits", "--snr", "--prior", "--out_dir"):
    assert flag in out
  assert "mnist_unet" in out  # The default prior, by name.


@pytest.mark.parametrize(
  "args,message",
  [
    (["--digits="], "--digits is empty"),
    (["--digits=a"], "--digits must be integers"),
    (["--digits=3,3"], "distinct"),
    (["--digits=12"], "0..9"),
    (["--snr=0"], "--snr must be positive"),
  ],
)
def test_bad_flags_are_refused_before_work(tmp_path, args, message, run_tool):
  done = run_tool("mtd_tf.demo", *args, cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_demo_writes_results_and_figures(tmp_path):
  done = tool_process.run(
    "mtd_tf.demo", "--digits=3", "--out_dir=out", "--quiet", cwd=tmp_path
  )
  assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(tmp_path / "out")) == sorted(
    [
      "results.json",
      "error_vs_snr.png",
      "reconstructions.png",
      "measurements.png",
    ]
  )
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["target_indices"] and len(results["runs"]) == 3
  errors = {r["method"]: r["error"] for r in results["runs"]}
  # The recommended method beats the paper's and its own no-prior form.
  assert errors["recommended"] < errors["prior"]
  assert errors["recommended"] < errors["recommended_no_prior"]
