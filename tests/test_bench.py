"""`mtd-bench`: refusals before work; one preset end to end."""

import json
import os

import pytest
import tool_process

from mtd_tf import bench
from mtd_tf.pipelines import benchmarks


def test_help_lists_its_own_flags_and_presets(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.run(["mtd-bench", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--preset", "--repeats", "--json", "--chunk_size"):
    assert flag in out
  for name in benchmarks.PRESETS:
    assert name in out


@pytest.mark.parametrize(
  "args,message",
  [
    (["--repeats=0"], "--repeats must be >= 1"),
    (["--chunk_size=0"], "--chunk_size must be >= 1"),
    (["--num_streams=-1"], "--num_streams must be >= 0"),
    (["--preset=huge"], "preset"),
    (["--json=no/such/b.json"], "does not exist"),
    # Sizes the machine cannot hold, refused before any work (issue 26).
    (["--micrographs=100000000"], "free: use at most"),
    (["--chunk_size=1000000000"], "--chunk_size=1000000000: EM with"),
    (
      ["--preset=paper-gaussian", "--chunk_size=100000000"],
      "smaller chunk_size",
    ),
  ],
)
def test_bad_flags_are_refused_before_work(tmp_path, args, message, run_tool):
  done = run_tool("mtd_tf.bench", *args, cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_one_preset_in_its_own_process(tmp_path):
  done = tool_process.run(
    "mtd_tf.bench",
    "--preset=paper-gaussian",
    "--repeats=1",
    "--json=b.json",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  (record,) = json.loads((tmp_path / "b.json").read_text())
  assert record["preset"] == "paper-gaussian" and record["patches"] == 121
  assert (
    record["iteration_s_min"]
    <= record["iteration_s_median"]
    <= (record["iteration_s_max"])
  )
  assert record["peak_rss_mb"] > 0
  assert record["environment"]["tensorflow"]
  assert "paper-gaussian" in done.stdout


def test_check_sizes_counts_the_files_and_spilled_spectra():
  one = 4 * 4088**2 + 146**2 * 56 * 29 * 8  # an MRC and one grid's spectra
  benchmarks.check_sizes(["many-micrographs"], 64, 1, 8, free_bytes=8 * one)
  with pytest.raises(benchmarks.BenchmarkError, match="at most 7 micro"):
    benchmarks.check_sizes(
      ["many-micrographs"], 64, 1, 8, free_bytes=8 * one - 1
    )
  # The recommended method may spill four grid families.
  with pytest.raises(benchmarks.BenchmarkError, match="recommended-streamed"):
    benchmarks.check_sizes(
      ["recommended-streamed"], 64, 1, 8, free_bytes=8 * one
    )
  benchmarks.check_sizes(["paper-mnist"], 64, 1, 10**9, free_bytes=0)
