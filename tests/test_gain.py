"""A measurement with a gain reconstructs in the prior's units.

Issue: `mtd-reconstruct --prior=...` on a measurement times 40 (plus a
level) gave a wrong answer with exit 0: the prior's score was evaluated on
images in the data's units. The gain is now estimated
(`recovery.units`) and divided out before EM; checked against simulator
truth with the exact Gaussian prior N(mu, I) (L = 5: seconds per run).
"""

import dataclasses
import json

import numpy as np
import pytest

from mtd_tf import priors
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction
from mtd_tf.recovery import units

# The shipped Gaussian experiment's mean (gaussian_fc's prior.json).
MU = np.reshape(
  json.loads(
    (
      priors.shipped_root() / "gaussian_fc" / "1" / "assets" / "prior.json"
    ).read_text()
  )["mu"],
  (5, 5),
)


def _alpha(t):
  return float(np.exp(-0.5 * (0.1 * t + 9.95 * t * t)))  # eq. 8, Table I


@pytest.fixture(scope="module")
def exact_prior(tmp_path_factory):
  """A folder of the exact prior N(MU, I) (`priors.GaussianPrior`)."""
  folder = tmp_path_factory.mktemp("prior") / "1"
  (folder / "assets").mkdir(parents=True)
  (folder / "assets" / "prior.json").write_text(
    json.dumps(
      {
        "prior_class": "GaussianPrior",
        "kind": "gaussian",
        "image_size": 5,
        "mu": MU.ravel().tolist(),
      }
    )
  )
  return str(folder)


def test_the_scale_of_a_noisy_gaussian_image_is_its_regression_on_mu():
  # Under p_t = N(alpha(t) mu, I) the likelihood of z = c u is largest at
  # s = alpha c = (z . mu) / ||mu||^2 wherever z is noisier than p_t_prior.
  prior = priors.GaussianPrior(MU)
  rng = np.random.default_rng(4)
  for gain in (0.02, 1.0, 40.0):
    image = MU + 1.5 * rng.standard_normal((5, 5))  # N(mu, (1 + 1.25) I)
    z = gain * image
    found = units.scale_of_image(z, prior)
    assert found.gain == pytest.approx(np.sum(z * MU) / np.sum(MU**2), 0.01)
    assert found.reliable and found.time > prior.t_prior
    # z's noise beyond N(mu, I), in the prior's units: sqrt(1.25) = 1.1.
    assert 0.6 < found.noise < 1.8


def test_the_scale_of_a_clean_gaussian_image_is_the_root_at_t_prior():
  # mu itself is less spread than N(mu, I): the likelihood is largest at
  # t_prior, where u . s(u) = -d is d s^2 + a^2 (z . mu) s - a^2 ||z||^2 = 0.
  prior = priors.GaussianPrior(MU)
  z = 3.0 * MU
  found = units.scale_of_image(z, prior)
  a2, d = _alpha(prior.t_prior) ** 2, MU.size
  b, c = a2 * np.sum(z * MU), -a2 * np.sum(z * z)
  root = (-b + np.sqrt(b * b - 4 * d * c)) / (2 * d)
  assert found.time == prior.t_prior
  assert found.gain == pytest.approx(root, rel=1e-3)


def test_the_scale_follows_the_gain_and_the_orientation_is_found():
  prior = priors.GaussianPrior(MU)
  image = MU + np.random.default_rng(5).standard_normal((5, 5))
  base = units.scale_of_image(np.rot90(image, 3), prior, num_rotations=4)
  np.testing.assert_array_equal(base.estimate, image)  # turned back
  for gain in (1e-2, 1e3):
    found = units.scale_of_image(gain * image, prior, num_rotations=4)
    assert found.gain == pytest.approx(gain * base.gain, rel=1e-4)


def test_a_score_that_is_not_a_diffusion_is_not_reliable():
  # -(x - mu) at every t, without saying it is Gaussian: at t = 1 it is
  # far from N(0, I)'s score, so z's noise cannot be told from the image.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  mu = tf.constant(MU, tf.float32)
  prior = priors.ScorePrior(lambda x, t: -(x - mu), 5)
  found = units.scale_of_image(2.0 * MU, prior)
  assert not found.reliable and "not a diffusion" in found.note
  # Read at t_prior: the root of d c^2 + (z . mu) c - ||z||^2, s = alpha c.
  b, c = np.sum(2.0 * MU * MU), -np.sum(4.0 * MU * MU)
  root = (-b + np.sqrt(b * b - 4 * MU.size * c)) / (2 * MU.size)
  assert found.gain == pytest.approx(_alpha(prior.t_prior) * root, rel=1e-3)


def test_an_estimate_of_zeros_has_no_scale():
  with pytest.raises(units.GainError, match="zero or not finite"):
    units.scale_of_image(np.zeros((5, 5)), priors.GaussianPrior(MU))


def _simulated(seed=2, snr=10.0):
  image = MU + np.random.default_rng(100 + seed).standard_normal((5, 5))
  return simulation.simulate_measurement(image, snr=snr, seed=seed)


def _save(folder, name, sim, gain, offset):
  """gain x the measurement + offset, its truth kept, no sigma recorded."""
  path = folder / name
  io.save_measurement(
    path,
    dataclasses.replace(
      sim, measurement=gain * sim.measurement + offset, sigma=None
    ),
  )
  return path


def _run(path, **fields):
  config = reconstruction.ReconstructionConfig(
    measurements=(str(path),),
    image_size=5,
    out=str(path.parent / f"e_{path.stem}.npz"),
    checkpoint_every=0,
    em=dict(progress_every=0),
    **fields,
  )
  return reconstruction.reconstruct(config)


def test_a_gained_measurement_reconstructs_in_the_prior_units(
  tmp_path, exact_prior
):
  # Seed 6 at SNR 10: gain found 0.97 g. Over seeds 1-6 at SNR 5 and 10 it
  # was 0.89-1.06 g and the error 0.001-0.057 above the clean one's
  # (one N(mu, I) draw of 25 pixels fixes its scale to about 5 %).
  sim = _simulated(seed=6)
  clean = _run(_save(tmp_path, "clean.npz", sim, 1.0, 0.0), prior=exact_prior)
  assert clean["gain"] == 1.0 and clean["gain_source"] == "estimated"
  assert clean["gain_found"] == pytest.approx(1.0, rel=0.2)
  assert clean["error"] < 0.2
  for gain, offset in ((40.0, 300.0), (0.02, -1.5)):
    path = _save(tmp_path, f"g{gain:g}.npz", sim, gain, offset)
    found = _run(path, prior=exact_prior)
    assert found["gain"] == pytest.approx(gain, rel=0.2)
    assert found["gain_source"] == "estimated"
    assert found["error"] == pytest.approx(clean["error"], rel=0.1, abs=0.02)
    # sigma in the prior's units; the background in the data's.
    assert found["sigma"] == pytest.approx(clean["sigma"], rel=0.2)
    assert found["background"][0] == pytest.approx(offset, abs=0.05 * gain)
    with np.load(found["out"]) as saved:
      assert float(saved["gain"]) == found["gain"]
      assert str(saved["gain_source"]) == "estimated"
    # As they are, the data are far from the prior's units (what happened
    # before): times 40 the prior outweighs them (the estimate is near mu),
    # times 0.02 they outweigh the prior (near 0.02 F).
    kept = _run(path, prior=exact_prior, gain="none")
    assert kept["gain"] == 1.0 and kept["gain_found"] is None
    assert kept["error"] > 2 * clean["error"]


def test_data_in_the_prior_units_are_left_bit_for_bit(tmp_path, exact_prior):
  path = _save(tmp_path, "m.npz", _simulated(seed=3), 1.0, 0.0)
  auto = _run(path, prior=exact_prior)
  plain = _run(path, prior=exact_prior, gain="none")
  assert auto["gain"] == 1.0 and auto["gain_found"] is not None
  with np.load(auto["out"]) as a, np.load(plain["out"]) as b:
    np.testing.assert_array_equal(a["estimate"], b["estimate"])
  assert auto["error"] == plain["error"]


def test_a_given_gain_divides_the_data_and_no_prior_fixes_none(tmp_path):
  sim = _simulated(seed=4)
  clean = _run(_save(tmp_path, "clean.npz", sim, 1.0, 0.0))
  assert clean["gain"] == 1.0 and clean["gain_source"] == "no prior"
  path = _save(tmp_path, "g40.npz", sim, 40.0, 0.0)
  given = _run(path, gain="40")
  assert given["gain"] == 40.0 and given["gain_source"] == "given"
  assert given["error"] == pytest.approx(clean["error"], abs=1e-3)
  # Without a prior nothing fixes the units: the estimate is the data's.
  kept = _run(path)
  assert kept["gain_source"] == "no prior"
  with np.load(kept["out"]) as k, np.load(clean["out"]) as c:
    assert np.linalg.norm(k["estimate"]) == pytest.approx(
      40 * np.linalg.norm(c["estimate"]), rel=0.01
    )


def test_streamed_data_are_rescaled_as_in_memory(tmp_path, exact_prior):
  path = _save(tmp_path, "m.npz", _simulated(seed=6), 40.0, 300.0)
  for gain in ("40", "auto"):
    held = _run(path, prior=exact_prior, gain=gain, stream="never")
    streamed = _run(path, prior=exact_prior, gain=gain, stream="always")
    assert streamed["streamed"] and not held["streamed"]
    assert streamed["gain"] == held["gain"] != 1.0
    assert streamed["gain_source"] == held["gain_source"]
    with np.load(streamed["out"]) as a, np.load(held["out"]) as b:
      np.testing.assert_allclose(a["estimate"], b["estimate"], atol=1e-5)


@pytest.mark.slow
def test_a_gained_digit_reconstructs_as_the_clean_one_with_the_prior(tmp_path):
  from mtd_tf.model import datasets  # pylint: disable=g-import-not-at-top

  digit = datasets.shipped_digits()["targets"][3]
  sim = simulation.simulate_measurement(digit, snr=1.0, seed=1)

  def run(path):
    return reconstruction.reconstruct(
      reconstruction.ReconstructionConfig(
        measurements=(str(path),),
        image_size=28,
        out=str(path.parent / f"e_{path.stem}.npz"),
        prior="mnist_unet",
        checkpoint_every=0,
        em=dict(progress_every=0),
      )
    )

  clean = run(_save(tmp_path, "clean.npz", sim, 1.0, 0.0))
  gained = run(_save(tmp_path, "g40.npz", sim, 40.0, 100.0))
  assert clean["gain"] == 1.0 and clean["error"] < 0.2
  assert gained["gain"] == pytest.approx(40.0, rel=0.2)
  assert gained["error"] == pytest.approx(clean["error"], rel=0.1, abs=0.02)


@pytest.mark.parametrize("gain", ["-1", "0", "nan", "inf", "abc"])
def test_bad_gains_are_refused_in_one_line(tmp_path, run_tool, gain):
  _save(tmp_path, "m.npz", _simulated(), 1.0, 0.0)
  done = run_tool(
    "mtd_tf.reconstruct",
    "--measurement=m.npz",
    "--image_size=5",
    f"--gain={gain}",
    cwd=tmp_path,
  )
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert "usage error: gain" in lines[0] and "positive finite" in lines[0]
  assert not (tmp_path / "estimate.npz").exists()


def test_a_bad_gain_is_refused_by_the_library_before_any_work(tmp_path):
  path = _save(tmp_path, "m.npz", _simulated(), 1.0, 0.0)
  with pytest.raises(reconstruction.ReconstructionError, match="gain '-3'"):
    _run(path, gain="-3")
  assert not (tmp_path / "e_m.npz").exists()
