"""The serving contract of every shipped prior (docs/serving.md): the library.

Parameterised over saved_models/*/*/saved_model.pb: each export's
serving_default takes x float32 [-1, L, L] and t float32 [-1] and returns
score float32 [-1, L, L], and the same numbers come out of the library,
saved_model_cli (the session-based loader TF Serving uses), a process that
imports only TensorFlow, keras.layers.TFSMLayer, a REST row-format body and
the shipped TF Serving warm-up requests.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import priors
from mtd_tf.priors import serving_requests as serving

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPORTS = sorted(p.parent for p in REPO.glob("saved_models/*/*/saved_model.pb"))
IDS = [str(p.relative_to(REPO / "saved_models")) for p in EXPORTS]
ATOL = 1e-5
RTOL = 1e-5
SUBPROCESS_TIMEOUT = 300

exports = pytest.mark.parametrize("export_dir", EXPORTS, ids=IDS)


def _image_size(export_dir):
  with open(export_dir / "assets" / "prior.json") as f:
    return int(json.load(f)["image_size"])


def _inputs(export_dir, batch, seed=0):
  size = _image_size(export_dir)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size)).astype(np.float32)
  t = rng.uniform(0.01, 1.0, size=batch).astype(np.float32)
  return x, t


def _library_score(export_dir, x, t):
  prior = priors.load_prior(str(export_dir))
  return prior.network_score(x, t).numpy()


def _cli(name):
  """A TensorFlow console script of this Python environment, or skip."""
  path = pathlib.Path(sys.executable).parent / name
  if not path.exists():
    found = shutil.which(name)
    if found is None:
      pytest.skip(f"{name} not found next to {sys.executable} or on PATH.")
    path = pathlib.Path(found)
  return str(path)


def _run(cmd, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    env=env,
    timeout=SUBPROCESS_TIMEOUT,
    check=False,
    **kwargs,
  )
  assert proc.returncode == 0, (
    f"{cmd[:3]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
    f"{proc.stderr[-3000:]}"
  )
  return proc


def _signature_block(show_output, name):
  match = re.search(
    r"signature_def\['%s'\]:\n(.*?)Method name is: ([^\n]*)" % re.escape(name),
    show_output,
    re.S,
  )
  assert match, f"no {name} in saved_model_cli output:\n{show_output}"
  return match.group(1), match.group(2).strip()


def _tensor_info(block, kind, key):
  match = re.search(
    r"%s\['%s'\] tensor_info:\n\s*dtype: (\S+)\n\s*shape: ([^\n]+)"
    % (kind, re.escape(key)),
    block,
  )
  assert match, f"no {kind}[{key!r}] in:\n{block}"
  return match.group(1), match.group(2).strip()


def test_exports_found_or_skip():
  if not EXPORTS:
    pytest.skip("No saved_models/*/*/saved_model.pb in this checkout.")
  for export_dir in EXPORTS:
    assert (export_dir / "assets" / "prior.json").is_file(), export_dir


@exports
def test_metadata_matches_signature(export_dir):
  with open(export_dir / "assets" / "prior.json") as f:
    metadata = json.load(f)
  for key in ("image_size", "kind"):
    assert key in metadata, f"{export_dir}: prior.json lacks {key!r}"
  loaded = tf.saved_model.load(str(export_dir))
  fn = loaded.signatures["serving_default"]
  args, kwargs = fn.structured_input_signature
  size = metadata["image_size"]
  assert not args
  assert set(kwargs) == {"x", "t"}
  assert kwargs["x"].shape.as_list() == [None, size, size]
  assert kwargs["x"].dtype == tf.float32
  assert kwargs["t"].shape.as_list() == [None]
  assert kwargs["t"].dtype == tf.float32
  out = fn.structured_outputs
  assert set(out) == {"score"}
  assert out["score"].shape.as_list() == [None, size, size]
  assert out["score"].dtype == tf.float32


@pytest.mark.slow  # A saved_model_cli / python subprocess per export.
@exports
def test_saved_model_cli_show(export_dir):
  size = _image_size(export_dir)
  proc = _run(
    [_cli("saved_model_cli"), "show", "--all", "--dir", str(export_dir)]
  )
  block, method = _signature_block(proc.stdout, "serving_default")
  assert method == "tensorflow/serving/predict"
  assert _tensor_info(block, "inputs", "x") == (
    "DT_FLOAT",
    f"(-1, {size}, {size})",
  )
  assert _tensor_info(block, "inputs", "t") == ("DT_FLOAT", "(-1)")
  assert _tensor_info(block, "outputs", "score") == (
    "DT_FLOAT",
    f"(-1, {size}, {size})",
  )
  assert set(re.findall(r"inputs\['(\w+)'\]", block)) == {"x", "t"}
  assert set(re.findall(r"outputs\['(\w+)'\]", block)) == {"score"}


@pytest.mark.slow  # A saved_model_cli / python subprocess per export.
@exports
def test_saved_model_cli_run_matches_library(export_dir, tmp_path):
  x, t = _inputs(export_dir, batch=5, seed=1)
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "t.npy", t)
  outdir = tmp_path / "out"
  _run(
    [
      _cli("saved_model_cli"),
      "run",
      "--dir",
      str(export_dir),
      "--tag_set",
      "serve",
      "--signature_def",
      "serving_default",
      "--inputs",
      f"x={tmp_path / 'x.npy'};t={tmp_path / 't.npy'}",
      "--outdir",
      str(outdir),
    ]
  )
  score = np.load(outdir / "score.npy")
  assert score.dtype == np.float32
  assert score.shape == x.shape
  np.testing.assert_allclose(
    score, _library_score(export_dir, x, t), rtol=RTOL, atol=ATOL
  )


@pytest.mark.slow  # A saved_model_cli / python subprocess per export.
@exports
def test_tensorflow_only_process(export_dir, tmp_path):
  """A process importing only TensorFlow (no mtd_tf) calls the signature."""
  x, t = _inputs(export_dir, batch=37, seed=2)
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "t.npy", t)
  script = textwrap.dedent("""
      import sys
      import numpy as np
      import tensorflow as tf
      export_dir, tmp = sys.argv[1], sys.argv[2]
      fn = tf.saved_model.load(export_dir).signatures['serving_default']
      x = np.load(tmp + '/x.npy')
      t = np.load(tmp + '/t.npy')
      for batch in (1, 37):
        out = fn(x=tf.constant(x[:batch]), t=tf.constant(t[:batch]))
        score = out['score'].numpy()
        assert score.shape == x[:batch].shape, score.shape
        assert score.dtype == np.float32
        np.save(f'{tmp}/score{batch}.npy', score)
      assert not any(m == 'mtd_tf' or m.startswith('mtd_tf.')
                     for m in sys.modules), 'mtd_tf was imported'
      """)
  # Run from tmp_path with the repository off sys.path: only TF is importable
  # by name from site-packages (an editable mtd_tf install could still be
  # found, which the assertion on sys.modules catches).
  _run(
    [sys.executable, "-c", script, str(export_dir), str(tmp_path)], cwd=tmp_path
  )
  expected = _library_score(export_dir, x, t)
  np.testing.assert_allclose(
    np.load(tmp_path / "score1.npy"), expected[:1], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
    np.load(tmp_path / "score37.npy"), expected, rtol=RTOL, atol=ATOL
  )


@exports
def test_tfsm_layer_serve_dict(export_dir):
  """keras.layers.TFSMLayer works with the one-dict endpoint serve_dict.

  (serving_default takes two keyword arguments, which TFSMLayer cannot bind:
  that is why the export carries serve_dict.)
  """
  import keras  # pylint: disable=g-import-not-at-top

  x, t = _inputs(export_dir, batch=4, seed=3)
  layer = keras.layers.TFSMLayer(str(export_dir), call_endpoint="serve_dict")
  out = layer({"x": x, "t": t})
  assert set(out) == {"score"}
  score = np.asarray(out["score"])
  assert score.dtype == np.float32
  np.testing.assert_allclose(
    score, _library_score(export_dir, x, t), rtol=RTOL, atol=ATOL
  )


@exports
def test_library_prior_applies_scaling(export_dir):
  prior = priors.load_prior(str(export_dir))
  x, t = _inputs(export_dir, batch=3, seed=4)
  raw = prior.network_score(prior.scale * x + prior.offset, t).numpy()
  np.testing.assert_allclose(
    prior(x, t).numpy(), prior.scale * raw, rtol=RTOL, atol=ATOL
  )


def _instances_body(x, t):
  return {
    "signature_name": "serving_default",
    "instances": [{"x": xi.tolist(), "t": float(ti)} for xi, ti in zip(x, t)],
  }


@exports
def test_rest_row_format_feeds_signature(export_dir):
  loaded = tf.saved_model.load(str(export_dir))
  fn = loaded.signatures["serving_default"]
  x, t = _inputs(export_dir, batch=6, seed=5)
  body = json.dumps(_instances_body(x, t))
  tensors = serving.instances_to_tensors(body, fn)
  assert set(tensors) == {"x", "t"}
  assert tensors["x"].dtype == tf.float32 and tensors["t"].dtype == tf.float32
  np.testing.assert_array_equal(tensors["x"].numpy(), x)
  np.testing.assert_array_equal(tensors["t"].numpy(), t)
  direct = fn(x=tf.constant(x), t=tf.constant(t))["score"].numpy()
  np.testing.assert_array_equal(fn(**tensors)["score"].numpy(), direct)
  # Columnar format gives the same tensors.
  columnar = serving.instances_to_tensors(
    {"inputs": {"x": x.tolist(), "t": t.tolist()}}, fn
  )
  np.testing.assert_array_equal(columnar["x"].numpy(), x)
  np.testing.assert_array_equal(columnar["t"].numpy(), t)
  # The response TF Serving would send: one output, so no name per row.
  predictions = serving.outputs_to_predictions({"score": direct})
  np.testing.assert_array_equal(
    np.asarray(predictions["predictions"], np.float32), direct
  )


def test_example_predict_request():
  """docs/predict_request.json is a valid body for the Gaussian prior."""
  export_dir = REPO / "saved_models" / "gaussian_fc" / "1"
  if not (export_dir / "saved_model.pb").is_file():
    pytest.skip("saved_models/gaussian_fc/1 is not in this checkout.")
  body = (REPO / "docs" / "predict_request.json").read_text()
  parsed = json.loads(body)
  fn = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
  tensors = serving.instances_to_tensors(body, fn)
  batch = len(parsed["instances"])
  assert tensors["x"].shape == (batch, 5, 5)
  assert tensors["t"].shape == (batch,)
  np.testing.assert_array_equal(
    tensors["x"].numpy(),
    np.array([i["x"] for i in parsed["instances"]], np.float32),
  )
  np.testing.assert_array_equal(
    tensors["t"].numpy(),
    np.array([i["t"] for i in parsed["instances"]], np.float32),
  )
  score = fn(**tensors)["score"].numpy()
  expected = _library_score(export_dir, tensors["x"], tensors["t"])
  np.testing.assert_allclose(score, expected, rtol=RTOL, atol=ATOL)


SPECS = {
  "x": tf.TensorSpec([None, 2, 2], tf.float32, name="x"),
  "t": tf.TensorSpec([None], tf.float32, name="t"),
}


def test_instances_stack_scalars_and_ints():
  body = {
    "instances": [
      {"x": [[1, 2], [3, 4]], "t": 1},
      {"x": [[5, 6], [7, 8.5]], "t": 0.25},
    ]
  }
  tensors = serving.instances_to_tensors(body, SPECS)
  assert tensors["x"].dtype == tf.float32
  np.testing.assert_array_equal(
    tensors["x"].numpy(), [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]]
  )
  np.testing.assert_array_equal(tensors["t"].numpy(), [1, 0.25])


def test_single_input_signature_accepts_bare_instances():
  specs = {"x": tf.TensorSpec([None, 2], tf.float32, name="x")}
  tensors = serving.instances_to_tensors({"instances": [[1, 2], [3, 4]]}, specs)
  np.testing.assert_array_equal(tensors["x"].numpy(), [[1, 2], [3, 4]])
  tensors = serving.instances_to_tensors({"inputs": [[1, 2]]}, specs)
  np.testing.assert_array_equal(tensors["x"].numpy(), [[1, 2]])


@pytest.mark.parametrize(
  "body, message",
  [
    ({"instances": [{"x": [[1, 2], [3, 4]]}]}, "missing"),
    ({"instances": [{"x": [[1, 2], [3, 4]], "t": 1, "y": 2}]}, "unknown"),
    ({"instances": [[[1, 2], [3, 4]]]}, "JSON object"),
    ({"instances": []}, "non-empty"),
    (
      {
        "instances": [
          {"x": [[1, 2], [3, 4]], "t": 1},
          {"x": [[1, 2, 3], [3, 4, 5]], "t": 1},
        ]
      },
      "x",
    ),
    ({"instances": [{"x": [[1, 2, 3], [3, 4, 5]], "t": 1}]}, "shape"),
    ({"instances": [{"x": [[1, 2], [3, 4]], "t": [1, 2]}]}, "shape"),
    ({"instances": [{"x": [[1, 2], [3, 4]], "t": "a"}]}, "t"),
    ({"instances": [{"x": [[1, 2], [3, 4]], "t": 1}, 3]}, "mix"),
    (
      {
        "signature_name": "serve_dict",
        "instances": [{"x": [[1, 2], [3, 4]], "t": 1}],
      },
      "serve_dict",
    ),
    ({"inputs": {"x": [[[1, 2], [3, 4]]], "t": [1, 2]}}, "batch sizes"),
    ({"instances": [], "inputs": {}}, "exactly one"),
    ("{not json", "JSON"),
  ],
)
def test_bad_bodies(body, message):
  with pytest.raises(serving.ServingError, match=message):
    serving.instances_to_tensors(body, SPECS)


@exports
def test_shipped_warmup_requests_feed_signature(export_dir):
  path = pathlib.Path(serving.warmup_path(export_dir))
  assert path.is_file(), (
    f"{path} missing: run python -m mtd_tf.serving "
    f"--add_warmup={export_dir.relative_to(REPO)}"
  )
  _check_warmup(export_dir, serving.DEFAULT_WARMUP_BATCH_SIZES)


def _check_warmup(export_dir, batch_sizes):
  size = _image_size(export_dir)
  logs = serving.read_warmup_requests(export_dir)
  assert len(logs) == len(batch_sizes)
  fn = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
  for log, batch in zip(logs, batch_sizes):
    assert log.WhichOneof("log_type") == "predict_log"
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    tensors = serving.request_to_tensors(request)
    assert set(tensors) == {"x", "t"}
    assert tensors["x"].dtype == tf.float32
    assert tensors["x"].shape == (batch, size, size)
    assert tensors["t"].shape == (batch,)
    score = fn(**tensors)["score"]
    assert score.shape == (batch, size, size)
    assert np.all(np.isfinite(score.numpy()))


@exports
def test_write_warmup_requests_atomic_and_reproducible(export_dir, tmp_path):
  copy = tmp_path / "model" / "7"
  shutil.copytree(
    export_dir, copy, ignore=shutil.ignore_patterns("assets.extra")
  )
  target = serving.write_warmup_requests(copy, batch_sizes=(2, 3))
  assert target == serving.warmup_path(copy)
  assert os.listdir(copy / "assets.extra") == ["tf_serving_warmup_requests"]
  logs = serving.read_warmup_requests(copy)
  assert [log.predict_log.request.model_spec.name for log in logs] == [
    "model",
    "model",
  ]
  _check_warmup(copy, (2, 3))
  first = pathlib.Path(target).read_bytes()
  # A finished export is never rewritten unless asked.
  with pytest.raises(serving.ServingError, match="finished export"):
    serving.write_warmup_requests(copy, batch_sizes=(4,))
  assert pathlib.Path(target).read_bytes() == first
  serving.write_warmup_requests(copy, batch_sizes=(2, 3), overwrite=True)
  assert pathlib.Path(target).read_bytes() == first


def test_contract_constants_have_one_home():
  assert serving.SERVING_KEY == "serving_default"
  assert serving.DICT_KEY == "serve_dict"
  assert serving.PRIOR_JSON == "prior.json"
  from mtd_tf.base import table1  # pylint: disable=g-import-not-at-top

  assert serving.WARMUP_T == table1.T_PRIOR


@pytest.mark.parametrize("sizes", [(), (0,), (-1, 2), (10**9,), ("a",)])
def test_absurd_batch_sizes_are_refused(sizes):
  with pytest.raises(serving.ServingError, match="Batch sizes"):
    serving.check_batch_sizes(sizes)


def test_write_warmup_requests_needs_prior_json(tmp_path):
  with pytest.raises(serving.ServingError, match="saved_model.pb"):
    serving.write_warmup_requests(tmp_path)
  (tmp_path / "saved_model.pb").write_bytes(b"")
  with pytest.raises(serving.ServingError, match="image_size"):
    serving.write_warmup_requests(tmp_path)


def test_predict_request_has_the_warmup_form():
  """A client request is built exactly as the shipped warm-up requests."""
  logs = serving.read_warmup_requests(
    REPO / "saved_models" / "mnist_unet" / "2"
  )
  warm = logs[0].predict_log.request
  x = tf.make_ndarray(warm.inputs["x"])
  t = tf.make_ndarray(warm.inputs["t"])
  built = serving.predict_request(x, t, warm.model_spec.name)
  assert built == warm
  with pytest.raises(serving.ServingError, match=r"x \[B, L, L\]"):
    serving.predict_request(x[0], t, "mnist_unet")


def test_grpc_predict_against_a_local_prediction_service():
  """grpc_predict over a real gRPC channel to a PredictionService on
  localhost that runs the shipped SavedModel (TF Serving's own server is not
  installable here; this servicer answers as it would)."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top

  import grpc  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top

  path = REPO / "saved_models" / "gaussian_fc" / "2"
  serve = tf.saved_model.load(str(path)).signatures[serving.SERVING_KEY]
  seen = []

  class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):  # noqa: N802 (gRPC's name)
      seen.append(request)
      tensors = serving.request_to_tensors(request)
      out = serve(**tensors)["score"]
      response = predict_pb2.PredictResponse()
      response.outputs["score"].CopyFrom(tf.make_tensor_proto(out.numpy()))
      return response

  server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
    Service(), server
  )
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    x = np.random.default_rng(3).standard_normal((4, 5, 5)).astype(np.float32)
    t = np.full(4, 0.01, np.float32)
    score = serving.grpc_predict(
      f"127.0.0.1:{port}", "gaussian_fc", x, t, timeout=20
    )
  finally:
    server.stop(None)
  np.testing.assert_allclose(score, serve(x=x, t=t)["score"].numpy(), rtol=1e-6)
  assert seen[0].model_spec.name == "gaussian_fc"
  assert seen[0].model_spec.signature_name == "serving_default"
