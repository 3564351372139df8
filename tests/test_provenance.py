"""Provenance records: what produced a number, as JSON."""

import json
import os
import platform

import numpy as np
import tensorflow as tf

import mtd_tf
from mtd_tf.base import provenance


def test_environment_records_the_running_versions():
  env = provenance.environment()
  assert env["mtd_tf"] == mtd_tf.__version__
  assert env["tensorflow"] == tf.__version__
  assert env["numpy"] == np.__version__
  assert env["python"] == platform.python_version()
  assert env["cpu_count"] == os.cpu_count()
  assert "CPU" in env["device"]
  assert json.loads(json.dumps(env)) == env
