"""The benchmark library: settings, the naive baseline, the table."""

import numpy as np
import pytest

from mtd_tf import benchmarks


@pytest.mark.parametrize("args,match", [
    ((["nope"], 1, None, 64), "Unknown presets"),
    ((["paper-gaussian"], 0, None, 64), "repeats"),
    ((["paper-gaussian"], 1, 0, 64), "num_streams"),
    ((["paper-gaussian"], 1, None, 0), "chunk_size"),
])
def test_bad_settings(args, match):
  with pytest.raises(ValueError, match=match):
    benchmarks.check_settings(*args)


def test_naive_baseline_scales_with_the_patch_count(rng):
  image = rng.uniform(0, 1, (3, 3))
  patches = rng.standard_normal((40, 3, 3))
  seconds = benchmarks.naive_iteration_seconds(patches, image, 1.0, 4,
                                               max_patches=2)
  assert seconds > 0
  # Timed on two patches and scaled by 20: at least 20 times one patch's
  # work, which is at least the 4 (2L)^2 residuals of that patch.
  assert seconds >= 20 * 1e-7 * 4 * 36


def test_table_has_a_row_per_record():
  record = dict(preset="p", patches=10, compile_s=1.0,
                iteration_s_median=0.5, iteration_s_min=0.4,
                iteration_s_max=0.6, seconds_per_patch=0.05,
                fft_floor_s=0.1, ratio_to_floor=5.0, naive_iteration_s=50.0,
                speedup_vs_naive=100.0, peak_rss_mb=300.0)
  lines = benchmarks.table([record, dict(record, preset="q")]).splitlines()
  assert len(lines) == 3
  assert lines[1].split()[:2] == ["p", "10"]
  assert np.isclose(float(lines[1].split()[3]), 0.5)
