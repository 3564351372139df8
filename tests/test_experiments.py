"""The experiments library: plan, results, figures, blocks, resume."""

import dataclasses
import json
import os
import pathlib
import types

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.base import table1
from mtd_tf.model import metrics
from mtd_tf.model import simulation
from mtd_tf.pipelines import experiments

REPO = pathlib.Path(__file__).resolve().parents[1]

# The plan (measurements, sigmas, inits, targets) of
# default_config(dataset, snrs=(1.0,), trials=2), as computed before the
# experiments were split out of mtd_tf/experiment.py: the same seeds must
# keep giving the same numbers. Float32 sums differ in their last bits
# between CPUs and numpy builds, so the check is to rounding, not to bits.
PLAN_SUMS = {
  # (sum, sum of squares) of measurements, sigmas, inits and targets.
  "gaussian": (
    (3517.46778563282, 207429.33729182926),
    (22.179099708576125, 62.04656650956935),
    (113.94926265260277, 84.49654011251673),
    (100.44982354481678, 387.79104068480854),
  ),
  "mnist": (
    (8486.27611737289, 85271.64482675212),
    (2.4192760437700245, 0.8190029737385152),
    (735.0713725490197, 276.4888655132641),
    (183.86274509803923, 160.52458285274895),
  ),
}


def _shipped_gaussian_metadata():
  path = REPO / "saved_models" / "gaussian_fc" / "1" / "assets" / "prior.json"
  return json.loads(path.read_text())


@pytest.mark.parametrize("dataset", sorted(PLAN_SUMS))
def test_plan_is_the_one_before_the_refactor(dataset):
  config = experiments.default_config(dataset, snrs=(1.0,), trials=2)
  prior = types.SimpleNamespace(metadata=_shipped_gaussian_metadata())
  plan = experiments.plan(config, prior if dataset == "gaussian" else None)
  arrays = (np.stack(plan.measurements), plan.sigmas, plan.inits, plan.targets)
  for array, expected, rtol in zip(
    arrays, PLAN_SUMS[dataset], (1e-6, 1e-12, 1e-12, 1e-12)
  ):
    array = np.asarray(array, np.float64)
    np.testing.assert_allclose(
      [array.sum(), (array**2).sum()], expected, rtol=rtol
    )
  assert len(plan.runs) == 2 * len(experiments.PAPER_METHODS)


def test_table_i_comes_from_table1():
  for dataset, table in table1.DATASETS.items():
    config = experiments.default_config(dataset)
    assert config.snrs == tuple(table["snrs"])
    assert config.prior == table["prior"]
    assert config.image_size == table["image_size"]
    assert config.options.gamma == table["gamma"]
    assert config.options.t_prior == table1.T_PRIOR
    assert config.options.max_iterations == table1.MAX_ITERATIONS
    assert config.options.learning_rate == table1.LEARNING_RATE


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(trials=0), "trials"),
    (dict(methods=()), "at least one method"),
    (dict(methods=("prior", "cubic")), "Unknown methods"),
    (dict(snrs=()), "at least one SNR"),
    (dict(snrs=(1.0, -1.0)), "positive"),
    (dict(digit_classes=(1,)), "mnist dataset only"),
    (dict(first_digit=2), "mnist dataset only"),
    (dict(sigma="guess"), "sigma must be one of true, estimated"),
    (dict(rotations="spiral"), "rotations must be one of"),
    (dict(min_separation=0), "min_separation must be >= 1"),
    (dict(min_separation=2.5), "whole number"),
    (dict(density=0.5), "or a smaller min_separation"),
    (dict(size_factor=1), "size_factor must be >= 2"),
  ],
)
def test_bad_configs_are_refused(change, match):
  config = experiments.default_config("gaussian")
  with pytest.raises(ValueError, match=match):
    experiments.check_config(dataclasses.replace(config, **change))


def test_plan_with_estimated_sigma_gives_em_the_estimate():
  # Same measurements; EM is given each measurement's estimate (within
  # 5 % of the simulator's sigma, the bound) and both are recorded.
  prior = types.SimpleNamespace(metadata=_shipped_gaussian_metadata())
  true, estimated = (
    experiments.plan(
      experiments.default_config(
        "gaussian", snrs=(1.0, 10.0), trials=2, sigma=source
      ),
      prior,
    )
    for source in ("true", "estimated")
  )
  for a, b in zip(true.measurements, estimated.measurements):
    np.testing.assert_array_equal(a, b)
  truth = np.array([run["sigma_true"] for run in estimated.runs])
  np.testing.assert_array_equal(truth, true.sigmas)
  np.testing.assert_array_equal(
    [run["sigma"] for run in estimated.runs], estimated.sigmas
  )
  ratio = estimated.sigmas / truth
  assert np.all(np.abs(ratio - 1) < 0.05) and np.any(ratio != 1)


def test_repeated_digits_need_an_mnist_file():
  with pytest.raises(ValueError, match="distinct"):
    experiments.default_config("mnist", trials=2, digit_classes=(3, 3))
  with pytest.raises(ValueError, match="pass --mnist_npz"):
    experiments.default_config("mnist", first_digit=3)
  with pytest.raises(ValueError, match="first_digit must be >= 0"):
    experiments.default_config("mnist", mnist_npz="x.npz", first_digit=-1)
  with pytest.raises(ValueError, match="0..9"):
    experiments.default_config("mnist", trials=1, digit_classes=(12,))


@pytest.fixture(scope="module")
def config():
  return experiments.default_config(
    "gaussian",
    snrs=(1.0, 10.0),
    trials=2,
    seed=3,
    options=em.EMOptions(max_iterations=8, t_prior=table1.T_PRIOR),
  )


@pytest.fixture(scope="module")
def prior():
  return priors.GaussianPrior(np.arange(25.0).reshape(5, 5) % 5)


def test_results_and_figures(tmp_path, config, prior):
  results, arrays = experiments.run_experiment(config, prior=prior)
  assert results["schema"] == experiments.RESULTS_SCHEMA
  assert len(results["runs"]) == 2 * 2 * len(experiments.PAPER_METHODS)
  for run in results["runs"]:
    assert set(run) >= {
      "snr",
      "target_index",
      "method",
      "error",
      "iterations",
      "seconds",
    }
    assert 0 < run["iterations"] <= 8
  summary = {(r["snr"], r["method"]) for r in results["summary"]}
  assert len(summary) == 2 * len(experiments.PAPER_METHODS)
  # The summary is the mean of the runs.
  for row in results["summary"]:
    errors = [
      r["error"]
      for r in results["runs"]
      if r["snr"] == row["snr"] and r["method"] == row["method"]
    ]
    assert row["mean_error"] == pytest.approx(np.mean(errors))
    assert row["max_error"] == max(errors)
    assert row["max_sigma_error"] == 0.0
    assert row["count"] == 2
  paths = experiments.write_results(tmp_path, results, arrays)
  assert sorted(os.listdir(tmp_path)) == sorted(
    [
      "results.json",
      "error_vs_snr.png",
      "reconstructions.png",
      "measurements.png",
    ]
  )
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["parameters"]["learning_rate"] == table1.LEARNING_RATE
  # The measurement settings, Table I's by default (2L apart, K angles).
  assert {
    k: written["parameters"][k]
    for k in (
      "rotations",
      "size_factor",
      "density",
      "min_separation",
      "error_angles",
    )
  } == {
    "rotations": "discrete",
    "size_factor": table1.SIZE_FACTOR,
    "density": table1.DENSITY,
    "min_separation": 10,
    "error_angles": 0,
  }
  assert written["environment"]["tensorflow"]
  for name in ("error_vs_snr.png", "reconstructions.png"):
    assert pathlib.Path(paths[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = experiments.summary_table(results)
  assert len(table.splitlines()) == 1 + len(config.snrs)


def test_blocks_equal_one_execution_and_resume_skips_done_blocks(
  tmp_path, config, prior, monkeypatch
):
  whole, _ = experiments.run_experiment(config, prior=prior)
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
    experiments.run_experiment(
      config, prior=prior, block_size=4, partial_dir=str(partial)
    )
  assert len(os.listdir(partial)) == 2
  counted = []

  def counting(*args, **kwargs):
    counted.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(em, "batched_em", counting)
  resumed, _ = experiments.run_experiment(
    config, prior=prior, block_size=4, partial_dir=str(partial), resume=True
  )
  assert len(counted) == 2  # 16 runs in blocks of 4: two were done.
  assert resumed["blocks"] == {"total": 4, "resumed": 2}
  for a, b in zip(whole["runs"], resumed["runs"]):
    assert a["method"] == b["method"] and a["snr"] == b["snr"]
    assert a["iterations"] == b["iterations"]
    assert a["error"] == pytest.approx(b["error"], rel=1e-5, abs=1e-6)


def test_resume_refuses_blocks_of_another_experiment_and_keeps_them(
  tmp_path, config, prior
):
  partial = tmp_path / "partial"
  experiments.run_experiment(
    config, prior=prior, block_size=8, partial_dir=str(partial)
  )
  kept = {p.name: p.read_bytes() for p in partial.iterdir()}
  other = dataclasses.replace(config, seed=4)
  with pytest.raises(
    experiments.ExperimentError, match="another experiment .seed 3 there"
  ):
    experiments.run_experiment(
      other, prior=prior, block_size=8, partial_dir=str(partial), resume=True
    )
  assert {p.name: p.read_bytes() for p in partial.iterdir()} == kept
  # Without --resume a new experiment starts afresh, as before.
  results, _ = experiments.run_experiment(
    other, prior=prior, block_size=8, partial_dir=str(partial)
  )
  assert results["blocks"]["resumed"] == 0


def test_unreadable_block_is_recomputed(tmp_path, config, prior):
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "block-0000.npz").write_bytes(b"truncated")
  results, _ = experiments.run_experiment(
    config, prior=prior, block_size=8, partial_dir=str(partial), resume=True
  )
  assert results["blocks"]["resumed"] == 0


def test_negative_block_size_is_refused(config, prior):
  with pytest.raises(ValueError, match="block_size"):
    experiments.run_experiment(config, prior=prior, block_size=-1)


def _small_config():
  return experiments.default_config(
    "gaussian", snrs=(1.0,), trials=1, methods=("no_prior_closed_form",)
  )


def test_a_second_run_on_a_locked_folder_is_refused_in_one_line(
  tmp_path, monkeypatch
):
  out = tmp_path / "exp"
  out.mkdir()
  (out / "partial").mkdir()
  (out / "partial" / "block-0000.npz").write_bytes(b"another run's block")
  release = experiments._lock_folder(str(out))  # pylint: disable=protected-access
  monkeypatch.setattr(
    experiments,
    "run_experiment",
    lambda *a, **k: pytest.fail("ran while locked"),
  )
  try:
    with pytest.raises(
      experiments.ExperimentError, match="in use by another experiment"
    ) as info:
      experiments.run_to_folder(_small_config(), str(out))
    assert "\n" not in str(info.value)
  finally:
    release()
  # The refused run deleted nothing of the running one's, and added nothing.
  assert (out / "partial" / "block-0000.npz").exists()
  assert sorted(os.listdir(out)) == ["partial"]


def test_failed_run_leaves_no_empty_folder_and_keeps_finished_blocks(
  tmp_path, monkeypatch
):
  def fail(config, block_size=None, partial_dir=None, resume=False):
    del config, block_size, resume
    raise ValueError("bad data")

  monkeypatch.setattr(experiments, "run_experiment", fail)
  with pytest.raises(ValueError, match="bad data"):
    experiments.run_to_folder(_small_config(), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()

  def interrupted(config, block_size=None, partial_dir=None, resume=False):
    del config, block_size, resume
    os.makedirs(partial_dir)
    (pathlib.Path(partial_dir) / "block-0000.npz").write_bytes(b"done")
    raise KeyboardInterrupt

  monkeypatch.setattr(experiments, "run_experiment", interrupted)
  with pytest.raises(KeyboardInterrupt):
    experiments.run_to_folder(_small_config(), str(tmp_path / "new"))
  assert (tmp_path / "new" / "partial" / "block-0000.npz").exists()


def test_results_and_figures_are_replaced_as_a_set(tmp_path, monkeypatch):
  from mtd_tf.pipelines import figures  # pylint: disable=g-import-not-at-top

  out = tmp_path / "exp"
  out.mkdir()
  (out / "results.json").write_text('{"run": "old"}')
  (out / "error_vs_snr.png").write_bytes(b"old figure")

  def draw(*args):
    pathlib.Path(
      args[-1] if isinstance(args[-1], str) else args[2]
    ).write_bytes(b"new")

  monkeypatch.setattr(figures, "error_vs_snr", lambda r, p: draw(p))
  monkeypatch.setattr(figures, "reconstructions", lambda *a: draw(a[2]))

  def broken(*args):
    raise RuntimeError("matplotlib failed")

  monkeypatch.setattr(figures, "measurements", broken)
  results = {"parameters": {}}
  with pytest.raises(RuntimeError):
    experiments.write_results(str(out), results, {})
  # Nothing of the new set replaced the old one.
  assert (out / "results.json").read_text() == '{"run": "old"}'
  assert (out / "error_vs_snr.png").read_bytes() == b"old figure"
  assert sorted(os.listdir(out)) == ["error_vs_snr.png", "results.json"]
  monkeypatch.setattr(figures, "measurements", lambda r, a, p: draw(p))
  experiments.write_results(str(out), results, {})
  assert (out / "error_vs_snr.png").read_bytes() == b"new"
  assert json.loads((out / "results.json").read_text()) == results


def test_out_dir_that_is_a_file_is_refused_before_work(tmp_path, monkeypatch):
  (tmp_path / "results").write_text("not a folder")
  monkeypatch.setattr(
    experiments, "run_experiment", lambda *a, **k: pytest.fail("ran")
  )
  with pytest.raises(
    experiments.ExperimentError, match="exists and is not a folder"
  ):
    experiments.run_to_folder(_small_config(), str(tmp_path / "results"))
  assert (tmp_path / "results").read_text() == "not a folder"


def test_recommended_methods_record_their_options(config, prior):
  import dataclasses  # pylint: disable=g-import-not-at-top

  chosen = dataclasses.replace(
    config, methods=("recommended", "recommended_no_prior")
  )
  results, arrays = experiments.run_experiment(chosen, prior=prior)
  recorded = results["parameters"]["recommended"]
  assert recorded["em"]["m_step"] == "preconditioned"
  assert recorded["recovery"]["keep"] == 1
  # L = 5: every offset grid (L^2 <= 64); the occupancy shift prior.
  assert recorded["recovery"]["grids_per_axis"] == 5
  assert recorded["em"]["estimate_shift_prior"] == "occupancy"
  assert set(results["problem_iterations"]) == {
    "recommended",
    "recommended_no_prior",
  }
  for run in results["runs"]:
    assert run["winning_start"] >= 0
    assert np.isfinite(run["error"]) and np.isfinite(run["error_before_gauge"])
  assert arrays["estimates"].shape == (8, 5, 5)
  assert recorded["em"]["estimate_sigma"] is False
  assert all(run["sigma"] == run["sigma_true"] for run in results["runs"])


def test_estimated_sigma_is_refined_by_the_recommended_methods_only(
  config, prior
):
  import dataclasses  # pylint: disable=g-import-not-at-top

  chosen = dataclasses.replace(
    config,
    methods=("no_prior_closed_form", "recommended_no_prior"),
    sigma="estimated",
  )
  results, _ = experiments.run_experiment(chosen, prior=prior)
  assert results["parameters"]["recommended"]["em"]["estimate_sigma"] is True
  for run in results["runs"]:
    assert abs(run["sigma_from_data"] / run["sigma_true"] - 1) < 0.05
    if run["method"] == "no_prior_closed_form":
      assert run["sigma"] == run["sigma_from_data"]
    else:
      # EM's own estimate, from every pixel: near the truth.
      assert run["sigma"] != run["sigma_from_data"]
      assert abs(run["sigma"] / run["sigma_true"] - 1) < 0.05
  for row in results["summary"]:
    assert row["max_sigma_error"] == max(
      abs(r["sigma"] / r["sigma_true"] - 1)
      for r in results["runs"]
      if (r["snr"], r["method"]) == (row["snr"], row["method"])
    )


def test_first_digit_picks_later_test_digits_of_each_class(mnist_npz):
  from mtd_tf.model import datasets  # pylint: disable=g-import-not-at-top

  (_, _), (x_test, y_test) = datasets.load_mnist(str(mnist_npz))
  config = experiments.default_config(
    "mnist",
    snrs=(1.0,),
    trials=3,
    digit_classes=(4, 4, 7),
    mnist_npz=str(mnist_npz),
    first_digit=5,
  )
  the_plan = experiments.plan(config)
  fours, sevens = np.flatnonzero(y_test == 4), np.flatnonzero(y_test == 7)
  expected = [fours[5], fours[6], sevens[5]]
  assert the_plan.target_ids == [int(i) for i in expected]
  np.testing.assert_array_equal(the_plan.targets, x_test[expected] / 255.0)
  with pytest.raises(ValueError, match="only"):
    experiments.plan(dataclasses.replace(config, first_digit=len(sevens)))


def _measurement_config(**change):
  """One target, one SNR, one fast method: for the measurement settings."""
  config = experiments.default_config(
    "gaussian",
    snrs=(10.0,),
    trials=1,
    seed=1,
    methods=("no_prior_closed_form",),
    **change,
  )
  return dataclasses.replace(
    config, options=dataclasses.replace(config.options, max_iterations=4)
  )


def test_size_factor_density_and_separation_reach_the_simulator(
  prior, monkeypatch
):
  made = []
  simulate = simulation.simulate_measurement

  def recording(*args, **kwargs):
    made.append(simulate(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(simulation, "simulate_measurement", recording)
  default = experiments.plan(_measurement_config(), prior)
  assert default.measurements[0].shape == (55, 55)
  assert len(made[-1].corners) == round(0.1 * 11**2) == 12
  changed = experiments.plan(
    _measurement_config(size_factor=6, density=0.3, min_separation=5), prior
  )
  # N = 6 L, and the copy count follows density N^2 / L^2.
  assert changed.measurements[0].shape == (30, 30)
  corners = made[-1].corners
  assert len(corners) == round(0.3 * 6**2) == 11
  distances = [
    np.max(np.abs(a - b)) for i, a in enumerate(corners) for b in corners[:i]
  ]
  assert min(distances) >= 5
  assert made[-1].num_rotations == 4


def test_continuous_rotations_end_to_end_with_the_360_angle_error(
  tmp_path, prior
):
  config = _measurement_config(
    rotations="continuous", size_factor=6, density=0.2, min_separation=5
  )
  # EM's fine grid of angles: 16 unless the options say otherwise, with
  # chunks of as many (patch, rotation) pairs as Table I's 64 x 4.
  assert config.options.num_rotations == simulation.CONTINUOUS_NUM_ROTATIONS
  assert config.options.chunk_size * config.options.num_rotations == 256
  assert experiments.table_options("mnist").chunk_size == 64
  results, arrays = experiments.run_experiment(config, prior=prior)
  experiments.write_results(tmp_path, results, arrays)
  parameters = json.loads((tmp_path / "results.json").read_text())["parameters"]
  assert {
    k: parameters[k]
    for k in (
      "rotations",
      "num_rotations",
      "error_angles",
      "size_factor",
      "density",
      "min_separation",
    )
  } == {
    "rotations": "continuous",
    "num_rotations": 16,
    "error_angles": 360,
    "size_factor": 6,
    "density": 0.2,
    "min_separation": 5,
  }
  assert arrays["measurements"].shape == (1, 30, 30)
  (run,) = results["runs"]
  angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
  target, estimate = arrays["targets"][0], arrays["estimates"][0]
  assert np.isfinite(run["error"])
  assert run["error"] == pytest.approx(
    metrics.relative_error(target, estimate, 16, angles=angles)
  )
  assert run["error"] <= metrics.relative_error(target, estimate, 16)


def test_the_continuous_error_forgives_a_turn_of_17_degrees():
  # A smooth image inside the frame's disk: turning loses nothing.
  rows, cols = np.mgrid[:15, :15]
  truth = np.exp(-((rows - 5) ** 2 + (cols - 8) ** 2) / 4.0) + 0.6 * np.exp(
    -((rows - 9) ** 2 + (cols - 5) ** 2) / 3.0
  )
  turned = simulation.rotate_continuous(truth, np.deg2rad(17.0))
  the_plan = types.SimpleNamespace(
    runs=[{"trial": 0}, {"trial": 0}], targets=truth[None]
  )
  options = em.EMOptions(num_rotations=16)
  for rotations, near_zero in (("continuous", True), ("discrete", False)):
    config = _small_config_of(rotations)
    experiments._score_runs(  # pylint: disable=protected-access
      the_plan,
      np.stack([turned, truth]),
      np.zeros(2, int),
      np.ones(2),
      0.0,
      options,
      experiments._error_angles(config),  # pylint: disable=protected-access
    )
    error, exact = (run["error"] for run in the_plan.runs)
    assert exact == 0.0
    assert (error < 0.02) == near_zero, (rotations, error)


def _small_config_of(rotations):
  return dataclasses.replace(_small_config(), rotations=rotations)


@pytest.mark.parametrize(
  "change",
  [
    dict(rotations="continuous"),
    dict(min_separation=5),
    dict(size_factor=6),
    dict(density=0.2),
  ],
)
def test_resume_tells_measurement_settings_apart(tmp_path, prior, change):
  base = _measurement_config()
  other = dataclasses.replace(base, **change)
  (name,) = change
  keys = [
    experiments.fingerprint(c, experiments.plan(c, prior))
    for c in (base, other)
  ]
  assert keys[0] != keys[1]
  partial = str(tmp_path / "partial")
  experiments.save_block(
    partial, keys[0], 0, np.zeros((1, 5, 5)), [1], 0.0, [1.0], base
  )
  with pytest.raises(experiments.ExperimentError, match=name) as info:
    experiments.check_partial(partial, keys[1], other, [range(1)])
  assert "\n" not in str(info.value)
