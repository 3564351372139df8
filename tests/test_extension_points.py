"""The documented extension points hold from the command line down.

A toy M-step, a toy method and a toy prior class are registered here,
outside the package,
and run through the library, the reconstruction and experiment pipelines
and the `mtd-reconstruct` tool. The toy M-step goes halfway from F to the
exact maximiser of Q, so EM with it has the same fixed points as the closed
form: it must reach the closed form's estimate, in more iterations.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.em import mstep
from mtd_tf.em import registry
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import experiments
from mtd_tf.pipelines import reconstruction
from mtd_tf.priors import loading
from mtd_tf.priors import sde
from mtd_tf.recovery import methods

_STEP = "halfway_closed_form"
_METHOD = "halfway_no_prior"


def _halfway(images, stats, inputs):
  return 0.5 * (images + mstep.closed_form_mstep(images, stats, inputs))


@pytest.fixture
def toy_m_step():
  """Registers the toy M-step and a method that uses it; removes both."""
  em.register_m_step(_STEP, _halfway, "half a closed-form step")
  methods.register_method(
    _METHOD, "the toy M-step from one start", _STEP, False
  )
  yield
  del methods.METHODS[_METHOD]
  del registry.M_STEPS[_STEP]


@pytest.fixture
def measurement(tmp_path):
  rng = np.random.default_rng(11)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=20.0, seed=12)
  path = tmp_path / "m.npz"
  io.save_measurement(path, sim)
  return path, sim


def _options(**changes):
  return em.EMOptions(
    max_iterations=400, tolerance=1e-7, dtype="float64", **changes
  )


def test_a_registered_m_step_runs_in_em_and_is_checked(toy_m_step, measurement):
  _, sim = measurement
  init = np.full((5, 5), 0.5)
  exact = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, options=_options()
  )
  toy = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, options=_options(m_step=_STEP)
  )
  np.testing.assert_allclose(toy.estimate, exact.estimate, atol=1e-4)
  assert toy.iterations > exact.iterations
  # Registry properties reach the checks: it does not maximise Q, so
  # "auto" leaves it alone; the loop accepts it beside the built-ins.
  batch = em.ProblemBatch(
    [1.0, 1.0], np.zeros((2, 5, 5)), [_STEP, "gradient"], [0, 0]
  )
  assert not em.uses_acceleration(_options(acceleration="auto"), batch, None)
  with pytest.raises(ValueError, match="already registered"):
    em.register_m_step(_STEP, _halfway, "again")


def test_a_registered_method_runs_through_reconstruction(
  toy_m_step, measurement, tmp_path
):
  path, _ = measurement
  common = dict(measurements=(str(path),), image_size=5, init="uniform")
  exact = reconstruction.reconstruct(
    reconstruction.ReconstructionConfig(
      out=str(tmp_path / "exact.npz"),
      method="no_prior_closed_form",
      em=dict(
        max_iterations=400,
        tolerance=1e-7,
        dtype="float64",
        progress_every=0,
        acceleration="none",
      ),
      **common,
    )
  )
  toy = reconstruction.reconstruct(
    reconstruction.ReconstructionConfig(
      out=str(tmp_path / "toy.npz"),
      method=_METHOD,
      em=dict(
        max_iterations=400, tolerance=1e-7, dtype="float64", progress_every=0
      ),
      **common,
    )
  )
  assert toy["iterations"] > exact["iterations"]
  np.testing.assert_allclose(
    np.load(toy["out"])["estimate"],
    np.load(exact["out"])["estimate"],
    atol=1e-4,
  )
  assert toy["error"] == pytest.approx(exact["error"], abs=1e-3)


def test_the_tool_offers_and_runs_the_registered_m_step(
  toy_m_step, measurement, tmp_path, run_tool
):
  path, _ = measurement
  out = tmp_path / "tool.npz"
  done = run_tool(
    "mtd_tf.reconstruct",
    f"--measurement={path}",
    "--image_size=5",
    f"--out={out}",
    "--method=paper",
    f"--m_step={_STEP}",
    "--max_iterations=5",
    "--quiet",
  )
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["iterations"] == 5 and out.exists()
  done = run_tool("mtd_tf.reconstruct", "--help")
  assert done.returncode == 0 and _STEP in done.stdout


def test_a_registered_method_runs_in_an_experiment(toy_m_step):
  config = experiments.default_config(
    "gaussian",
    snrs=(20.0,),
    trials=2,
    methods=(_METHOD, "no_prior_closed_form"),
  )
  config = dataclasses.replace(
    config,
    options=dataclasses.replace(
      config.options, max_iterations=400, tolerance=1e-7, dtype="float64"
    ),
  )
  results, arrays = experiments.run_experiment(config)
  by_method = {
    m: [r for r in results["runs"] if r["method"] == m]
    for m in (_METHOD, "no_prior_closed_form")
  }
  assert results["parameters"]["m_steps"][_METHOD] == _STEP
  for toy, exact in zip(by_method[_METHOD], by_method["no_prior_closed_form"]):
    assert toy["error"] == pytest.approx(exact["error"], abs=1e-3)
    assert toy["iterations"] > exact["iterations"]


class ToyPrior:
  """A prior class of one's own: the exact score of N(mu, I), no package code.

  It declares the members of `priors.Prior` and builds itself from a folder
  whose prior.json names it.
  """

  kind = "gaussian"
  convention = None
  orientation_classifier = None
  scale = 1.0
  offset = 0.0
  t_prior = 0.01

  def __init__(self, metadata, path):
    size = int(metadata["image_size"])
    self.metadata = metadata
    self.path = path
    self.image_size = size
    self.gaussian_mean = np.reshape(metadata["mu"], (size, size))
    self.sde = sde.VPSDE()

  @classmethod
  def from_folder(cls, path):
    prior_json = pathlib.Path(path) / "assets" / "prior.json"
    return cls(json.loads(prior_json.read_text()), path)

  def curvature(self, t):
    del t  # -log N(mu, I) has curvature 1.
    return 1.0

  def __call__(self, x, t):
    del t
    return -(tf.convert_to_tensor(x, tf.float32) - self.gaussian_mean)


@pytest.fixture
def toy_prior_folders(tmp_path):
  """Folders of the same N(mu, I): as ToyPrior and as GaussianPrior."""
  priors.register_prior_class(ToyPrior)
  mu = np.random.default_rng(21).uniform(0.2, 0.8, (5, 5))
  folders = {}
  for name in ("ToyPrior", "GaussianPrior"):
    folder = tmp_path / name / "1"
    (folder / "assets").mkdir(parents=True)
    (folder / "assets" / "prior.json").write_text(
      json.dumps(
        {
          "prior_class": name,
          "kind": "gaussian",
          "image_size": 5,
          "mu": mu.ravel().tolist(),
        }
      )
    )
    folders[name] = str(folder)
  yield folders
  del loading.PRIOR_CLASSES["ToyPrior"]


def test_a_prior_class_of_ones_own_runs_through_reconstruction(
  toy_prior_folders, measurement, tmp_path
):
  path, _ = measurement
  assert isinstance(priors.load_prior(toy_prior_folders["ToyPrior"]), ToyPrior)

  def run(prior, out):
    return reconstruction.reconstruct(
      reconstruction.ReconstructionConfig(
        measurements=(str(path),),
        image_size=5,
        out=str(tmp_path / out),
        method="prior_preconditioned",
        init="uniform",
        prior=prior,
        em=dict(max_iterations=20, dtype="float64", progress_every=0),
      )
    )

  toy = run(toy_prior_folders["ToyPrior"], "toy.npz")
  reference = run(toy_prior_folders["GaussianPrior"], "reference.npz")
  plain = run(None, "plain.npz")
  np.testing.assert_allclose(
    np.load(toy["out"])["estimate"],
    np.load(reference["out"])["estimate"],
    rtol=1e-10,
  )
  # The prior was used, not dropped on the way.
  assert not np.allclose(
    np.load(toy["out"])["estimate"], np.load(plain["out"])["estimate"]
  )


def test_a_prior_class_of_ones_own_runs_in_an_experiment(toy_prior_folders):
  config = experiments.default_config(
    "gaussian", snrs=(2.0,), trials=2, methods=("prior_preconditioned",)
  )
  config = dataclasses.replace(
    config,
    options=dataclasses.replace(
      config.options, max_iterations=20, dtype="float64"
    ),
  )
  toy, _ = experiments.run_experiment(
    config, priors.load_prior(toy_prior_folders["ToyPrior"])
  )
  reference, _ = experiments.run_experiment(
    config, priors.load_prior(toy_prior_folders["GaussianPrior"])
  )
  assert [r["error"] for r in toy["runs"]] == pytest.approx(
    [r["error"] for r in reference["runs"]], rel=1e-9
  )
