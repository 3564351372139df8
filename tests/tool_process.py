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


def run_script(script, entry, *args, cwd=None, timeout=600):
  """`script args...` as its console-script wrapper runs it.

  The wrapper that pip installs for `[project.scripts]`'s
  `script = "module:function"` imports the module, sets sys.argv[0] to the
  script's name and exits with `function()`; this does the same in a fresh
  interpreter, installed or not. Returns a `subprocess.CompletedProcess`.
  """
  module, function = entry.split(":")
  code = (
    "import sys\n"
    f"from {module} import {function}\n"
    f"sys.argv[0] = {script!r}\n"
    f"sys.exit({function}())\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code, *map(str, args)],
    cwd=cwd,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
