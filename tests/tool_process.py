"""Runs a command-line tool in a fresh interpreter, as a user would."""

import os
import subprocess
import sys

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def run(module, *args, cwd=None, timeout=600):
  """`python -m module args...`: a `subprocess.CompletedProcess` (text)."""
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    cwd=cwd,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
