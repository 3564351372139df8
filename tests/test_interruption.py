"""SIGKILL at the worst moment: trainers resume, exports are never partial."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import priors

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
TINY = [
  "--batch_size=8",
  "--channels=8,16,16",
  "--embed_dim=16",
  "--heldout=32",
  "--log_every_steps=5",
  "--heldout_every_steps=100000",
  "--warmup_steps=1",
]


def _tool_command(module, *flags):
  return [sys.executable, "-m", module, *flags]


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory, mnist_npz):
  with np.load(mnist_npz) as data:
    x_train = data["x_train"][:256]
  path = tmp_path_factory.mktemp("mnist") / "small.npz"
  np.savez(path, x_train=x_train)
  return path


def _trainer(*flags):
  return _tool_command(
    "trainers.train_mnist_prior", *TINY, "--run_name=run", *flags
  )


def _latest_step(folder):
  latest = tf.train.latest_checkpoint(str(folder))
  return int(latest.rsplit("-", 1)[1]) if latest else None


def _wait_for(predicate, proc, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.1)
  return False


@pytest.mark.slow
def test_sigkilled_trainer_resumes_from_its_last_checkpoint(
  tmp_path, small_mnist
):
  ckpt = tmp_path / "ckpt" / "run"
  interval = 2.0
  proc = subprocess.Popen(
    _trainer(
      f"--mnist_npz={small_mnist}",
      "--steps=1000000",
      f"--checkpoint_dir={ckpt.parent}",
      f"--checkpoint_every_secs={interval}",
      "--export_dir=none",
    ),
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    # Let it write two checkpoints, then kill it without warning.
    assert _wait_for(lambda: (_latest_step(ckpt) or 0) > 0, proc, 180)
    first = _latest_step(ckpt)
    assert _wait_for(lambda: _latest_step(ckpt) != first, proc, 60)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
  finally:
    proc.kill()
    proc.wait()
  saved = _latest_step(ckpt)
  index = sorted(ckpt.glob("ckpt-*.index"), key=os.path.getmtime)[-1]
  # The work lost is what ran since the last checkpoint: at most one interval.
  assert killed_at - os.path.getmtime(index) < interval + 1.5
  done = subprocess.run(
    _trainer(
      f"--mnist_npz={small_mnist}",
      f"--steps={saved + 3}",
      f"--checkpoint_dir={ckpt.parent}",
      "--export_dir=none",
    ),
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.search(
    rf"Resumed from .*ckpt-{saved} at step {saved}\.", done.stderr
  )
  assert _latest_step(ckpt) == saved + 3


@pytest.mark.slow
def test_sigkilled_export_leaves_no_partial_version_folder(
  tmp_path, small_mnist
):
  ckpt = tmp_path / "ckpt"
  done = subprocess.run(
    _trainer(
      f"--mnist_npz={small_mnist}",
      "--steps=2",
      f"--checkpoint_dir={ckpt}",
      "--export_dir=none",
    ),
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  parent = tmp_path / "saved_models" / "tiny"
  target = parent / "1"
  export = (f"--export_dir={parent}", "--export_version=1")
  proc = subprocess.Popen(
    _trainer(
      f"--mnist_npz={small_mnist}",
      "--steps=2",
      "--export_only",
      f"--checkpoint_dir={ckpt}",
      *export,
    ),
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    # Kill as soon as the export has started writing its temporary folder.
    started = _wait_for(
      lambda: (
        parent.exists()
        and any(p.name.startswith(".tmp-") for p in parent.iterdir())
      ),
      proc,
      180,
    )
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  if started:
    assert not target.exists()
  else:  # It finished before we could kill it: then it must be whole.
    priors.load_prior(str(target))
  done = subprocess.run(
    _trainer(
      f"--mnist_npz={small_mnist}",
      "--steps=2",
      "--export_only",
      f"--checkpoint_dir={ckpt}",
      *export,
      "--overwrite",
    ),
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert priors.load_prior(str(target)).image_size == 28
