"""One worker of the streamed MultiWorkerMirroredStrategy test.

Usage: distributed_stream_worker.py FOLDER OUT.npy; TF_CONFIG names the
cluster and this worker's index. FOLDER holds the micrographs as .npy
files; each worker streams its own share (`streaming.shard`).
"""

import json
import os
import sys

import distributed_problem
import numpy as np
import tensorflow as tf

from mtd_tf import distributed
from mtd_tf import em
from mtd_tf import streaming


def main(folder, out_path):
  config = json.loads(os.environ["TF_CONFIG"])
  index = config["task"]["index"]
  workers = len(config["cluster"]["worker"])
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  image, sigma, init, _ = distributed_problem.problem()
  mine = streaming.shard(os.path.join(folder, "*.npy"), workers, index)
  data = streaming.StreamingData(mine, image.shape[0], memory_budget_bytes=0)
  result = distributed.distributed_em(
    strategy,
    data,
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
  main(sys.argv[1], sys.argv[2])
