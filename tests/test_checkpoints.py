"""Checkpoints and --resume: an interrupted or killed run ends as an
uninterrupted one; a checkpoint of other inputs is refused in one line."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mtd_tf.em import checkpoints
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction

SIZE = 5


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
  folder = tmp_path_factory.mktemp("checkpoints")
  rng = np.random.default_rng(17)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  paths = []
  for i, shape in enumerate([(60, 55), (50, 60)]):
    sim = simulation.simulate_measurement(
      image, snr=2.0, seed=40 + i, measurement_shape=shape
    )
    path = folder / f"m{i}.npz"
    io.save_measurement(path, sim)
    paths.append(str(path))
  return paths


def _config(paths, out, **fields):
  em = dict(progress_every=0, dtype="float64", **fields.pop("em", {}))
  return reconstruction.ReconstructionConfig(
    measurements=tuple(paths),
    image_size=SIZE,
    out=str(out),
    checkpoint_every=fields.pop("checkpoint_every", 2),
    em=em,
    **fields,
  )


def _interrupt_after(monkeypatch, segments):
  """Ctrl-C at the end of the given number of checkpointed segments."""
  seen = []
  original = checkpoints.Checkpointer.on_segment_end

  def on_segment_end(self, run, state, rows, seconds):
    original(self, run, state, rows, seconds)
    seen.append(run.index)
    if len(seen) == segments:
      raise KeyboardInterrupt

  monkeypatch.setattr(
    checkpoints.Checkpointer, "on_segment_end", on_segment_end
  )
  return seen


@pytest.mark.parametrize(
  "fields",
  [
    dict(method="recommended"),
    dict(method="recommended", stream="always"),
    dict(method="paper", em=dict(acceleration="secant", max_iterations=30)),
  ],
  ids=["recommended", "recommended-streamed", "paper-secant"],
)
@pytest.mark.parametrize("segments", [1, 3])
def test_an_interrupted_run_resumes_to_the_uninterrupted_estimate(
  measurement, tmp_path, monkeypatch, fields, segments
):
  whole = reconstruction.reconstruct(
    _config(measurement, tmp_path / "whole.npz", **dict(fields))
  )
  assert not os.path.exists(tmp_path / "whole.npz.checkpoint")  # removed
  out = tmp_path / "cut.npz"
  with monkeypatch.context() as patch:
    _interrupt_after(patch, segments)
    with pytest.raises(KeyboardInterrupt):
      reconstruction.reconstruct(_config(measurement, out, **dict(fields)))
  assert checkpoints.has_checkpoint(f"{out}.checkpoint")
  assert np.load(out)["interrupted"]
  # Without --resume the checkpoint is not overwritten.
  with pytest.raises(ValueError, match="--resume"):
    reconstruction.reconstruct(_config(measurement, out, **dict(fields)))
  resumed = reconstruction.reconstruct(
    _config(measurement, out, resume=True, **dict(fields))
  )
  a = np.load(tmp_path / "whole.npz")
  b = np.load(out)
  assert not b["interrupted"]
  np.testing.assert_array_equal(b["estimate"], a["estimate"])
  assert resumed["sigma"] == whole["sigma"]
  assert resumed["final_log_likelihood"] == whole["final_log_likelihood"]
  assert not os.path.exists(f"{out}.checkpoint")


def test_checkpoints_of_other_inputs_or_none_are_refused(measurement, tmp_path):
  out = tmp_path / "e.npz"
  with pytest.raises(ValueError, match="no checkpoint"):
    reconstruction.reconstruct(_config(measurement, out, resume=True))
  directory = f"{out}.checkpoint"
  saver = checkpoints.Checkpointer(directory, "another problem", 1)
  saver.save()
  for fields in (dict(seed=3), dict(sigma=0.5), dict(method="paper")):
    with pytest.raises(ValueError, match="other inputs or options") as err:
      reconstruction.reconstruct(
        _config(measurement, out, resume=True, **fields)
      )
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="checkpoint_every"):
    reconstruction.check_config(_config(measurement, out, checkpoint_every=-1))
  open(tmp_path / "file", "w").close()
  with pytest.raises(ValueError, match="is a file"):
    reconstruction.reconstruct(
      _config(measurement, out, checkpoint_dir=str(tmp_path / "file"))
    )


@pytest.mark.parametrize(
  "flags",
  [
    ["--method=paper", "--acceleration=none", "--max_iterations=400"],
    ["--method=recommended", "--stream=always", "--max_iterations=60"],
  ],
  ids=["paper", "recommended-streamed"],
)
def test_a_killed_tool_resumes_to_the_uninterrupted_estimate(
  measurement, tmp_path, flags
):
  """kill -9 once the first checkpoint is on disk; --resume; compare."""
  common = [
    sys.executable,
    "-m",
    "mtd_tf.reconstruct",
    f"--measurement={','.join(measurement)}",
    f"--image_size={SIZE}",
    *flags,
    "--tolerance=0",
    "--dtype=float64",
    "--checkpoint_every=5",
    "--progress_every=0",
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  subprocess.run(
    common + [f"--out={tmp_path / 'whole.npz'}"],
    check=True,
    env=env,
    capture_output=True,
  )
  out = tmp_path / "killed.npz"
  process = subprocess.Popen(
    common + [f"--out={out}"],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while not checkpoints.has_checkpoint(f"{out}.checkpoint"):
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not out.exists()
  subprocess.run(
    common + [f"--out={out}", "--resume"],
    check=True,
    env=env,
    capture_output=True,
  )
  a, b = np.load(tmp_path / "whole.npz"), np.load(out)
  np.testing.assert_array_equal(b["estimate"], a["estimate"])
  assert not os.path.exists(f"{out}.checkpoint")
