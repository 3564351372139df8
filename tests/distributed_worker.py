"""One worker of the MultiWorkerMirroredStrategy tests (run as a subprocess).

Usage: distributed_worker.py [FOLDER [recommended]] OUT.npy; TF_CONFIG
names the cluster and this worker's index. Without FOLDER every worker
simulates the same micrographs from the same seed and keeps its own share in
memory (micrograph i goes to worker i % workers); with FOLDER (the
micrographs as .npy files) each worker streams its own share from disk
(`streaming.shard`), and with "recommended" runs the recommended method
(`recovery.multistart_em` on a `distributed.ShardedData`), writing
`recommended_result` of distributed_problem.
"""

import json
import os
import sys

import distributed_problem
import numpy as np
import tensorflow as tf

from mtd_tf import em
from mtd_tf.em import callbacks
from mtd_tf.em import distributed
from mtd_tf.em import streaming


class _Die(callbacks.Callback):
  """Ends the worker process at once (as kill -9) after iteration `tau`."""

  def __init__(self, tau):
    self._tau = tau

  def on_segment_end(self, run, state, rows, seconds):
    if run.index == 1 and int(state.tau) >= self._tau:
      os._exit(3)  # pylint: disable=protected-access


def recommended(strategy, folder, index, workers, out_path):
  """With MTD_CHECKPOINTS=DIR, checkpoints every 3 iterations; with
  MTD_DIE_AT=tau the worker dies in phase 2 at that iteration; with
  MTD_RESUME=1 it resumes."""
  image, sigma, init, _ = distributed_problem.problem()
  files = streaming.shard(os.path.join(folder, "*.npy"), workers, index)
  data = distributed.ShardedData(
    strategy,
    streaming.StreamingData(
      files, image.shape[0], dtype="float64", memory_budget_bytes=0
    ),
  )
  watchers = []
  if os.environ.get("MTD_CHECKPOINTS"):
    watchers.append(
      distributed.checkpointer(
        strategy,
        os.environ["MTD_CHECKPOINTS"],
        "distributed test",
        every=3,
        resume=bool(os.environ.get("MTD_RESUME")),
      )
    )
  if os.environ.get("MTD_DIE_AT"):
    watchers.append(_Die(int(os.environ["MTD_DIE_AT"])))
  with callbacks.active(watchers):
    result = distributed_problem.recommended_result(data, sigma, init)
  np.save(out_path, result)


def main(out_path, folder=None, mode=None):
  config = json.loads(os.environ["TF_CONFIG"])
  index = config["task"]["index"]
  workers = len(config["cluster"]["worker"])
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  if mode == "recommended":
    return recommended(strategy, folder, index, workers, out_path)
  image, sigma, init, micrographs = distributed_problem.problem()
  if folder is None:
    mine = micrographs[index::workers]
  else:
    files = streaming.shard(os.path.join(folder, "*.npy"), workers, index)
    mine = streaming.StreamingData(files, image.shape[0], memory_budget_bytes=0)
  result = distributed.distributed_em(
    strategy,
    mine,
    image.shape[0],
    sigma,
    init=init,
    options=em.EMOptions(max_iterations=15),
  )
  np.save(
    out_path,
    np.concatenate(
      [result.estimate.ravel(), [result.iterations], result.log_likelihood]
    ),
  )


if __name__ == "__main__":
  main(sys.argv[-1], *sys.argv[1:-1])
