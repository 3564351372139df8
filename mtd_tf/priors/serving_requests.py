"""The serving contract of exported priors: REST bodies and warm-up requests.

A prior exported by `mtd_tf.priors.export_prior` is a TF-Serving SavedModel
``saved_models/<name>/<version>/`` whose ``serving_default`` signature takes
``x`` float32 [-1, L, L] and ``t`` float32 [-1] and returns ``score`` float32
[-1, L, L] (docs/serving.md); ``serve_dict`` takes the same as one dict, and
``assets/prior.json`` holds the metadata. The names of that contract live
here, once (`SERVING_KEY`, `DICT_KEY`, `PRIOR_JSON`, `WARMUP_*`), with what
serving needs beyond the SavedModel itself:

* `instances_to_tensors(body, signature)`: the tensors TF Serving feeds the
  signature for a REST predict body (row format ``"instances"`` or columnar
  format ``"inputs"``), following TF Serving's JSON rules, so that a request
  body can be checked without a model server.
* `outputs_to_predictions(outputs)`: the ``"predictions"`` part of TF
  Serving's row-format REST response for given signature outputs.
* `write_warmup_requests(export_dir)`: writes
  ``assets.extra/tf_serving_warmup_requests`` into a new export (never a
  published one), a TFRecord file of
  ``PredictionLog`` protos with one ``PredictRequest`` for serving_default per
  batch size, which TF Serving replays when it loads the model (so the first
  real request does not pay for graph initialisation).
* `read_warmup_requests(export_dir)` and `request_to_tensors(request)` to
  read that file back.

The command-line tool is `mtd_tf.serving`.
"""

import json
import os

import numpy as np
import tensorflow as tf

from mtd_tf.base import atomic
from mtd_tf.base import table1

# The exported SavedModel's contract (docs/serving.md).
SERVING_KEY = "serving_default"  # Signature: x [-1, L, L], t [-1] -> score.
DICT_KEY = "serve_dict"  # The same, one dict argument (TFSMLayer).
PRIOR_JSON = "prior.json"  # assets/prior.json: the prior's metadata.
# TF Serving's warm-up file: <export>/assets.extra/tf_serving_warmup_requests.
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
DEFAULT_WARMUP_BATCH_SIZES = (1, 8, 32)
MAX_WARMUP_BATCH_SIZE = 4096  # Larger requests would only waste memory.
WARMUP_T = table1.T_PRIOR  # Diffusion time of the warm-up requests.

__all__ = [
  "instances_to_tensors",
  "outputs_to_predictions",
  "write_warmup_requests",
  "read_warmup_requests",
  "request_to_tensors",
  "warmup_path",
  "predict_request",
  "score_from_response",
  "grpc_predict",
  "check_batch_sizes",
  "ServingError",
  "SERVING_KEY",
  "DICT_KEY",
  "PRIOR_JSON",
  "WARMUP_DIR",
  "WARMUP_FILE",
  "DEFAULT_WARMUP_BATCH_SIZES",
  "WARMUP_T",
]


class ServingError(ValueError):
  """A request body or export folder that does not fit the serving contract."""


def _input_specs(signature):
  """{name: tf.TensorSpec} of a signature's named inputs.

  Args:
    signature: a concrete function from ``loaded.signatures[...]``, or a dict
      {name: tf.TensorSpec} (shape includes the batch dimension).
  """
  if isinstance(signature, dict):
    specs = signature
  else:
    args, specs = signature.structured_input_signature
    if args:
      raise ServingError(
        "The signature takes positional arguments; a "
        "serving signature takes named inputs only."
      )
  if not specs:
    raise ServingError("The signature takes no inputs.")
  return specs


def _to_tensor(name, value, spec, what):
  """`value` as a tensor of spec's dtype, its shape checked against spec."""
  if spec.dtype in (
    tf.float16,
    tf.bfloat16,
    tf.float32,
    tf.float64,
    tf.int8,
    tf.int16,
    tf.int32,
    tf.int64,
    tf.uint8,
    tf.uint16,
    tf.uint32,
    tf.uint64,
    tf.bool,
  ):
    try:
      array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (TypeError, ValueError) as e:
      raise ServingError(
        f"Input {name!r} of {what} is not a rectangular "
        f"array of {spec.dtype.name} values: {e}"
      ) from e
  else:
    raise ServingError(
      f"Input {name!r} has dtype {spec.dtype.name}, which "
      "this converter does not handle (numbers only)."
    )
  tensor = tf.constant(array, dtype=spec.dtype)
  if not spec.shape.is_compatible_with(tensor.shape):
    raise ServingError(
      f"Input {name!r}: {what} gives shape "
      f"{tuple(tensor.shape)} but the signature takes "
      f"{tuple(spec.shape.as_list())} (None = any)."
    )
  return tensor


def instances_to_tensors(body, signature, signature_name=SERVING_KEY):
  """The tensors TF Serving feeds ``signature`` for a REST predict body.

  Follows TF Serving's REST API (``POST /v1/models/<m>:predict``):

  * Row format, ``{"instances": [...]}``: each instance is one example. With
    several named inputs each instance must be a JSON object holding every
    input by name; the values of one input are stacked along a new first
    (batch) axis, so a scalar ``"t": 0.01`` per instance becomes ``t`` [B]
    and an L x L list ``"x"`` becomes ``x`` [B, L, L]. A signature with a
    single input also accepts bare values as instances.
  * Columnar format, ``{"inputs": {...}}``: each named input is given whole,
    batch axis included (or ``"inputs": value`` for a single-input
    signature).
  * ``"signature_name"``, if present, must name this signature (it defaults
    to serving_default).

  Args:
    body: the request body, a dict or a JSON string/bytes.
    signature: a concrete function from ``loaded.signatures[...]`` (or a dict
      {name: tf.TensorSpec}); it gives the input names, dtypes and shapes.
    signature_name: the name of ``signature`` in the SavedModel; the body's
      ``signature_name`` (default serving_default) must equal it.

  Returns:
    {input name: tf.Tensor} with the signature's dtypes, ready for
    ``signature(**tensors)``.

  Raises:
    ServingError: with a one-line message, for a body TF Serving would reject
      (missing or extra inputs, mixed instance kinds, ragged or mis-shaped
      values, no instances).
  """
  if isinstance(body, (str, bytes, bytearray)):
    try:
      body = json.loads(body)
    except ValueError as e:
      raise ServingError(f"The request body is not valid JSON: {e}") from e
  if not isinstance(body, dict):
    raise ServingError(
      'The request body must be a JSON object with "instances" or "inputs".'
    )
  specs = _input_specs(signature)
  names = sorted(specs)
  requested = body.get("signature_name", SERVING_KEY)
  if requested != signature_name:
    raise ServingError(
      f"The body asks for signature {requested!r}, not {signature_name!r}."
    )
  if ("instances" in body) == ("inputs" in body):
    raise ServingError(
      "The request body must hold exactly one of "
      '"instances" (row format) or "inputs" (columnar).'
    )

  if "inputs" in body:
    inputs = body["inputs"]
    if len(names) == 1 and not (
      isinstance(inputs, dict) and set(inputs) == set(names)
    ):
      inputs = {names[0]: inputs}
    if not isinstance(inputs, dict):
      raise ServingError(f'"inputs" must be an object with keys {names}.')
    _check_keys(inputs, names, '"inputs"')
    tensors = {n: _to_tensor(n, inputs[n], specs[n], '"inputs"') for n in names}
    batch = {int(t.shape[0]) for t in tensors.values() if t.shape.rank}
    if len(batch) > 1:
      raise ServingError(f"The inputs have different batch sizes {batch}.")
    return tensors

  instances = body["instances"]
  if not isinstance(instances, list) or not instances:
    raise ServingError('"instances" must be a non-empty list.')
  kinds = {isinstance(i, dict) for i in instances}
  if len(kinds) > 1:
    raise ServingError("The instances mix JSON objects and bare values.")
  if kinds == {True}:
    for k, instance in enumerate(instances):
      _check_keys(instance, names, f"instance {k}")
    columns = {n: [i[n] for i in instances] for n in names}
  else:
    if len(names) != 1:
      raise ServingError(
        f"The signature takes {len(names)} named inputs "
        f"{names}: each instance must be a JSON object with "
        "those keys."
      )
    columns = {names[0]: instances}
  return {
    n: _to_tensor(
      n, columns[n], specs[n], f"stacking {len(instances)} instances"
    )
    for n in names
  }


def _check_keys(obj, names, what):
  missing = sorted(set(names) - set(obj))
  extra = sorted(set(obj) - set(names))
  if missing or extra:
    raise ServingError(
      f"{what} has inputs {sorted(obj)}; the signature "
      f"takes {names} (missing {missing}, unknown {extra})."
    )


def outputs_to_predictions(outputs):
  """TF Serving's row-format response ``{"predictions": [...]}`` for outputs.

  Args:
    outputs: {output name: tensor/array [B, ...]} as a signature returns.

  Returns:
    A JSON-serialisable dict: with one output, ``predictions`` is the list of
    its per-example values (the name is omitted, as TF Serving does); with
    several, a list of objects keyed by output name.
  """
  arrays = {k: np.asarray(v) for k, v in outputs.items()}
  if len(arrays) == 1:
    (value,) = arrays.values()
    return {"predictions": value.tolist()}
  batch = len(next(iter(arrays.values())))
  return {
    "predictions": [
      {k: v[i].tolist() for k, v in arrays.items()} for i in range(batch)
    ]
  }


def check_batch_sizes(batch_sizes):
  """Batch sizes as ints in 1..MAX_WARMUP_BATCH_SIZE, or ServingError."""
  try:
    sizes = [int(b) for b in batch_sizes]
  except (TypeError, ValueError):
    raise ServingError(
      f"Batch sizes must be integers, got {list(batch_sizes)}."
    ) from None
  if not sizes or min(sizes) < 1 or max(sizes) > MAX_WARMUP_BATCH_SIZE:
    raise ServingError(
      f"Batch sizes must be 1..{MAX_WARMUP_BATCH_SIZE}, got {sizes}."
    )
  return sizes


def warmup_path(export_dir):
  """``<export_dir>/assets.extra/tf_serving_warmup_requests``."""
  return os.path.join(os.fspath(export_dir), WARMUP_DIR, WARMUP_FILE)


def _image_size(export_dir):
  json_path = os.path.join(export_dir, "assets", PRIOR_JSON)
  try:
    with open(json_path) as f:
      metadata = json.load(f)
    return int(metadata["image_size"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ServingError(
      f"Cannot read image_size from {json_path!r} ({e}): "
      "pass a folder written by export_prior."
    ) from e


def _warmup_inputs(image_size, batch_size, seed):
  """Deterministic example inputs: x ~ N(0, 1) [B, L, L], t = WARMUP_T [B]."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch_size, image_size, image_size))
  t = np.full((batch_size,), WARMUP_T)
  return {"x": x.astype(np.float32), "t": t.astype(np.float32)}


def write_warmup_requests(
  export_dir,
  batch_sizes=DEFAULT_WARMUP_BATCH_SIZES,
  model_name=None,
  *,
  overwrite=False,
):
  """Writes TF Serving warm-up requests into a new SavedModel.

  Writes ``<export_dir>/assets.extra/tf_serving_warmup_requests``: a TFRecord
  file of ``tensorflow.serving.PredictionLog`` protos, one ``PredictRequest``
  for ``serving_default`` per batch size, with x float32 [B, L, L] (fixed
  pseudo-random values, so the file is reproducible) and t = WARMUP_T [B]. L is
  read from ``assets/prior.json``. The file is written atomically
  (`mtd_tf.base.atomic`), so readers never see a partial file. An existing
  warm-up file marks a finished export, and published versions never
  change: it is refused unless overwrite.

  Args:
    export_dir: a version folder not yet published, e.g. the temporary
      folder `export_prior` writes before renaming, or
      ``my_priors/score_net/1``.
    batch_sizes: the batch sizes of the requests.
    model_name: model_spec.name of the requests (TF Serving does not check
      it for warm-up; default: the name of export_dir's parent folder).
    overwrite: replace an existing warm-up file (only for exports of one's
      own that nobody serves yet).

  Returns:
    The path of the file written.

  Raises:
    ServingError: export_dir is no SavedModel, lacks a readable
      assets/prior.json, or already has warm-up requests (and not
      overwrite).
  """
  # Imported here so that the rest of mtd_tf does not need the package.
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top

  export_dir = os.path.abspath(os.fspath(export_dir))
  if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
    raise ServingError(
      f"{export_dir!r} is not a SavedModel (no "
      "saved_model.pb): pass a SavedModel version folder such as "
      "my_priors/score_net/1."
    )
  if not overwrite and os.path.exists(warmup_path(export_dir)):
    raise ServingError(
      f"{warmup_path(export_dir)!r} exists: {export_dir!r} is a finished "
      "export and published versions never change; export a new version "
      "(priors.export_prior writes warm-up requests into it)."
    )
  image_size = _image_size(export_dir)
  if model_name is None:
    model_name = os.path.basename(os.path.dirname(export_dir))
  batch_sizes = check_batch_sizes(batch_sizes)

  out_dir = os.path.join(export_dir, WARMUP_DIR)
  os.makedirs(out_dir, exist_ok=True)
  target = os.path.join(out_dir, WARMUP_FILE)
  with atomic.atomic_file(target) as tmp:
    with tf.io.TFRecordWriter(tmp) as writer:
      for k, batch in enumerate(batch_sizes):
        inputs = _warmup_inputs(image_size, batch, seed=k)
        request = predict_request(inputs["x"], inputs["t"], model_name)
        log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        writer.write(log.SerializeToString())
  return target


def predict_request(
  x, t, model_name, *, signature_name=SERVING_KEY, version=None
):
  """A TF Serving `PredictRequest` for a prior's score signature.

  The one place requests are built: the warm-up file and `grpc_predict` use
  it, so a client request has exactly the warm-up requests' form.

  Args:
    x: float32 [B, L, L] images in network units.
    t: float32 [B] diffusion times.
    model_name: the served model's name (e.g. "mnist_unet").
    signature_name: the signature to call (serving_default).
    version: None (the newest version the server has) or a version number.

  Returns:
    A `tensorflow_serving.apis.predict_pb2.PredictRequest`.

  Raises:
    ServingError: x is not [B, L, L] or t is not [B].
  """
  from tensorflow_serving.apis import model_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top

  x = np.asarray(x, np.float32)
  t = np.asarray(t, np.float32)
  if x.ndim != 3 or x.shape[1] != x.shape[2] or t.shape != x.shape[:1]:
    raise ServingError(
      f"predict_request needs x [B, L, L] and t [B]; got x "
      f"{x.shape} and t {t.shape}."
    )
  spec = model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
  if version is not None:
    spec.version.value = int(version)
  request = predict_pb2.PredictRequest(model_spec=spec)
  request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
  request.inputs["t"].CopyFrom(tf.make_tensor_proto(t))
  return request


def score_from_response(response):
  """The score float32 [B, L, L] of a `PredictResponse`."""
  if "score" not in response.outputs:
    raise ServingError(
      f"The response has no 'score' output (it has {sorted(response.outputs)})."
    )
  return tf.make_ndarray(response.outputs["score"])


def grpc_predict(
  target,
  model_name,
  x,
  t,
  *,
  timeout=30.0,
  signature_name=SERVING_KEY,
  version=None,
):
  """Calls a served prior over gRPC: the score of x at times t.

  Args:
    target: the model server's gRPC address, e.g. "localhost:8500".
    model_name, x, t, signature_name, version: as in `predict_request`.
    timeout: seconds to wait for the answer.

  Returns:
    float32 [B, L, L], the network score.
  """
  import grpc  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top

  request = predict_request(
    x, t, model_name, signature_name=signature_name, version=version
  )
  with grpc.insecure_channel(target) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return score_from_response(stub.Predict(request, timeout=timeout))


def read_warmup_requests(export_dir):
  """The ``PredictionLog`` protos of an export's warm-up file, in order."""
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top

  path = warmup_path(export_dir)
  if not os.path.isfile(path):
    raise ServingError(
      f"{path!r} does not exist: re-export the prior (export_prior writes "
      "it) or, for a SavedModel of your own, run python -m "
      f"mtd_tf.serving --add_warmup={export_dir}."
    )
  logs = []
  for record in tf.data.TFRecordDataset(path):
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record.numpy())
    logs.append(log)
  return logs


def request_to_tensors(request):
  """{input name: tf.Tensor} of a ``PredictRequest``'s inputs."""
  return {
    name: tf.constant(tf.make_ndarray(proto))
    for name, proto in request.inputs.items()
  }
