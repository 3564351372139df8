"""The E-step under tf.distribute gives the single-process estimate."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import distributed_problem
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.em import distributed

HERE = pathlib.Path(__file__).resolve().parent


def _single_process(options=em.EMOptions(max_iterations=15), prior=None):
  image, sigma, init, micrographs = distributed_problem.problem()
  return em.approximate_em(
    micrographs, image.shape[0], sigma, init=init, options=options, prior=prior
  )


def _mirrored():
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  assert len(devices) == 2
  strategy = tf.distribute.MirroredStrategy(devices)
  assert strategy.num_replicas_in_sync == 2
  return strategy


@pytest.mark.parametrize("name", ["estimate_shift_prior", "estimate_sigma"])
def test_loop_state_estimates_are_refused_in_memory(name):
  # In-memory replicas' statistics do not carry rho and sigma: refused, not
  # ignored (streamed shares carry them: `ShardedData`).
  image, sigma, init, micrographs = distributed_problem.problem()
  with pytest.raises(ValueError, match=name):
    distributed.distributed_em(
      tf.distribute.get_strategy(),
      micrographs,
      image.shape[0],
      sigma,
      init=init,
      options=em.EMOptions(max_iterations=2, **{name: True}),
    )


@pytest.mark.slow  # ~5 s on the shared 2-core machine.
def test_mirrored_strategy_over_two_logical_cpus():
  image, sigma, init, micrographs = distributed_problem.problem()
  got = distributed.distributed_em(
    _mirrored(),
    micrographs,
    image.shape[0],
    sigma,
    init=init,
    options=em.EMOptions(max_iterations=15),
  )
  expected = _single_process()
  assert got.iterations == expected.iterations
  np.testing.assert_allclose(
    got.estimate, expected.estimate, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    got.log_likelihood, expected.log_likelihood, rtol=1e-5
  )


@pytest.mark.slow  # ~5 s on the shared 2-core machine.
def test_mirrored_strategy_with_a_prior():
  image, sigma, init, micrographs = distributed_problem.problem()
  prior = priors.GaussianPrior(np.full((6, 6), 0.5))
  options = em.EMOptions(
    max_iterations=12, m_step="preconditioned", gamma="linear", dtype="float64"
  )
  got = distributed.distributed_em(
    _mirrored(),
    micrographs,
    image.shape[0],
    sigma,
    init=init,
    prior=prior,
    options=options,
  )
  expected = _single_process(options, prior)
  assert got.iterations == expected.iterations == 12
  np.testing.assert_allclose(
    got.estimate, expected.estimate, rtol=1e-10, atol=1e-10
  )


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _two_workers(tmp_path, script, *args, extra_env=None, returncode=0):
  """Runs `script` as two MultiWorkerMirroredStrategy workers; their outputs."""
  workers = [f"localhost:{port}" for port in _free_ports(2)]
  env = dict(
    os.environ,
    **(extra_env or {}),
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=os.pathsep.join(
      [str(HERE)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    ),
  )
  procs = []
  for index in range(2):
    env_i = dict(
      env,
      TF_CONFIG=json.dumps(
        {
          "cluster": {"worker": workers},
          "task": {"type": "worker", "index": index},
        }
      ),
    )
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          str(HERE / script),
          *args,
          str(tmp_path / f"worker{index}.npy"),
        ],
        env=env_i,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == returncode, output[-3000:]
  if returncode:
    return None
  return [np.load(tmp_path / f"worker{index}.npy") for index in range(2)]


def _assert_matches_one_process(results):
  expected = _single_process()
  for got in results:
    estimate = got[:36].reshape(6, 6)
    assert int(got[36]) == expected.iterations
    np.testing.assert_allclose(
      estimate, expected.estimate, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(got[37:], expected.log_likelihood, rtol=1e-5)


@pytest.mark.slow
def test_two_worker_processes_match_one_process(tmp_path):
  _assert_matches_one_process(_two_workers(tmp_path, "distributed_worker.py"))


@pytest.mark.slow
def test_two_workers_streaming_their_shares_match_one_process(tmp_path):
  """Each worker streams its own micrograph files from disk."""
  _, _, _, micrographs = distributed_problem.problem()
  folder = tmp_path / "mics"
  folder.mkdir()
  for i, micrograph in enumerate(micrographs):
    np.save(folder / f"mic{i}.npy", micrograph)
  _assert_matches_one_process(
    _two_workers(tmp_path, "distributed_worker.py", str(folder))
  )


@pytest.mark.slow
def test_two_workers_run_the_recommended_method_as_one_process(tmp_path):
  """Starts, pruning, offset grids, rho and sigma by EM over two workers."""
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

  image, sigma, init, micrographs = distributed_problem.problem()
  folder = tmp_path / "mics"
  folder.mkdir()
  for i, micrograph in enumerate(micrographs):
    np.save(folder / f"mic{i}.npy", micrograph)
  results = _two_workers(
    tmp_path, "distributed_worker.py", str(folder), "recommended"
  )
  # One process streaming every file, in the workers' order of files.
  data = streaming.StreamingData(
    str(folder / "*.npy"), image.shape[0], dtype="float64"
  )
  expected = distributed_problem.recommended_result(data, sigma, init)
  assert expected[2] > 1  # several starts
  for got in results:
    assert got[0] == expected[0]  # the same winner
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-7, atol=1e-9)
  np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.slow
def test_two_workers_killed_mid_run_resume_to_the_same_estimate(tmp_path):
  """Both workers die in phase 2; resumed, they end as an unbroken run."""
  _, _, _, micrographs = distributed_problem.problem()
  folder = tmp_path / "mics"
  folder.mkdir()
  for i, micrograph in enumerate(micrographs):
    np.save(folder / f"mic{i}.npy", micrograph)
  whole = _two_workers(
    tmp_path, "distributed_worker.py", str(folder), "recommended"
  )
  checkpoints_dir = str(tmp_path / "ckpt")
  _two_workers(
    tmp_path,
    "distributed_worker.py",
    str(folder),
    "recommended",
    extra_env={"MTD_CHECKPOINTS": checkpoints_dir, "MTD_DIE_AT": "17"},
    returncode=3,
  )
  assert sorted(os.listdir(checkpoints_dir)) == ["worker_0", "worker_1"]
  resumed = _two_workers(
    tmp_path,
    "distributed_worker.py",
    str(folder),
    "recommended",
    extra_env={"MTD_CHECKPOINTS": checkpoints_dir, "MTD_RESUME": "1"},
  )
  for got in resumed:
    np.testing.assert_array_equal(got, whole[0])


@pytest.mark.slow  # ~10 s on the shared 2-core machine.
@pytest.mark.parametrize("method", ["auto", "secant"])
def test_streamed_share_accelerated_matches_one_process(tmp_path, method):
  """An accelerator under a strategy sees the same statistics and choice."""
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

  image, sigma, init, micrographs = distributed_problem.problem()
  paths = []
  for i, micrograph in enumerate(micrographs):
    paths.append(str(tmp_path / f"mic{i}.npy"))
    np.save(paths[-1], micrograph)
  data = streaming.StreamingData(paths, image.shape[0], memory_budget_bytes=0)
  options = em.EMOptions(max_iterations=15, acceleration=method)
  got = distributed.distributed_em(
    tf.distribute.MirroredStrategy(["/cpu:0"]),  # one replica per worker
    data,
    image.shape[0],
    sigma,
    init=init,
    options=options,
  )
  expected = _single_process(options)
  assert got.iterations == expected.iterations
  np.testing.assert_allclose(
    got.estimate, expected.estimate, rtol=1e-5, atol=1e-5
  )
