"""Tests of mtd_tf/priors/ (the Prior contract, its classes, loading, export,
the data kinds) and of the shipped priors in saved_models/."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import saved_priors
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.base import table1
from mtd_tf.model import simulation
from mtd_tf.priors import kinds
from mtd_tf.priors import loading
from mtd_tf.priors import networks
from mtd_tf.priors import protocol
from mtd_tf.priors import sde as sde_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
GAUSSIAN = REPO / "saved_models" / "gaussian_fc" / "1"
MNIST = REPO / "saved_models" / "mnist_unet" / "1"
BIN = pathlib.Path(sys.executable).parent
SDE = sde_lib.VPSDE()


@pytest.fixture(scope="module")
def gaussian_prior():
  return priors.load_prior(str(GAUSSIAN))


@pytest.fixture(scope="module")
def mnist_prior():
  return priors.load_prior(str(MNIST))


def test_gaussian_oracle():
  mu = np.arange(25, dtype=np.float32).reshape(5, 5) / 10
  prior = priors.GaussianPrior(mu)
  x = np.random.default_rng(0).normal(size=(3, 5, 5)).astype(np.float32)
  np.testing.assert_allclose(prior(x, 0.01), -(x - mu), rtol=1e-6)
  assert prior.image_size == 5 and prior.t_prior == 0.01
  diffused = priors.GaussianPrior(mu, diffused=True)
  t = np.array([0.0, 0.5, 1.0], np.float32)
  alpha = SDE.alpha(t).numpy()[:, None, None]
  np.testing.assert_allclose(
    diffused(x, t), -(x - alpha * mu), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("path,size", [(GAUSSIAN, 5), (MNIST, 28)])
def test_signature_exactly_as_specified(path, size):
  loaded = tf.saved_model.load(str(path))
  fn = loaded.signatures["serving_default"]
  args, kwargs = fn.structured_input_signature
  assert args == ()
  assert sorted(kwargs) == ["t", "x"]
  assert kwargs["x"].shape.as_list() == [None, size, size]
  assert kwargs["t"].shape.as_list() == [None]
  assert kwargs["x"].dtype == tf.float32 and kwargs["t"].dtype == tf.float32
  assert list(fn.structured_outputs) == ["score"]
  assert fn.structured_outputs["score"].shape.as_list() == [None, size, size]
  assert fn.structured_outputs["score"].dtype == tf.float32
  meta = json.loads((path / "assets" / "prior.json").read_text())
  for key in (
    "image_size",
    "kind",
    "beta_min",
    "beta_max",
    "t_prior",
    "scale",
    "offset",
    "training_data",
    "steps",
    "training_time_seconds",
    "device",
    "final_train_loss",
    "final_heldout_loss",
    "mtd_tf_version",
    "architecture",
  ):
    assert key in meta, key
  assert meta["image_size"] == size
  assert (meta["beta_min"], meta["beta_max"], meta["t_prior"]) == (
    0.1,
    20.0,
    0.01,
  )
  size_mb = (
    sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
  )
  assert size_mb < 20


@pytest.mark.parametrize("batch", [1, 37])
def test_dynamic_batch_and_scalar_time(gaussian_prior, batch):
  x = np.random.default_rng(batch).normal(size=(batch, 5, 5)).astype(np.float32)
  out = gaussian_prior(x, np.full([batch], 0.01, np.float32))
  assert out.shape == (batch, 5, 5)
  np.testing.assert_allclose(gaussian_prior(x, 0.01), out, rtol=1e-6)


def test_callable_inside_compiled_while_loop(gaussian_prior):
  # The EM loop calls the prior in a tf.function while loop with constant t.
  @tf.function
  def ascent(f):
    def body(i, f):
      return i + 1, f + 0.1 * gaussian_prior(f, gaussian_prior.t_prior)

    return tf.while_loop(lambda i, f: i < 50, body, [tf.constant(0), f])[1]

  f0 = tf.zeros([1, 5, 5])
  mu = np.asarray(gaussian_prior.metadata["mu"], np.float32).reshape(5, 5)
  out = ascent(f0).numpy()[0]
  # Gradient ascent on log N(mu, I) from 0 moves to mu (1 - 0.9^50 = 0.995).
  assert np.linalg.norm(out - mu) < 0.15 * np.linalg.norm(mu)


def test_shipped_gaussian_score_within_ten_percent(gaussian_prior):
  meta = gaussian_prior.metadata
  assert meta["kind"] == "gaussian"
  mu = np.asarray(meta["mu"], np.float32).reshape(5, 5)
  assert set(np.unique(mu)) <= {0, 1, 2, 3, 4}
  rng = np.random.default_rng(987654)  # fresh samples, not the training ones
  x = (mu + rng.standard_normal((1000, 5, 5))).astype(np.float32)
  pred = gaussian_prior(x, gaussian_prior.t_prior).numpy()
  exact = -(x - mu)
  rel = np.linalg.norm(pred - exact) / np.linalg.norm(exact)
  assert rel < 0.10, rel


def _tweedie_psnr_gain(score_fn, x0, t, seed=0):
  """Mean per-image PSNR of Tweedie denoising minus that of the noisy input."""
  rng = np.random.default_rng(seed)
  alpha = float(SDE.alpha(t))
  sigma = float(SDE.sigma(t))
  xt = (alpha * x0 + sigma * rng.standard_normal(x0.shape)).astype(np.float32)
  score = score_fn(xt, np.full([len(x0)], t, np.float32)).numpy()
  denoised = (xt + sigma**2 * score) / alpha

  def psnr(est):
    mse = np.mean((est - x0) ** 2, axis=(1, 2))
    return np.mean(10 * np.log10(1.0 / mse))

  # The noisy input's better reading: x_t itself or x_t / alpha.
  noisy = max(psnr(xt), psnr(xt / alpha))
  return psnr(denoised) - noisy, noisy


@pytest.fixture(scope="module")
def test_digits(request):
  path = pathlib.Path(
    os.environ.get(
      "MTD_MNIST_NPZ", REPO.parent / "shared" / "data" / "mnist.npz"
    )
  )
  if not path.exists():
    pytest.skip(
      f"MNIST file not found at {path}; set MTD_MNIST_NPZ to run "
      "the MNIST quality tests."
    )
  with np.load(path) as data:
    return data["x_test"][::40][:250].astype(np.float32) / 255.0


def test_shipped_mnist_tweedie_denoising(mnist_prior, test_digits):
  assert mnist_prior.metadata["kind"] == "mnist"
  assert mnist_prior.image_size == 28
  gain, noisy = _tweedie_psnr_gain(mnist_prior, test_digits, 0.0925)
  assert 9.5 < noisy < 11.0  # sigma_t ~ 0.3
  assert gain >= 8.0, gain
  gain_small, _ = _tweedie_psnr_gain(mnist_prior, test_digits, 0.01)
  assert gain_small > 0.0, gain_small


def test_untrained_unet_does_not_denoise(mnist_prior, test_digits):
  meta = mnist_prior.metadata
  model = networks.mnist_unet(
    28, tuple(meta["channels"]), activation=meta["activation"]
  )
  fresh = lambda x, t: model([tf.constant(x), tf.constant(t)])
  gain, _ = _tweedie_psnr_gain(fresh, test_digits, 0.0925)
  assert gain < 8.0, gain


@pytest.mark.slow  # A fresh interpreter.
def test_subprocess_with_only_tensorflow(tmp_path):
  code = (
    "import sys, numpy as np, tensorflow as tf\n"
    "m = tf.saved_model.load(sys.argv[1])\n"
    'f = m.signatures["serving_default"]\n'
    "out = f(x=tf.zeros([3, 28, 28]), t=tf.fill([3], 0.01))\n"
    'assert set(out) == {"score"}, out\n'
    'print("shape", out["score"].shape.as_list())\n'
    'assert "mtd_tf" not in sys.modules\n'
    'assert "tensorflow_probability" not in sys.modules\n'
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run(
    [sys.executable, "-c", code, str(MNIST)],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    cwd=tmp_path,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert "shape [3, 28, 28]" in res.stdout


@pytest.mark.slow
def test_saved_model_cli_show_and_run(tmp_path, gaussian_prior):
  cli = str(BIN / "saved_model_cli")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  show = subprocess.run(
    [cli, "show", "--dir", str(GAUSSIAN), "--all"],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
  )
  assert show.returncode == 0, show.stderr[-2000:]
  assert "signature_def['serving_default']" in show.stdout
  assert "signature_def['serve_dict']" in show.stdout
  assert "inputs['x']" in show.stdout and "inputs['t']" in show.stdout
  assert "outputs['score']" in show.stdout
  x = np.random.default_rng(0).normal(size=(4, 5, 5)).astype(np.float32)
  t = np.full([4], 0.01, np.float32)
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "t.npy", t)
  run = subprocess.run(
    [
      cli,
      "run",
      "--dir",
      str(GAUSSIAN),
      "--tag_set",
      "serve",
      "--signature_def",
      "serving_default",
      "--inputs",
      f"x={tmp_path / 'x.npy'};t={tmp_path / 't.npy'}",
      "--outdir",
      str(tmp_path / "out"),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  score = np.load(tmp_path / "out" / "score.npy")
  np.testing.assert_allclose(
    score, gaussian_prior(x, t).numpy(), rtol=1e-5, atol=1e-5
  )


def test_loads_as_tfsm_layer():
  import keras  # pylint: disable=g-import-not-at-top

  layer = keras.layers.TFSMLayer(str(GAUSSIAN), call_endpoint="serve_dict")
  out = layer({"x": tf.zeros([2, 5, 5]), "t": tf.fill([2], 0.01)})
  assert out["score"].shape == (2, 5, 5)


def test_export_writes_the_next_free_version_and_never_replaces_one(tmp_path):
  import keras  # pylint: disable=g-import-not-at-top

  model = networks.gaussian_score_mlp(9, 8)
  meta = {"image_size": 3, "kind": "gaussian", "mu": [0.0] * 9}
  first = priors.export_prior(model, str(tmp_path / "tiny"), meta)
  assert first == str(tmp_path / "tiny" / "1")
  assert sorted(os.listdir(tmp_path / "tiny")) == ["1"]  # no temp folders
  second = priors.export_prior(model, tmp_path / "tiny", meta)
  assert second == str(tmp_path / "tiny" / "2")
  prior = priors.load_prior(str(tmp_path / "tiny"))  # newest version
  assert prior.path == second
  x = np.random.default_rng(0).normal(size=(5, 3, 3)).astype(np.float32)
  np.testing.assert_allclose(
    prior(x, 0.01), model([x, np.zeros(5, "f")]), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(
    priors.PriorError,
    match=r"tiny/1 exists: versions never "
    "change",
  ):
    priors.export_prior(model, tmp_path / "tiny", meta, version=1)
  assert (
    priors.export_prior(
      model, tmp_path / "tiny", meta, version=1, overwrite=True
    )
    == first
  )
  assert priors.export_prior(
    model, tmp_path / "tiny", meta, version=7
  ).endswith("7")
  assert sorted(os.listdir(tmp_path / "tiny")) == ["1", "2", "7"]
  with pytest.raises(priors.PriorError, match="positive integer"):
    priors.export_prior(model, tmp_path / "tiny", meta, version=0)
  # The Keras model travels with the export, ready for fine-tuning.
  keras_file = pathlib.Path(first) / "assets.extra" / "score_network.keras"
  reloaded = keras.models.load_model(keras_file)
  np.testing.assert_allclose(
    reloaded([x, np.zeros(5, "f")]), model([x, np.zeros(5, "f")]), rtol=1e-6
  )
  assert (
    pathlib.Path(first) / "assets.extra" / "tf_serving_warmup_requests"
  ).is_file()


def test_scaling_applies_to_inputs_and_score(tmp_path):
  # A network with score -(x - 1): in image units F with x = 2 F + 1 the
  # score is 2 * -(2 F + 1 - 1) = -4 F.
  import keras  # pylint: disable=g-import-not-at-top

  x_in = keras.Input((3, 3))
  t_in = keras.Input(())
  out = keras.layers.Lambda(lambda v: 1.0 - v)(x_in)
  model = keras.Model([x_in, t_in], out)
  meta = {"image_size": 3, "kind": "gaussian", "scale": 2.0, "offset": 1.0}
  prior = priors.load_prior(
    priors.export_prior(model, str(tmp_path / "m"), meta)
  )
  f = np.random.default_rng(1).normal(size=(2, 3, 3)).astype(np.float32)
  np.testing.assert_allclose(prior(f, 0.01), -4 * f, rtol=1e-5, atol=1e-6)


def test_errors_are_clear(tmp_path):
  with pytest.raises(priors.PriorError, match="does not exist"):
    priors.load_prior(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(priors.PriorError, match="not a SavedModel"):
    priors.load_prior(str(tmp_path / "empty"))
  corrupt = tmp_path / "corrupt"
  shutil.copytree(GAUSSIAN, corrupt)
  pb = corrupt / "saved_model.pb"
  pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 3])
  with pytest.raises(priors.PriorError, match="corrupt or truncated"):
    priors.load_prior(str(corrupt))
  no_json = tmp_path / "no_json"
  shutil.copytree(GAUSSIAN, no_json)
  os.remove(no_json / "assets" / "prior.json")
  with pytest.raises(priors.PriorError, match="prior.json"):
    priors.load_prior(str(no_json))
  # A SavedModel without serving_default.
  module = tf.Module()
  module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None])])
  tf.saved_model.save(module, str(tmp_path / "no_sig"))
  with pytest.raises(priors.PriorError, match="serving_default"):
    priors.load_prior(str(tmp_path / "no_sig"))
  # A serving_default with the wrong inputs.
  module.g = tf.function(
    lambda y: {"score": y},
    input_signature=[tf.TensorSpec([None, 5, 5], name="y")],
  )
  tf.saved_model.save(
    module, str(tmp_path / "bad_sig"), signatures={"serving_default": module.g}
  )
  with pytest.raises(priors.PriorError, match="must take x"):
    priors.load_prior(str(tmp_path / "bad_sig"))


def test_wrong_image_size(gaussian_prior):
  priors.check_image_size(gaussian_prior, 5)
  with pytest.raises(
    priors.PriorError, match="5x5 images but the image size L is 28"
  ):
    priors.check_image_size(gaussian_prior, 28)
  with pytest.raises(priors.PriorError, match="use a prior trained for L = 28"):
    priors.load_prior(str(GAUSSIAN), image_size=28)
  assert priors.load_prior(str(MNIST), image_size=28).image_size == 28


def test_probability_flow_samples_of_exported_gaussian(tmp_path):
  # An exported network equal to the exact diffused score of N(mu, I):
  # sample_images must then return N(mu, I) samples.
  import keras  # pylint: disable=g-import-not-at-top

  from mtd_tf.priors import sampling  # pylint: disable=g-import-not-at-top

  mu = np.arange(9, dtype=np.float32).reshape(3, 3) / 4
  x_in = keras.Input((3, 3))
  t_in = keras.Input(())

  class Exact(keras.layers.Layer):
    def call(self, x, t):
      big_b = 0.1 * t + 9.95 * t * t
      return -(x - keras.ops.exp(-big_b / 2)[:, None, None] * mu)

  model = keras.Model([x_in, t_in], Exact()(x_in, t_in))
  prior = priors.load_prior(
    priors.export_prior(
      model, str(tmp_path / "m"), {"image_size": 3, "kind": "gaussian"}
    )
  )
  images, evaluations = sampling.sample_images(prior, 1000, seed=1)
  assert images.shape == (1000, 3, 3) and evaluations > 10
  assert abs(np.mean(images - mu)) < 0.05
  assert abs(np.var(images - mu) - 1.0) < 0.1


@pytest.mark.parametrize(
  "make,kind,curvature,has_mean",
  [
    (lambda: priors.GaussianPrior(np.ones((5, 5))), "gaussian", 1.0, True),
    (
      lambda: priors.GaussianPrior(np.ones((5, 5)), diffused=True),
      "gaussian",
      1.0,
      False,
    ),
    (
      lambda: priors.ScorePrior(lambda x, t: -x, 5),
      "learned",
      1 / SDE.variance(0.01).numpy(),
      False,
    ),
    (lambda: priors.load_prior("gaussian_fc"), "gaussian", 1.0, False),
    (
      lambda: priors.load_prior("mnist_unet/1"),
      "mnist",
      1 / SDE.variance(0.01).numpy(),
      False,
    ),
  ],
)
def test_every_prior_satisfies_the_protocol(make, kind, curvature, has_mean):
  prior = make()
  assert isinstance(prior, priors.Prior)
  assert not protocol.missing_members(prior)
  assert priors.as_prior(prior, prior.image_size) is prior
  assert prior.kind == kind and prior.t_prior == 0.01
  assert prior.metadata["image_size"] == prior.image_size
  # 1 for N(mu, I), exact or learned; 1 / sigma_t^2 (about 20 at t = 0.01)
  # for a learned diffusion score.
  assert prior.curvature(prior.t_prior) == pytest.approx(curvature, rel=1e-6)
  assert (prior.gaussian_mean is not None) == has_mean
  if has_mean:
    np.testing.assert_array_equal(prior.gaussian_mean, np.ones((5, 5)))
  size = prior.image_size
  x = np.zeros((3, size, size), np.float32)
  score = prior(x, np.full([3], prior.t_prior, np.float32))
  assert score.dtype == tf.float32 and score.shape == (3, size, size)


def test_diffused_learned_curvature_follows_t():
  prior = priors.ScorePrior(lambda x, t: -x, 5)
  assert prior.curvature(0.5) == pytest.approx(
    1 / (1 - np.exp(-(0.1 * 0.5 + 9.95 * 0.25)))
  )
  assert prior.curvature(0.01) > prior.curvature(0.5) > 1


def test_bare_callables_and_other_objects_are_refused_in_one_line():
  gaussian = priors.GaussianPrior(np.zeros((5, 5)))
  assert priors.as_prior(gaussian, 5) is gaussian
  # A bare score function would lose its curvature, mean and convention.
  with pytest.raises(priors.PriorError) as info:
    priors.as_prior(lambda x, t: -x, 5)
  message = str(info.value)
  assert "\n" not in message and "lacks image_size, t_prior" in message
  assert "wrap a bare score function in priors.ScorePrior(fn, image_size" in (
    message
  )
  with pytest.raises(priors.PriorError, match="as prior.*load_prior"):
    priors.as_prior("mnist_unet", 5)


def test_shipped_priors_by_name_and_version():
  assert priors.shipped_root() == REPO / "saved_models"
  listed = priors.available()
  assert listed == sorted(listed)
  assert {
    "gaussian_fc/1",
    "gaussian_fc/2",
    "mnist_unet/1",
    "mnist_unet/2",
  } <= set(listed)
  newest = priors.load_prior("gaussian_fc")
  assert newest.path == str(GAUSSIAN.parent / "2")
  assert priors.load_prior("gaussian_fc/1").path == str(GAUSSIAN)
  with pytest.raises(
    priors.PriorError,
    match=r"not a shipped prior "
    r"\(available: .*gaussian_fc/1, .*mnist_unet/1",
  ):
    priors.load_prior("no_such_prior")
  with pytest.raises(priors.PriorError, match="available"):
    priors.load_prior("gaussian_fc/9")


_save_signature = saved_priors.save_signature


def test_probe_refuses_nan_and_wrong_shapes(tmp_path):
  nan = _save_signature(
    tmp_path / "nan", lambda x, t: {"score": x * float("nan")}
  )
  with pytest.raises(priors.PriorError, match="NaN or Inf scores on a probe"):
    priors.load_prior(str(nan))
  # Statically [None, 5, 5], but twice the batch at run time.
  doubled = _save_signature(
    tmp_path / "doubled", lambda x, t: {"score": tf.concat([x, x], axis=0)}
  )
  with pytest.raises(
    priors.PriorError,
    match=r"scores of shape \(2, 5, 5\) "
    r"for images of shape \(1, 5, 5\)",
  ):
    priors.load_prior(str(doubled))
  wrong_dtype = _save_signature(
    tmp_path / "f64", lambda x, t: {"score": tf.cast(x, tf.float64)}
  )
  with pytest.raises(priors.PriorError, match="score is float64"):
    priors.load_prior(str(wrong_dtype))
  fine = _save_signature(tmp_path / "fine", lambda x, t: {"score": -x})
  prior = priors.load_prior(str(fine))
  assert prior.kind == "gaussian" and prior.gaussian_mean is None


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("image_size", "5", r"field 'image_size' must be an integer in \[1, "),
    ("image_size", 6, "image_size 6 does not match the signature"),
    ("t_prior", "soon", r"field 't_prior' must be a finite number in \(0, 1\]"),
    ("beta_max", -1.0, "field 'beta_max'"),
    ("scale", 0.0, "field 'scale' must be a non-zero finite number"),
    ("kind", 3, "field 'kind' must be one of 'gaussian', 'mnist', got 3"),
    ("mu", [0.0] * 3, "field 'mu' must be a list of 25 numbers"),
  ],
)
def test_ill_typed_prior_json(tmp_path, field, value, match):
  folder = tmp_path / "copy"
  shutil.copytree(GAUSSIAN, folder)
  json_path = folder / "assets" / "prior.json"
  meta = json.loads(json_path.read_text())
  meta[field] = value
  if field == "image_size":
    del meta["mu"]  # else mu's L x L length is what disagrees first
  json_path.write_text(json.dumps(meta))
  with pytest.raises(priors.PriorError, match=match) as caught:
    priors.load_prior(str(folder))
  assert str(json_path) in str(caught.value)


def test_probe_message_is_the_error_not_in_user_code():
  def broken(x, t):
    del x, t
    # What an error raised inside a traced tf.function looks like.
    raise ValueError(
      'in user code:\n\n    File "net.py", line 3, in score  *\n'
      "        return dense(x)\n\n    ValueError: Input 0 of layer dense "
      "is incompatible with the layer"
    )

  prior = priors.ScorePrior(broken, 5)
  with pytest.raises(priors.PriorError) as info:
    priors.probe(prior, "prior 'broken'")
  message = str(info.value)
  assert "in user code" not in message and "\n" not in message
  assert message.startswith("prior 'broken' fails on a probe batch")
  assert "incompatible with the layer" in message


def test_convention_from_prior_json_and_the_version_1_fallback():
  assert priors.load_prior("mnist_unet").convention == {
    "centre_of_mass": [14.0, 14.0],
    "orientation": "upright",
  }
  version1 = priors.load_prior(str(priors.shipped_root() / "mnist_unet" / "1"))
  assert version1.convention["centre_of_mass"] == [14.0, 14.0]
  assert priors.GaussianPrior(np.zeros((5, 5))).convention is None
  assert priors.convention_of({"kind": "other"}) is None


class ToyGaussian:
  """A prior of one's own, outside the package: N(mu, I), exact or diffused.

  It has the members of priors.Prior and nothing else (no GaussianPrior
  code): the package must treat it as GaussianPrior(mu, diffused=...).
  """

  kind = "gaussian"
  convention = None
  orientation_classifier = None
  scale = 1.0
  offset = 0.0

  def __init__(self, mu, diffused=False, path=None):
    self.mu = np.asarray(mu, np.float32)  # [L, L]
    self.diffused = diffused
    self.image_size = self.mu.shape[0]
    self.t_prior = 0.01
    self.sde = sde_lib.VPSDE()
    self.metadata = {"kind": self.kind, "image_size": self.image_size}
    self.gaussian_mean = None if diffused else self.mu
    self.path = path

  @classmethod
  def from_folder(cls, path):
    meta = json.loads(
      (pathlib.Path(path) / "assets" / "prior.json").read_text()
    )
    size = meta["image_size"]
    return cls(np.reshape(meta["mu"], (size, size)), path=path)

  def curvature(self, t):
    del t  # N(alpha(t) mu, I) at every t.
    return 1.0

  def __call__(self, x, t):
    x = tf.convert_to_tensor(x, tf.float32)
    if not self.diffused:
      return -(x - self.mu)
    t = tf.broadcast_to(tf.convert_to_tensor(t, tf.float32), tf.shape(x)[:1])
    return -(x - self.sde.alpha(t)[:, None, None] * self.mu)


@pytest.fixture(scope="module")
def small_problem():
  rng = np.random.default_rng(11)
  mu = rng.integers(0, 5, (5, 5)).astype(np.float64)
  sim = simulation.simulate_measurement(mu + rng.standard_normal((5, 5)), 1.0)
  return mu, sim, rng.uniform(0, 1, (5, 5))


@pytest.mark.parametrize(
  "m_step, diffused", [("closed_form", False), ("preconditioned", True)]
)
def test_a_prior_class_of_ones_own_gives_gaussian_priors_em(
  small_problem, m_step, diffused
):
  mu, sim, init = small_problem
  toy = ToyGaussian(mu, diffused=diffused)
  assert priors.as_prior(toy, 5) is toy and isinstance(toy, priors.Prior)
  options = em.EMOptions(max_iterations=4, dtype="float64", m_step=m_step)

  def run(prior):
    return em.approximate_em(
      sim.measurement, 5, sim.sigma, init=init, prior=prior, options=options
    )

  ours = run(toy)
  theirs = run(priors.GaussianPrior(mu, diffused=diffused))
  assert ours.iterations == theirs.iterations == 4
  np.testing.assert_allclose(ours.estimate, theirs.estimate, rtol=1e-12)
  np.testing.assert_allclose(
    ours.log_likelihood, theirs.log_likelihood, rtol=1e-12
  )
  # The prior moved the estimate: it was used, not ignored.
  plain = em.approximate_em(
    sim.measurement, 5, sim.sigma, init=init, options=options
  )
  assert not np.allclose(ours.estimate, plain.estimate)


def test_the_member_list_is_the_protocol():
  declared = set(priors.Prior.__annotations__) | {"__call__", "curvature"}
  assert set(protocol.MEMBERS) == declared
  for name in protocol.MEMBERS:
    assert name in priors.Prior.__doc__ or name == "__call__", name


def _all_members_but(member):
  """An object with every member of priors.Prior except `member`."""
  toy = ToyGaussian(np.zeros((5, 5)))
  body = {} if member == "__call__" else {"__call__": ToyGaussian.__call__}
  lacking = type("Lacking", (), body)()
  for name in protocol.MEMBERS[1:]:
    if name != member:
      setattr(lacking, name, getattr(toy, name))
  return lacking


@pytest.mark.parametrize("member", protocol.MEMBERS)
def test_an_object_missing_a_member_is_refused_naming_it(member):
  lacking = _all_members_but(member)
  assert protocol.missing_members(lacking) == [member]
  with pytest.raises(priors.PriorError) as info:
    priors.as_prior(lacking, 5)
  message = str(info.value)
  assert "\n" not in message
  assert f"lacks {member} of the priors.Prior contract" in message


def _copy_with(tmp_path, **fields):
  """A copy of gaussian_fc/1 whose prior.json has `fields` set."""
  folder = tmp_path / "copy"
  shutil.copytree(GAUSSIAN, folder)
  json_path = folder / "assets" / "prior.json"
  meta = json.loads(json_path.read_text())
  meta.update(fields)
  json_path.write_text(json.dumps(meta))
  return folder, meta


def test_load_prior_builds_the_class_prior_json_names(tmp_path):
  folder, meta = _copy_with(tmp_path, prior_class="GaussianPrior")
  prior = priors.load_prior(str(folder))
  assert type(prior) is priors.GaussianPrior
  assert prior.path == str(folder) and prior.metadata == meta
  mu = np.reshape(meta["mu"], (5, 5)).astype(np.float32)
  np.testing.assert_array_equal(prior.gaussian_mean, mu)
  assert prior.t_prior == 0.01 and prior.curvature(0.5) == 1.0
  # Without "prior_class": the exported network, as before.
  assert type(priors.load_prior(str(GAUSSIAN))) is priors.SavedModelPrior
  # The published folder is untouched.
  assert "prior_class" not in json.loads(
    (GAUSSIAN / "assets" / "prior.json").read_text()
  )


def test_load_prior_builds_a_registered_class_of_ones_own(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(loading, "PRIOR_CLASSES", dict(loading.PRIOR_CLASSES))
  assert priors.register_prior_class(ToyGaussian) is ToyGaussian
  mu = np.arange(25.0).reshape(5, 5) % 3
  version = tmp_path / "toy" / "1"
  (version / "assets").mkdir(parents=True)
  (version / "assets" / "prior.json").write_text(
    json.dumps(
      {
        "image_size": 5,
        "kind": "gaussian",
        "mu": mu.ravel().tolist(),
        "prior_class": "ToyGaussian",
      }
    )
  )
  prior = priors.load_prior(str(tmp_path / "toy"), image_size=5)
  assert type(prior) is ToyGaussian and prior.path == str(version)
  np.testing.assert_array_equal(prior.gaussian_mean, mu)
  # An unregistered name, and a class whose priors break the contract.
  with pytest.raises(
    priors.PriorError,
    match=r"prior_class 'Nope' is not registered \(registered: "
    r"GaussianPrior, SavedModelPrior, ToyGaussian\)",
  ):
    priors.load_prior(str(_copy_with(tmp_path, prior_class="Nope")[0]))

  class Broken(ToyGaussian):
    @classmethod
    def from_folder(cls, path):
      prior = super().from_folder(path)
      del prior.sde
      return prior

  priors.register_prior_class(Broken, "ToyGaussian")
  with pytest.raises(priors.PriorError, match="without sde of the priors"):
    priors.load_prior(str(version))
  with pytest.raises(priors.PriorError, match="no classmethod from_folder"):
    priors.register_prior_class(priors.ScorePrior)


def test_prior_class_and_a_gaussian_without_mu_are_checked(tmp_path):
  folder, _ = _copy_with(tmp_path, prior_class=3)
  with pytest.raises(priors.PriorError, match="field 'prior_class' must be"):
    priors.load_prior(str(folder))
  shutil.rmtree(folder)
  folder, meta = _copy_with(tmp_path, prior_class="GaussianPrior")
  del meta["mu"]
  (folder / "assets" / "prior.json").write_text(json.dumps(meta))
  with pytest.raises(priors.PriorError, match="GaussianPrior needs the field"):
    priors.load_prior(str(folder))


def test_data_kinds_have_one_home():
  # Every data set of Table I is a kind, and the kind reads Table I.
  assert set(table1.DATASETS) <= set(kinds.KINDS)
  for name, kind in kinds.KINDS.items():
    assert kind.name == name and kind.dataset is table1.DATASETS[name]
    assert kind.gamma == table1.DATASETS[name]["gamma"]
  mnist, gaussian = kinds.of("mnist"), kinds.of("gaussian")
  assert mnist.clip == (0.0, 1.0) and gaussian.clip is None
  assert gaussian.unit_curvature and not mnist.unit_curvature
  assert mnist.convention() == {
    "centre_of_mass": [14.0, 14.0],
    "orientation": "upright",
  }
  # A fresh dict each time: callers may change theirs.
  priors.convention_of({"kind": "mnist"})["centre_of_mass"][0] = 0.0
  assert mnist.convention()["centre_of_mass"] == [14.0, 14.0]
  other = kinds.of("learned")
  assert other == kinds.DataKind("learned") and other.convention() is None
  assert other.gamma == "constant:1" and other.dataset is None
  # The kind picks a learned prior's curvature.
  learned_gaussian = priors.load_prior("gaussian_fc/1")
  assert learned_gaussian.curvature(0.5) == 1.0
  assert networks.network_config(learned_gaussian.metadata)["builder"] == (
    gaussian.network
  )
