"""What `load_prior` refuses before a prior is used, and how fast.

The whole prior.json is checked against one schema (`layout.SCHEMA` and its
cross-field rules), every tampering refused in one line naming the file,
the field, the value and what is expected; the probe calls the prior at the
batch sizes and diffusion times EM and sampling use, so a prior that fails
only there is refused within seconds of loading; and a prior that never
returns does not keep Ctrl-C or SIGTERM from stopping the tool. Published
priors are only read: every tampering is made on a tmp_path copy.
"""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import saved_priors
import tensorflow as tf

from mtd_tf import priors
from mtd_tf.priors import layout
from mtd_tf.priors import loading
from mtd_tf.priors import networks
from mtd_tf.priors import sde as sde_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST3 = REPO / "saved_models" / "mnist_unet" / "3"
GAUSSIAN1 = REPO / "saved_models" / "gaussian_fc" / "1"


def _copy(source, folder, **changes):
  """A copy of a shipped version (no assets.extra) with prior.json changed.

  A change to None deletes the field.
  """
  shutil.copytree(source, folder, ignore=shutil.ignore_patterns("assets.extra"))
  json_file = folder / "assets" / "prior.json"
  meta = json.loads(json_file.read_text())
  for name, value in changes.items():
    if value is None:
      meta.pop(name, None)
    else:
      meta[name] = value
  json_file.write_text(json.dumps(meta))
  return folder, json_file


# The tamperings of the issue, each once accepted (mnist_unet/3 as "gaussian"
# gave an estimate in [-198, 701], error 97.8; convention [1, 2] a
# TypeError), with the line that now refuses it.
TAMPERINGS = {
  "kind gaussian": (
    MNIST3,
    dict(kind="gaussian"),
    r"its score at t_prior=0.01 has curvature \d+, \d+ times the 1 it "
    r"claims for kind 'gaussian'.*set the kind the network was trained on",
  ),
  "kind a path": (
    MNIST3,
    dict(kind="../../etc/passwd"),
    r"field 'kind' must be one of 'gaussian', 'mnist', got "
    r"'../../etc/passwd'",
  ),
  "kind missing": (
    MNIST3,
    dict(kind=None),
    r"field 'kind' is missing: it must be one of 'gaussian', 'mnist'",
  ),
  "centre of mass outside": (
    MNIST3,
    dict(convention={"centre_of_mass": [1e9, -1e9], "orientation": "upright"}),
    r"field 'convention.centre_of_mass' must be \[row, col\] of finite "
    r"numbers in \[0, 27\] \(the frame\), got \[1000000000.0, "
    r"-1000000000.0\]",
  ),
  "orientation sideways": (
    MNIST3,
    dict(
      convention={"centre_of_mass": [14.0, 14.0], "orientation": "sideways"}
    ),
    r"field 'convention.orientation' must be 'upright' or null, got "
    r"'sideways'",
  ),
  "convention a list": (
    MNIST3,
    dict(convention=[1, 2]),
    r"field 'convention' must be a JSON object or null, got \[1, 2\]",
  ),
  "beta_min above beta_max": (
    MNIST3,
    dict(beta_min=30.0),
    r"field 'beta_min' must be below beta_max = 20.0, got 30.0",
  ),
  "no beta_max": (
    MNIST3,
    dict(beta_max=None),
    r"field 'beta_max' is missing but beta_min is given: give both",
  ),
  "beta_max 1e308": (
    MNIST3,
    dict(beta_max=1e308),
    r"field 'beta_max' must be a finite number in \(0, 1000\], got 1e\+308",
  ),
  "t_prior 1e300": (
    MNIST3,
    dict(t_prior=1e300),
    r"field 't_prior' must be a finite number in \(0, 1\], got 1e\+300",
  ),
  "mu all NaN": (
    GAUSSIAN1,
    dict(mu=[math.nan] * 25),
    r"field 'mu' must be a list of finite numbers, got \[nan, nan",
  ),
  "a misspelt field": (
    MNIST3,
    dict(beta_mx=20.0),
    r"unknown field 'beta_mx': did you mean 'beta_max'\?",
  ),
  "image_size a float": (
    GAUSSIAN1,
    dict(image_size=5.0),
    r"field 'image_size' must be an integer in \[1, 1024\], got 5.0",
  ),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_each_tampering_is_refused_in_one_line(case, tmp_path, run_tool):
  source, changes, match = TAMPERINGS[case]
  folder, json_file = _copy(source, tmp_path / "prior" / "1", **changes)
  with pytest.raises(priors.PriorError, match=match) as caught:
    priors.load_prior(str(folder))
  message = str(caught.value)
  assert "\n" not in message
  # The file is named: prior.json itself, or (a probe finding) its folder.
  assert str(json_file) in message or str(folder) in message
  # The tools say the same line and exit 1, having written nothing.
  out = tmp_path / "out"
  out.mkdir()
  done = run_tool(
    "mtd_tf.sample_prior", f"--prior={folder}", "--num_samples=2", cwd=out
  )
  assert done.returncode == 1, done.stderr
  last = done.stderr.strip().splitlines()
  assert len(last) == 1 and last[0].startswith("sample_prior: error: ")
  assert "Traceback" not in done.stderr and done.stdout == ""
  assert not os.listdir(out)


@pytest.mark.parametrize("name", priors.available())
def test_every_shipped_version_passes_schema_and_probe(name):
  folder = priors.shipped_root() / name
  layout.read_metadata(folder)
  prior = priors.load_prior(name)
  assert prior.path == str(folder)


def test_export_refuses_metadata_outside_the_schema(tmp_path):
  model = networks.gaussian_score_mlp(9, 8)
  for meta, match in (
    ({"image_size": 3, "kind": "learned"}, "field 'kind' must be one of"),
    ({"image_size": 3}, "field 'kind' is missing"),
    (
      {"image_size": 3, "kind": "gaussian", "beta_min": 0.1},
      "'beta_max' is missing",
    ),
  ):
    with pytest.raises(priors.PriorError, match=match):
      priors.export_prior(model, tmp_path / "m", meta)
    assert not (tmp_path / "m").exists()


def test_the_kind_convention_must_fit_the_frame(tmp_path):
  # Without "convention", an mnist prior takes MNIST's centre (14, 14).
  meta = {"image_size": 12, "kind": "mnist"}
  with pytest.raises(
    priors.PriorError,
    match=r"field 'kind' 'mnist' puts the centre of mass at \[14.0, 14.0\], "
    r"outside the 12 x 12 frame",
  ):
    layout.check_metadata(meta, "prior.json", None)
  layout.check_metadata(
    dict(meta, convention={"centre_of_mass": [6.0, 6.0]}), "prior.json", None
  )


def test_schema_names_every_field_the_shipped_priors_carry():
  for name in priors.available():
    meta = layout.read_metadata(priors.shipped_root() / name)
    assert set(meta) <= set(layout.SCHEMA), name
  assert layout.SCHEMA["kind"].choices == ("gaussian", "mnist")


def _save(path, fn, size=5, kind="gaussian"):
  """A SavedModel prior of fn(x, t) -> {'score': ...} and the given kind."""
  return saved_priors.save_signature(
    path, fn, size, {"image_size": size, "kind": kind}
  )


def _nan_above_two(x, t):
  del t
  bad = tf.shape(x)[0] > 2
  return {"score": tf.where(bad, float("nan"), 1.0) * -x}


def _inf_at_one(x, t):
  return {"score": -x / (1.0 - t)[:, None, None]}


@pytest.mark.parametrize(
  "fn, match",
  [
    (_nan_above_two, r"NaN or Inf scores on a probe batch \[16, 5, 5\]"),
    (_inf_at_one, r"NaN or Inf scores on a probe batch \[1, 5, 5\] at t=1 "),
  ],
)
def test_nan_at_larger_batches_or_t_1_is_found_at_load(tmp_path, fn, match):
  """Such priors used to run 221 s of ODE sampling before the message."""
  folder = _save(tmp_path / "p", fn)
  start = time.monotonic()
  with pytest.raises(priors.PriorError, match=match):
    priors.load_prior(str(folder))
  assert time.monotonic() - start < 30


def test_probe_calls_every_batch_size_and_time():
  calls = []

  def score(x, t):
    calls.append((int(x.shape[0]), round(float(t[0]), 6)))
    return -x

  prior = priors.ScorePrior(score, 5, kind="gaussian")
  assert priors.probe(prior) is prior
  times = (0.001, 0.01, 0.3, 1.0)
  assert loading.probe_times(prior) == times
  grid = [(b, t) for b in loading.PROBE_BATCHES for t in times]
  assert calls[: len(grid)] == grid
  # Then the curvature, at t_prior, from both sides.
  assert calls[len(grid) :] == [(16, 0.01), (16, 0.01)]


def test_a_score_steeper_than_it_claims_is_refused():
  steep = priors.ScorePrior(lambda x, t: -50.0 * x, 5, kind="gaussian")
  steep.curvature = lambda t: 1.0  # as the gaussian kind claims
  with pytest.raises(priors.PriorError, match="50 times the 1 it claims"):
    priors.probe(steep, "prior 'steep'")
  # A learned score claims 1 / sigma_t^2 (about 500 at t = 0.01): fine.
  priors.probe(priors.ScorePrior(lambda x, t: -50.0 * x, 5))


class _Blocking:
  """A prior whose score call blocks until released (a graph that hangs)."""

  started = threading.Event()
  release = threading.Event()

  def __init__(self, path):
    self.path = path
    self.image_size = 5
    self.t_prior = 0.01
    self.kind = "gaussian"
    self.metadata = {"image_size": 5, "kind": "gaussian"}
    self.gaussian_mean = None
    self.convention = None
    self.orientation_classifier = None
    self.sde = sde_lib.VPSDE()
    self.scale, self.offset = 1.0, 0.0

  @classmethod
  def from_folder(cls, path):
    return cls(path)

  def curvature(self, t):
    del t
    return 1.0

  def __call__(self, x, t):
    del t
    type(self).started.set()
    type(self).release.wait()
    return -tf.convert_to_tensor(x)


def test_ctrl_c_stops_a_prior_that_never_returns(tmp_path, monkeypatch):
  monkeypatch.setattr(loading, "PRIOR_CLASSES", dict(loading.PRIOR_CLASSES))
  priors.register_prior_class(_Blocking)
  folder = tmp_path / "blocking" / "1"
  (folder / "assets").mkdir(parents=True)
  (folder / "assets" / "prior.json").write_text(
    json.dumps(
      {"image_size": 5, "kind": "gaussian", "prior_class": "_Blocking"}
    )
  )

  def interrupt():
    _Blocking.started.wait(60)
    os.kill(os.getpid(), signal.SIGINT)

  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  threading.Thread(target=interrupt, daemon=True).start()
  try:
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
      priors.load_prior(str(folder))
    assert _Blocking.started.is_set()
    assert time.monotonic() - start < 10
  finally:
    signal.signal(signal.SIGINT, before)
    _Blocking.release.set()  # the worker left behind ends


def _save_hanging(path, marker):
  """A SavedModel whose score writes `marker`, then waits forever.

  The wait is a dequeue from a queue nobody fills, inside the graph: the
  call never returns and holds no Python lock.
  """

  def hang(x, t):
    del t
    wrote = tf.io.write_file(str(marker), "probing")
    with tf.control_dependencies([wrote]):
      queue = tf.raw_ops.FIFOQueueV2(
        component_types=[tf.float32], shapes=[[]], capacity=1
      )
      (value,) = tf.raw_ops.QueueDequeueV2(
        handle=queue, component_types=[tf.float32]
      )
    return {"score": -x + 0.0 * value}

  return _save(path, hang)


@pytest.mark.slow  # Fresh interpreters.
@pytest.mark.parametrize(
  "signum, status, word",
  [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_hanging_prior_does_not_hold_off_signals(
  tmp_path, signum, status, word
):
  """It used to ignore Ctrl-C and SIGTERM (alive 60 s after the signal)."""
  marker = tmp_path / "probing"
  folder = _save_hanging(tmp_path / "hang", marker)
  out = tmp_path / "out"
  out.mkdir()
  # Ctrl-C as a terminal gives it, even where this process ignores SIGINT.
  code = (
    "import runpy, signal; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('mtd_tf.sample_prior', run_name='__main__', "
    "alter_sys=True)"
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
    [sys.executable, "-c", code, f"--prior={folder}", "--num_samples=2"],
    cwd=out,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline:
      assert proc.poll() is None, proc.communicate()
      time.sleep(0.1)
    assert marker.exists(), "the probe never called the prior"
    time.sleep(0.5)
    assert proc.poll() is None  # stuck in the prior's graph
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    waited = time.monotonic() - sent
  finally:
    proc.kill()
  assert proc.returncode == status, stderr
  assert stderr.strip().splitlines()[-1] == f"sample_prior: {word}"
  assert "Traceback" not in stderr and stdout == ""
  assert waited < 20, waited
  assert not os.listdir(out)
