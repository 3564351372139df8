"""Tests of mtd_tf.pipelines.data_scaling: the error against data."""

import dataclasses
import json

import numpy as np
import pytest

from mtd_tf.pipelines import data_scaling
from mtd_tf.pipelines import experiments


def _config():
  config = experiments.default_config(
    "gaussian",
    snrs=(1.0, 10.0),
    trials=2,
    seed=3,
    methods=("no_prior_closed_form",),
  )
  return dataclasses.replace(
    config, options=dataclasses.replace(config.options, max_iterations=30)
  )


def test_copies_follow_the_density():
  # Table I: N = 11 L at density 0.1 holds about 12 copies.
  assert data_scaling.copies(11, 0.1) == 12
  assert data_scaling.copies(44, 0.1) == 194


def test_error_falls_with_data_and_a_finished_size_is_not_rerun(
  tmp_path, monkeypatch
):
  config = _config()
  rows, paths = data_scaling.run_data_scaling(config, [12, 4], tmp_path)
  for name in ("error_vs_data.png", "error_vs_data.json"):
    assert (tmp_path / name).stat().st_size > 0
  for factor in (4, 12):
    stored = json.loads(
      (tmp_path / f"size_{factor}" / "results.json").read_text()
    )
    assert stored["parameters"]["size_factor"] == factor
  record = json.loads((tmp_path / "error_vs_data.json").read_text())
  assert record["size_factors"] == [4, 12] and record["rows"] == rows
  by = {(r["copies"], r["snr"]): r for r in rows}
  assert set(by) == {(c, s) for c in (2, 14) for s in (1.0, 10.0)}
  # Seven times the copies: the exact M-step's error falls at SNR 1.
  assert (
    by[(14, 1.0)]["mean_error_shift_aligned"]
    < (by[(2, 1.0)]["mean_error_shift_aligned"])
  )
  assert all(np.isfinite(r["mean_error"]) for r in rows)

  # Resumed: both sizes are read back, none is run again.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished experiment was run again")

  monkeypatch.setattr(experiments, "run_to_folder", refuse)
  again, _ = data_scaling.run_data_scaling(
    config, [4, 12], tmp_path, resume=True
  )
  assert again == rows
  # Other settings are not mistaken for the finished ones.
  other = dataclasses.replace(config, seed=4)
  with pytest.raises(AssertionError, match="run again"):
    data_scaling.run_data_scaling(other, [4, 12], tmp_path, resume=True)


@pytest.mark.parametrize(
  "factors, message",
  [([], "at least one"), ([1, 4], ">= 2"), ([4, 4], "repeat")],
)
def test_bad_size_factors_are_refused_before_any_work(
  tmp_path, factors, message
):
  with pytest.raises(experiments.ExperimentError, match=message):
    data_scaling.run_data_scaling(_config(), factors, tmp_path / "out")
  assert not (tmp_path / "out").exists()
