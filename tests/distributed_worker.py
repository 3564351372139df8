"""One worker of the MultiWorkerMirroredStrategy test (run as a subprocess).

Usage: distributed_worker.py OUT.npy; TF_CONFIG names the cluster and this
worker's index. Every worker simulates the same micrographs from the same
seed and keeps its own share (micrograph i goes to worker i % workers).
"""

import json
import os
import sys

import distributed_problem
import numpy as np
import tensorflow as tf

from mtd_tf import distributed
from mtd_tf import em


def main(out_path):
  config = json.loads(os.environ["TF_CONFIG"])
  index = config["task"]["index"]
  workers = len(config["cluster"]["worker"])
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  image, sigma, init, micrographs = distributed_problem.problem()
  mine = micrographs[index::workers]
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
  main(sys.argv[1])
