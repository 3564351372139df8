"""Where a number came from: versions and machine, for results files.

`environment()` is recorded by the experiments (results.json) and the
benchmarks (their JSON records) alike, so both can be compared.
"""

import os
import platform

import numpy as np

import mtd_tf

__all__ = ["environment"]


def environment():
  """Versions of mtd_tf, TensorFlow, numpy and Python; machine and devices.

  Returns:
    A JSON-serialisable dict of strings and ints.
  """
  # Deferred: the records load TensorFlow only when one is written.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return {
    "mtd_tf": mtd_tf.__version__,
    "tensorflow": tf.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "device": ", ".join(
      d.device_type for d in tf.config.list_physical_devices()
    )
    or "CPU",
    "cpu_count": os.cpu_count(),
  }
