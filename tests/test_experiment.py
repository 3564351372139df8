"""`mtd-experiment`: refusals before work, SIGKILL then --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tool_process

from mtd_tf import experiment


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    experiment.run(["mtd-experiment", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in (
    "--dataset",
    "--trials",
    "--methods",
    "--block_size",
    "--resume",
    "--out_dir",
    "--size_factor",
    "--density",
    "--min_separation",
    "--rotations",
    "--num_rotations",
  ):
    assert flag in out
  assert "Example:" in out and "--measurement" not in out


@pytest.mark.parametrize(
  "args,message",
  [
    ([], "--dataset and --out_dir are required"),
    (["--trials=0"], "--trials must be >= 1"),
    (["--methods="], "--methods is empty"),
    (["--digit_classes="], "--digit_classes is empty"),
    (["--snrs="], "--snrs is empty"),
    (["--block_size=-1"], "--block_size must be >= 0"),
    (["--t_prior=0"], "t_prior must be positive"),
    (["--snrs=1", "--methods=no_prior,,prior"], "Unknown methods"),
    (["--snrs=1,x"], "Malformed --snrs"),
    (["--snrs=-1"], "SNRs must be positive"),
    (["--methods=prior,cubic"], "Unknown methods"),
    (["--max_iterations=-1"], "max_iterations"),
    (["--dataset=mnist", "--digit_classes=3,3", "--trials=2"], "distinct"),
    (["--sigma=guess"], "--sigma"),
    (["--dataset=mnist", "--first_digit=3"], "pass --mnist_npz"),
    (["--size_factor=1"], "--size_factor must be >= 2"),
    (["--density=0"], "--density must be positive"),
    (["--min_separation=0"], "--min_separation must be >= 1"),
    (["--rotations=spiral"], "--rotations"),
    (["--num_rotations=0"], "num_rotations"),
    (["--density=0.5"], "or a smaller min_separation"),
    (["--density=0.5", "--min_separation=5", "--size_factor=100000"], "GiB"),
    (["--size_factors="], "--size_factors is empty"),
    (["--size_factors=11,x"], "Malformed --snrs, --digit_classes or --size"),
    (["--size_factors=1,11"], "--size_factors must be >= 2"),
    (["--size_factors=11,11"], "--size_factors repeats"),
    (["--size_factors=11,22", "--logdir=tb"], "--logdir takes one"),
    (
      ["--size_factors=11,100000", "--density=0.5", "--min_separation=5"],
      "GiB",
    ),
  ],
)
def test_bad_flags_are_refused_before_work(tmp_path, args, message, run_tool):
  base = ["--dataset=gaussian", f"--out_dir={tmp_path / 'out'}"] if args else []
  if any(a.startswith("--dataset") for a in args):
    base = [f"--out_dir={tmp_path / 'out'}"]
  done = run_tool("mtd_tf.experiment", *base, *args, cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(tmp_path):
  out = tmp_path / "exp"
  args = [
    sys.executable,
    "-m",
    "mtd_tf.experiment",
    "--dataset=gaussian",
    "--snrs=1,5,10",
    "--trials=2",
    "--max_iterations=40",
    "--block_size=2",
    f"--out_dir={out}",
    "--progress_every=0",
  ]
  proc = subprocess.Popen(
    args,
    env=tool_process.ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 180
  partial = out / "partial"
  while time.time() < deadline and proc.poll() is None:
    if partial.exists() and any(
      # A finished block, not the hidden temporary it is written to.
      n.startswith("block-") and n.endswith(".npz")
      for n in os.listdir(partial)
    ):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert not (out / "results.json").exists()
  done = subprocess.run(
    args + ["--resume"],
    env=tool_process.ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert "resumed from" in done.stderr
  results = json.loads((out / "results.json").read_text())
  assert results["blocks"]["resumed"] >= 1
  assert len(results["runs"]) == 3 * 2 * 4
  assert not partial.exists()


def test_measurement_flags_reach_results_json(tmp_path, run_tool):
  out = tmp_path / "exp"
  done = run_tool(
    "mtd_tf.experiment",
    "--dataset=gaussian",
    "--snrs=10",
    "--trials=1",
    "--methods=no_prior_closed_form",
    "--max_iterations=3",
    "--progress_every=0",
    "--size_factor=6",
    "--density=0.3",
    "--min_separation=5",
    "--rotations=continuous",
    f"--out_dir={out}",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  results = json.loads((out / "results.json").read_text())
  parameters = results["parameters"]
  assert parameters["size_factor"] == 6
  assert parameters["density"] == 0.3
  assert parameters["min_separation"] == 5
  assert parameters["rotations"] == "continuous"
  assert parameters["num_rotations"] == 16  # the default for continuous
  assert parameters["error_angles"] == 360
  (run,) = results["runs"]
  assert 0 <= run["error"] < float("inf")
