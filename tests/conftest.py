"""Shared fixtures: quiet TensorFlow, the MNIST path, small problems."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # pylint: disable=g-import-not-at-top
import sys  # pylint: disable=g-import-not-at-top

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Two logical CPU devices, for the MirroredStrategy tests; this must happen
# before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
  _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import numpy as np  # noqa: E402 (after the device setup)
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_npz():
  """Path of the MNIST file (env MTD_MNIST_NPZ or ../shared/data/mnist.npz)."""
  path = pathlib.Path(
    os.environ.get(
      "MTD_MNIST_NPZ", REPO.parent / "shared" / "data" / "mnist.npz"
    )
  )
  if not path.exists():
    pytest.skip(f"MNIST file not found at {path}; set MTD_MNIST_NPZ.")
  return path


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def run_tool(capfd, monkeypatch):
  """Runs a tool in this process: run_tool("mtd_tf.x", *args, cwd=...).

  Returns a `subprocess.CompletedProcess` (returncode, stdout, stderr), as
  the subprocess runs did, without the ~4 s start-up of a new interpreter.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  def run(module, *args, cwd=None):
    if cwd is not None:
      monkeypatch.chdir(cwd)
    tool = importlib.import_module(module)
    capfd.readouterr()
    argv = [module.rsplit(".", 1)[-1], *map(str, args)]
    # absl's handler keeps the stderr it was made with: point it at this
    # test's captured stderr, as a fresh process would log to its own.
    from absl import logging  # pylint: disable=g-import-not-at-top

    handler = logging.get_absl_handler().python_handler
    monkeypatch.setattr(handler, "stream", sys.stderr)
    # A tool sets the process's log level and format (--quiet, -v): undo it.
    verbosity, formatter = logging.get_verbosity(), handler.formatter
    try:
      tool.run(argv)
      code = 0
    except SystemExit as err:
      code = (
        err.code if isinstance(err.code, int) else int(err.code is not None)
      )
    finally:
      logging.set_verbosity(verbosity)
      handler.setFormatter(formatter)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)

  return run
