"""The reconstruction library: checks before EM, summary, interrupted saves."""

import dataclasses
import os
import re
import types

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.base import table1
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction


@pytest.fixture
def measurement(tmp_path, rng):
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=20.0, seed=2)
  path = tmp_path / "m.npz"
  io.save_measurement(path, sim)
  return path, sim


def _config(path, **kwargs):
  fields = dict(
    measurements=(str(path),),
    image_size=5,
    out=str(path.parent / "est.npz"),
  )
  options = dict(max_iterations=30, progress_every=0)
  for name, value in kwargs.items():
    if name in em.EMOptions.__dataclass_fields__:
      options[name] = value
    else:
      fields[name] = value
  return reconstruction.ReconstructionConfig(**fields, em=options)


def test_summary_and_saved_estimate(measurement):
  path, sim = measurement
  config = _config(path, init="truth+0.2")
  summary = reconstruction.reconstruct(config)
  assert summary["initial_error"] == pytest.approx(0.2, abs=1e-9)
  assert summary["error"] < summary["initial_error"]
  assert 0 < summary["oracle_alignment_error"] < 1
  assert 1 <= summary["iterations"] <= 30
  with np.load(config.out) as saved:
    assert saved["estimate"].shape == (5, 5)
    assert float(saved["error"]) == pytest.approx(summary["error"])
    assert not bool(saved["interrupted"])
    assert float(saved["sigma"]) == pytest.approx(sim.sigma)


def test_truth_plus_r_has_exactly_that_relative_error(rng):
  truth = rng.uniform(0, 1, (6, 6))
  for level in (0.0, 0.1, 0.5):
    init = reconstruction.initial_estimate(f"truth+{level}", 6, truth, seed=3)
    assert np.linalg.norm(init - truth) / np.linalg.norm(truth) == (
      pytest.approx(level, abs=1e-12)
    )


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(init="cubic"), "Unknown init"),
    (dict(init="truth+x"), "Malformed init"),
    (dict(init="mnist_mean"), "image_size 28"),
    (dict(out="est.txt"), "extension"),
    (dict(sigma=-1.0), "sigma"),
    (dict(num_rotations=0), "num_rotations"),
    (dict(gamma="cubic"), "gamma"),
    (dict(measurements=()), "No measurement"),
  ],
)
def test_bad_configs_are_refused_before_reading_data(
  measurement, change, match
):
  path, _ = measurement
  if "out" in change:
    change = dict(out=str(path.parent / change["out"]))
  with pytest.raises(ValueError, match=match):
    reconstruction.check_config(_config(path, **change))


def test_output_equal_to_input_is_refused(measurement):
  path, _ = measurement
  link = path.parent / "same.npz"
  link.symlink_to(path)
  with pytest.raises(ValueError, match="also an input"):
    reconstruction.reconstruct(_config(path, out=str(link)))
  before = path.read_bytes()
  assert path.read_bytes() == before


def test_bad_recorded_copies_skip_the_floor_not_the_run(measurement, caplog):
  path, sim = measurement
  broken = dataclasses.replace(
    sim, corners=sim.corners + 1000, rotations=sim.rotations + 7
  )
  io.save_measurement(path, broken)
  summary = reconstruction.reconstruct(
    _config(path, init="truth+0.2", max_iterations=3)
  )
  assert "error" in summary
  assert "oracle_alignment_error" not in summary
  assert "oracle-alignment floor is not reported" in caplog.text


def test_true_image_of_another_size_gives_no_error(measurement):
  path, sim = measurement
  io.save_measurement(path, dataclasses.replace(sim, image=np.ones((4, 4))))
  summary = reconstruction.reconstruct(_config(path, max_iterations=2))
  assert "error" not in summary


def test_interrupt_saves_the_partial_estimate(measurement, monkeypatch):
  path, _ = measurement
  partial = np.full((5, 5), 0.25)

  def interrupted(*args, **kwargs):
    err = KeyboardInterrupt()
    err.partial_result = em.EMResult(partial, 7, np.zeros(7), 1.0)
    raise err

  monkeypatch.setattr(em, "approximate_em", interrupted)
  config = _config(path, method="paper")
  with pytest.raises(KeyboardInterrupt):
    reconstruction.reconstruct(config)
  with np.load(config.out) as saved:
    np.testing.assert_array_equal(saved["estimate"], partial)
    assert bool(saved["interrupted"])
    assert int(saved["iterations"]) == 7


def test_interrupt_without_partial_result_writes_nothing(
  measurement, monkeypatch
):
  path, _ = measurement

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(em, "approximate_em", interrupted)
  with pytest.raises(KeyboardInterrupt):
    reconstruction.reconstruct(_config(path, method="paper"))
  assert sorted(os.listdir(path.parent)) == ["m.npz"]


@pytest.mark.parametrize("kind", sorted(table1.DATASETS) + ["other"])
def test_gamma_and_m_step_follow_table_i_for_the_prior_kind(measurement, kind):
  path, _ = measurement
  prior = types.SimpleNamespace(kind=kind, t_prior=table1.T_PRIOR)
  paper = _config(path, method="paper")
  options = reconstruction._options(paper, prior)  # pylint: disable=protected-access
  assert options.gamma == table1.gamma_for(kind)
  assert options.m_step == "gradient"
  recommended = reconstruction._options(_config(path), prior)  # pylint: disable=protected-access
  assert recommended.m_step == "preconditioned"
  assert reconstruction._options(_config(path)).m_step == "closed_form"  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "given,expected",
  [
    (dict(), (4, 64)),
    (dict(rotations="continuous"), (16, 16)),
    (dict(rotations="continuous", num_rotations=32), (32, 8)),
    (dict(rotations="continuous", chunk_size=40), (16, 40)),
    (dict(rotations="continuous", chunk_size=None), (16, 16)),
  ],
)
def test_the_chunk_holds_256_patch_rotation_pairs_unless_given(
  measurement, given, expected
):
  path, _ = measurement
  config = _config(path, **given)
  options = reconstruction._options(config)  # pylint: disable=protected-access
  assert (options.num_rotations, options.chunk_size) == expected
  # The streamed data are chunked as the E-step is.
  assert reconstruction._em_field(config, "chunk_size") == expected[1]  # pylint: disable=protected-access


def test_shipped_prior_by_name():
  prior = priors.load_prior("gaussian_fc", image_size=5)
  assert prior.image_size == 5
  with pytest.raises(ValueError, match="L is 28"):
    priors.load_prior("gaussian_fc", image_size=28)


def test_bare_npy_without_sigma_uses_the_estimate(tmp_path):
  rng = np.random.default_rng(4)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=5.0, seed=5)
  path = tmp_path / "bare.npy"
  np.save(path, sim.measurement)
  config = _config(path, max_iterations=10)
  summary = reconstruction.reconstruct(config)
  assert summary["sigma_source"] == "estimated"
  # The recommended method refines the estimate from the data with EM.
  assert summary["sigma"] == pytest.approx(sim.sigma, rel=0.05)
  assert summary["sigma_from_data"] == pytest.approx(sim.sigma, rel=0.05)
  assert summary["sigma"] != summary["sigma_from_data"]
  with np.load(config.out) as saved:
    assert float(saved["sigma"]) == pytest.approx(summary["sigma"])
    assert float(saved["sigma_from_data"]) == summary["sigma_from_data"]
    assert bool(saved["sigma_estimated"])
  # Algorithm 1 as published keeps the estimate from the data.
  paper = reconstruction.reconstruct(
    _config(
      path, max_iterations=10, method="paper", out=str(tmp_path / "p.npz")
    )
  )
  assert (
    paper["sigma"] == paper["sigma_from_data"] == summary["sigma_from_data"]
  )


def test_paper_and_recommended_methods(measurement):
  path, _ = measurement
  paper = reconstruction.reconstruct(
    _config(path, method="paper", max_iterations=None)
  )
  assert paper["method"] == "paper" and paper["iterations"] <= 100
  assert "estimate_before_gauge" not in np.load(paper["out"])
  recommended = reconstruction.reconstruct(
    _config(path, method="recommended", max_iterations=None)
  )
  saved = np.load(recommended["out"])
  # A prior-free run has no gauge: the winner is returned as it is.
  np.testing.assert_array_equal(
    saved["estimate_before_gauge"], saved["estimate"]
  )
  with pytest.raises(ValueError, match="method"):
    reconstruction.check_config(_config(path, method="best"))


@pytest.mark.slow
def test_recommended_with_a_gauged_prior_saves_the_winner_before_the_gauge(
  tmp_path,
):
  from mtd_tf.model import datasets  # pylint: disable=g-import-not-at-top
  from mtd_tf.recovery import gauge  # pylint: disable=g-import-not-at-top

  digit = datasets.shipped_digits()["targets"][3]
  sim = simulation.simulate_measurement(digit, snr=1.0, seed=4)
  path = tmp_path / "m.npz"
  io.save_measurement(path, sim)
  summary = reconstruction.reconstruct(
    _config(
      path,
      image_size=28,
      method="recommended",
      prior="mnist_unet",
      max_iterations=None,
    )
  )
  saved = np.load(summary["out"])
  prior = priors.load_prior("mnist_unet")
  np.testing.assert_allclose(
    saved["estimate"],
    gauge.apply_convention(
      saved["estimate_before_gauge"],
      prior,
      position_sd=float(saved["gauge_position_sd"]),
      half_turn_sd=gauge.HALF_TURN_SD,
    ),
    atol=1e-5,
  )
  # The hedge is the centre of mass's standard error times the factor:
  # about 0.1 px with Table I's 12 copies at SNR 1.
  assert 0.03 < float(saved["gauge_position_sd"]) < 0.3
  assert summary["error"] < 0.5


def _no_em(monkeypatch):
  """Makes any EM run fail the test: refusals come before the work."""

  def started(*args, **kwargs):
    raise AssertionError("EM started")

  monkeypatch.setattr(em, "approximate_em", started)
  monkeypatch.setattr(reconstruction.recovery, "multistart_em", started)


def test_interrupted_multistart_saves_its_best_start(measurement, monkeypatch):
  """Was start 0's estimate with iterations per start (issue 26, case 13)."""
  path, _ = measurement
  starts = np.stack([np.full((5, 5), v) for v in (0.1, 0.2, 0.3)])
  history = np.array(
    [[-9.0, -8.0, -7.0], [-6.0, -5.0, np.nan], [-5.5, -4.0, np.nan]]
  )  # [T, B]: start 2 stopped, start 1 ends highest

  def interrupted(*args, **kwargs):
    err = KeyboardInterrupt()
    err.partial_result = em.EMResult(starts, np.array([3, 3, 1]), history, 1.0)
    raise err

  monkeypatch.setattr(reconstruction.recovery, "multistart_em", interrupted)
  config = _config(path)
  with pytest.raises(KeyboardInterrupt):
    reconstruction.reconstruct(config)
  with np.load(config.out) as saved:
    assert bool(saved["interrupted"])
    np.testing.assert_array_equal(saved["estimate"], starts[1].astype("f4"))
    assert saved["iterations"].shape == () and int(saved["iterations"]) == 3
    assert int(saved["start"]) == 1 and int(saved["starts"]) == 3
    assert "log-likelihood" in str(saved["start_selected_by"])
    np.testing.assert_array_equal(saved["log_likelihood"], [-8.0, -5.0, -4.0])


@pytest.mark.parametrize("ext", [".npy", ".mrc"])
def test_interrupted_bare_outputs_go_to_a_marked_name(
  measurement, monkeypatch, ext
):
  """A bare .npy / .mrc cannot say it is partial: not written under --out."""
  path, _ = measurement
  partial = np.full((5, 5), 0.25)

  def interrupted(*args, **kwargs):
    err = KeyboardInterrupt()
    err.partial_result = em.EMResult(partial, 7, np.zeros(7), 1.0)
    raise err

  monkeypatch.setattr(em, "approximate_em", interrupted)
  out = path.parent / f"est{ext}"
  with pytest.raises(KeyboardInterrupt):
    reconstruction.reconstruct(_config(path, method="paper", out=str(out)))
  assert not out.exists()
  marked = path.parent / f"est.interrupted{ext}"
  saved = io.load_measurement(marked).measurement
  np.testing.assert_array_equal(saved, partial)


@pytest.mark.parametrize(
  "change", [dict(gamma="constant:1"), dict(t_prior=0.1)]
)
def test_prior_options_without_a_prior_are_refused(measurement, change):
  path, _ = measurement
  with pytest.raises(ValueError, match="without a prior"):
    reconstruction.check_config(_config(path, **change))


def _offset_micrographs(folder, offsets, scales=None, sigma=0.5):
  """Three .mrc micrographs of one image with background levels (no sigma)."""
  import mrcfile  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(11).uniform(0, 1, (5, 5))
  paths = []
  for i, offset in enumerate(offsets):
    sim = simulation.simulate_measurement(
      image, sigma=sigma, seed=i, measurement_shape=(30, 25)
    )
    scale = 1.0 if scales is None else scales[i]
    path = folder / f"mic{i}.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:
      mrc.set_data((scale * sim.measurement + offset).astype(np.float32))
    paths.append(str(path))
  return paths


def test_backgrounds_are_removed_reported_and_streamed_alike(tmp_path):
  paths = _offset_micrographs(tmp_path, [0.0, 1.0, -3.0])
  common = dict(
    measurements=tuple(paths),
    image_size=5,
    init="uniform",
    method="paper",
    em=dict(
      max_iterations=6,
      tolerance=0.0,
      dtype="float64",
      chunk_size=4,
      progress_every=0,
      acceleration="none",
    ),
  )
  a = reconstruction.reconstruct(
    reconstruction.ReconstructionConfig(out=str(tmp_path / "a.npz"), **common)
  )
  b = reconstruction.reconstruct(
    reconstruction.ReconstructionConfig(
      out=str(tmp_path / "b.npz"), stream="always", **common
    )
  )
  assert not a["streamed"] and b["streamed"]
  assert a["sigma_source"] == "estimated"
  assert a["sigma"] == pytest.approx(0.5, rel=0.1)
  levels = np.array(a["background"])
  np.testing.assert_allclose(levels - levels[0], [0.0, 1.0, -3.0], atol=0.15)
  assert b["background"] == a["background"] and b["sigma"] == a["sigma"]
  with np.load(a["out"]) as x, np.load(b["out"]) as y:
    np.testing.assert_array_equal(x["background"], levels)
    assert x["micrograph_sigma"].shape == (3,)
    np.testing.assert_allclose(x["estimate"], y["estimate"], atol=1e-6)
  assert a["final_log_likelihood"] == pytest.approx(
    b["final_log_likelihood"], rel=1e-12
  )


@pytest.mark.parametrize("stream", ["never", "always"])
def test_micrographs_on_different_scales_are_refused_naming_them(
  tmp_path, monkeypatch, stream
):
  paths = _offset_micrographs(tmp_path, [0.0, 0.0, 0.0], scales=[1, 100, 1])
  _no_em(monkeypatch)
  config = reconstruction.ReconstructionConfig(
    measurements=tuple(paths),
    image_size=5,
    out=str(tmp_path / "e.npz"),
    stream=stream,
  )
  with pytest.raises(ValueError, match="different scales") as info:
    reconstruction.reconstruct(config)
  message = str(info.value)
  assert re.search(r"mic1.mrc \(sigma 5\d\) against \S+mic[02].mrc", message)
  assert "normalise" in message
  assert "\n" not in message
  assert not (tmp_path / "e.npz").exists()
  # A given sigma imposes one noise level.
  monkeypatch.undo()
  summary = reconstruction.reconstruct(
    dataclasses.replace(config, sigma=0.5, em=dict(max_iterations=1))
  )
  assert summary["sigma_source"] == "given"


def test_a_corrupt_file_among_good_ones_is_refused_before_streaming(
  tmp_path, monkeypatch
):
  """Was a 400-character IteratorGetNext error mid-EM (issue 26, case 7)."""
  paths = _offset_micrographs(tmp_path, [0.0, 0.0])
  data = open(paths[1], "rb").read()
  bad = tmp_path / "mic9.mrc"
  bad.write_bytes(data[: len(data) // 2])
  _no_em(monkeypatch)
  with pytest.raises(ValueError, match="mic9.mrc") as info:
    reconstruction.reconstruct(
      reconstruction.ReconstructionConfig(
        measurements=(*paths, str(bad)),
        image_size=5,
        out=str(tmp_path / "e.npz"),
        stream="always",
      )
    )
  assert "\n" not in str(info.value)
  assert not (tmp_path / "e.npz").exists()


@pytest.mark.parametrize(
  "array,sigma,background,match",
  [
    (np.full((20, 20), 5.0), None, "estimate", "is constant"),
    (np.zeros((20, 20)), 1.0, "estimate", "is constant"),
    (np.zeros((5, 20)), 1.0, "estimate", "holds 1 x 4 patches"),
    (np.pad(np.ones((5, 5)), ((2, 13), (3, 12))), 1.0, "estimate", "no noise"),
  ],
)
def test_micrographs_that_cannot_be_handled_are_refused(
  tmp_path, monkeypatch, array, sigma, background, match
):
  path = tmp_path / "m.npy"
  np.save(path, array)
  _no_em(monkeypatch)
  with pytest.raises(ValueError, match=match):
    reconstruction.reconstruct(
      reconstruction.ReconstructionConfig(
        measurements=(str(path),),
        image_size=5,
        out=str(tmp_path / "e.npz"),
        sigma=sigma,
        background=background,
      )
    )
  assert sorted(os.listdir(tmp_path)) == ["m.npy"]


def test_noise_free_data_run_as_they_are_with_background_none(tmp_path):
  copies = np.zeros((20, 20))
  copies[2:7, 3:8] = np.random.default_rng(0).uniform(0, 1, (5, 5))
  path = tmp_path / "m.npy"
  np.save(path, copies)
  summary = reconstruction.reconstruct(
    _config(path, sigma=0.1, background="none", max_iterations=2)
  )
  assert summary["background"] == [0.0]
