"""Tests of mtd_tf/priors/sampling.py, mtd_tf/pipelines/prior_samples.py and
the mtd_tf/sample_prior.py tool."""

import os

import numpy as np
import pytest

from mtd_tf import priors
from mtd_tf import sample_prior
from mtd_tf.pipelines import prior_samples
from mtd_tf.priors import networks
from mtd_tf.priors import protocol
from mtd_tf.priors import sampling


@pytest.mark.slow
def test_samples_of_the_exact_gaussian_prior_are_n_mu_identity():
  mu = np.random.default_rng(5).integers(0, 5, size=(4, 4)).astype(np.float32)
  prior = priors.GaussianPrior(mu, diffused=True)
  images, evaluations = sampling.sample_images(prior, 2000, seed=3)
  assert images.shape == (2000, 4, 4) and images.dtype == np.float32
  assert evaluations > 10
  # Sampling error: per pixel sd 1/sqrt(2000) = 0.022 for the mean and
  # sqrt(2/2000) = 0.032 for the variance; pooled over 16 pixels, 4x less.
  np.testing.assert_allclose(images.mean(0), mu, atol=0.1)
  np.testing.assert_allclose(images.var(0), 1.0, atol=0.15)
  assert abs(np.mean(images - mu)) < 0.03
  assert abs(np.var(images - mu) - 1.0) < 0.04
  # Another seed, other samples; the same seed, the same samples.
  again, _ = sampling.sample_images(prior, 2000, seed=3)
  other, _ = sampling.sample_images(prior, 2000, seed=4)
  np.testing.assert_array_equal(images, again)
  assert not np.allclose(images, other)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_samples=0), "num_samples=0"),
    (dict(num_samples=-2), "num_samples=-2"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(eps=1.0), "eps=1.0"),
    (dict(rtol=0.0), "rtol=0.0"),
  ],
)
def test_sample_images_refuses_bad_values(kwargs, message):
  prior = priors.GaussianPrior(np.zeros((3, 3)), diffused=True)
  with pytest.raises(sampling.SamplingError, match=message):
    sampling.sample_images(prior, **{"num_samples": 4, **kwargs})
  with pytest.raises(sampling.SamplingError, match=message):
    prior_samples.SampleConfig(prior="p", out="o.png", **kwargs)


class _ContractOnly:
  """Exactly the members of priors.Prior, delegated to another prior."""

  def __init__(self, prior):
    self._prior = prior
    for name in protocol.MEMBERS[1:-1]:
      setattr(self, name, getattr(prior, name))

  def curvature(self, t):
    return self._prior.curvature(t)

  def __call__(self, x, t):
    return self._prior(x, t)


def test_sampling_reads_only_the_prior_contract():
  gaussian = priors.GaussianPrior(np.eye(3), diffused=True)
  toy = priors.as_prior(_ContractOnly(gaussian), 3)
  assert not hasattr(toy, "diffused") and not hasattr(toy, "network_score")
  np.testing.assert_array_equal(
    sampling.sample_images(toy, 8, seed=2)[0],
    sampling.sample_images(gaussian, 8, seed=2)[0],
  )


def test_time_independent_prior_is_refused():
  with pytest.raises(sampling.SamplingError, match="diffused=True"):
    sampling.sample_images(priors.GaussianPrior(np.zeros((3, 3))), 4)


def _run(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    sample_prior.run(["mtd-sample-prior", *argv])
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
  "flag, status, message",
  [
    ("--num_samples=0", 2, "num_samples=0"),
    ("--eps=2", 2, "eps=2.0"),
    ("--atol=-1", 2, "atol=-1.0"),
    ("--out=samples.txt", 2, "extension '.txt'"),
  ],
)
def test_tool_refuses_bad_values_in_one_line(
  tmp_path, capsys, monkeypatch, flag, status, message
):
  monkeypatch.chdir(tmp_path)
  code, out, err = _run(["--prior=nowhere", flag], capsys)
  assert code == status and out == ""
  assert err.count("\n") == 1 and message in err, err
  assert not os.listdir(tmp_path)


def test_tool_refuses_a_missing_prior(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, _, err = _run([f"--prior={tmp_path / 'none'}"], capsys)
  assert code == 1 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.slow
def test_tool_writes_a_grid_in_the_current_folder(
  tmp_path, capsys, monkeypatch
):
  grids = []
  draw = prior_samples.figures.image_grid

  def image_grid(images, path, *, clip=(0.0, 1.0), title=""):
    # Record the call, then draw the real grid.
    grids.append((np.asarray(images), clip, title))
    draw(images, path, clip=clip, title=title)

  monkeypatch.setattr(prior_samples.figures, "image_grid", image_grid)
  folder = priors.export_prior(
    networks.gaussian_score_mlp(9, 8),
    str(tmp_path / "m"),
    {"image_size": 3, "kind": "gaussian"},
    version=1,
  )
  monkeypatch.chdir(tmp_path)
  code, out, err = _run([f"--prior={folder}", "--num_samples=5"], capsys)
  assert code == 0, err
  assert out.startswith("Wrote 5 samples to prior_samples.png")
  png = tmp_path / "prior_samples.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  ((images, clip, title),) = grids
  assert images.shape == (5, 3, 3) and np.all(np.isfinite(images))
  # The kind's clip range (kinds.KINDS): none for Gaussian data.
  assert clip is None and "gaussian prior" in title
