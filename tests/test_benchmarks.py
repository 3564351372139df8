"""The benchmark library: settings, the naive baseline, the table."""

import numpy as np
import pytest

from mtd_tf.pipelines import benchmarks


@pytest.mark.parametrize(
  "args,match",
  [
    ((["nope"], 1, None, 64), "Unknown presets"),
    ((["paper-gaussian"], 0, None, 64), "repeats"),
    ((["paper-gaussian"], 1, 0, 64), "num_streams"),
    ((["paper-gaussian"], 1, None, 0), "chunk_size"),
  ],
)
def test_bad_settings(args, match):
  with pytest.raises(ValueError, match=match):
    benchmarks.check_settings(*args)


def test_paper_baseline_and_its_reference(rng):
  image = rng.uniform(0, 1, (5, 5))
  measurement = rng.standard_normal((55, 55))
  seconds, reference = benchmarks.paper_baseline_seconds(
    measurement, image, 1.0, 4, max_patches=2
  )
  assert seconds > 0
  assert reference == 0.31  # the paper's code at L = 5, N = 55
  _, none = benchmarks.paper_baseline_seconds(
    measurement[:50, :50], image, 1.0, 4, max_patches=1
  )
  assert none is None


def test_table_has_a_row_per_record():
  record = dict(
    preset="p",
    patches=10,
    compile_s=1.0,
    iteration_s_median=0.5,
    iteration_s_min=0.4,
    iteration_s_max=0.6,
    seconds_per_patch=0.05,
    fft_floor_s=0.1,
    ratio_to_floor=5.0,
    paper_baseline_s=50.0,
    paper_reference_s=24.6,
    speedup_vs_paper_baseline=100.0,
    peak_rss_mb=300.0,
  )
  accelerated = dict(
    preset="accelerated",
    target_log_likelihood=-1.0,
    plain_iterations=100,
    plain_s=10.0,
    accelerated_method="anderson",
    accelerated_iterations=20,
    accelerated_s=2.5,
    iteration_ratio=5.0,
    time_ratio=4.0,
    anderson_iterations=20,
    anderson_s=2.5,
    squarem_iterations=None,  # not reached: left out of the line
    squarem_s=None,
  )
  lines = benchmarks.table(
    [record, dict(record, preset="q"), accelerated]
  ).splitlines()
  assert len(lines) == 4
  assert "5.00 x fewer" in lines[3] and "4.00 x less time" in lines[3]
  assert "anderson 20 iterations" in lines[3] and "squarem" not in lines[3]
  assert lines[3].count("anderson") == 1  # the winner once
  assert lines[1].split()[:2] == ["p", "10"]
  assert np.isclose(float(lines[1].split()[3]), 0.5)
  many = dict(record, preset="many-micrographs", micrographs=8)
  many["iteration_s_median"] = 3.6
  single = dict(record, preset="micrograph")
  lines = benchmarks.table([single, many]).splitlines()
  assert lines[-1] == (
    "many-micrographs: 8 micrographs 3.6 s per iteration = 7.20 x the "
    "micrograph preset's 0.5 s"
  )


@pytest.mark.slow
def test_scale_presets_at_a_tiny_size(monkeypatch):
  """many-micrographs and accelerated end to end on 55 x 55 micrographs."""
  monkeypatch.setitem(
    benchmarks.PRESETS,
    "many-micrographs",
    dict(image_size=5, shape=(55, 55), num_rotations=4),
  )
  monkeypatch.setitem(
    benchmarks.PRESETS,
    "accelerated",
    dict(image_size=5, shape=(110, 110), num_rotations=4),
  )
  many = benchmarks.run_preset("many-micrographs", repeats=2, micrographs=3)
  assert many["micrographs"] == 3 and many["patches"] == 3 * 121
  assert many["iteration_s_min"] <= many["iteration_s_median"]
  assert many["paper_baseline_s"] > 0 and many["peak_rss_mb"] > 0
  fast = benchmarks.run_preset("accelerated")
  assert fast["plain_iterations"] == benchmarks.PLAIN_ITERATIONS
  assert fast["accelerated_iterations"] < fast["plain_iterations"]
  assert fast["accelerated_method"] in ("anderson", "secant", "squarem")
  assert fast["accelerated_iterations"] == min(
    n
    for n in (
      fast["anderson_iterations"],
      fast["secant_iterations"],
      fast["squarem_iterations"],
    )
    if n is not None
  )
  assert fast["accelerated_s"] > 0 and fast["plain_s"] > 0


@pytest.mark.slow
def test_recommended_streamed_preset_at_a_tiny_size(monkeypatch):
  """The recommended method on streamed micrographs against plain EM."""
  monkeypatch.setitem(
    benchmarks.PRESETS,
    "recommended-streamed",
    dict(image_size=5, shape=(55, 55), num_rotations=4),
  )
  record = benchmarks.run_preset("recommended-streamed", micrographs=2)
  assert record["micrographs"] == 2 and record["patches"] == 2 * 121
  assert record["plain_iterations"] == benchmarks.PLAIN_ITERATIONS
  assert record["starts"] > 1 and record["problem_iterations"] > 0
  for key in ("seconds", "plain_seconds", "peak_rss_mb"):
    assert record[key] > 0
  assert record["time_ratio"] == pytest.approx(
    record["seconds"] / record["plain_seconds"]
  )
  assert "recommended method" in benchmarks.table([record])
  # Phase 1 (every start) and phase 2 (the survivor), timed one by one.
  assert [r["starts"] for r in record["runs"]] == [record["starts"], 1]
