"""`cli.run`: exit statuses, one-line errors, Ctrl-C and SIGTERM; every
tool's --help and --version."""

import ast
import importlib.metadata
import importlib.util
import os
import pathlib
import signal

import pytest
import tool_process

import mtd_tf
from mtd_tf import cli

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10: the installed entry points.
  tomllib = None

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def _run(main, capsys):
  with pytest.raises(SystemExit) as info:
    cli.run(main, lambda fv: None, "Test tool.\n\nExample:\n  tool", ["tool"])
  return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
  "error,status,line",
  [
    (KeyboardInterrupt(), 130, "tool: interrupted"),
    (cli.Terminated(), 143, "tool: terminated"),
    (cli.UsageError("--x must be >= 1."), 2, "tool: usage error: --x must"),
    (ValueError("bad data\nsecond line"), 1, "tool: error: bad data"),
    (RuntimeError("boom"), 1, "tool: error: RuntimeError: boom"),
  ],
)
def test_exit_statuses_and_one_line(capsys, error, status, line):
  def main(fv):
    del fv
    raise error

  code, err = _run(main, capsys)
  assert code == status
  assert err.strip() == line if status != 2 else err.startswith(line)
  assert "Traceback" not in err and "second line" not in err


def test_sigterm_becomes_143_and_the_handler_is_restored(capsys):
  before = signal.getsignal(signal.SIGTERM)

  def main(fv):
    del fv
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()  # Not reached: the handler raises Terminated.

  code, err = _run(main, capsys)
  assert code == 143 and err.strip() == "tool: terminated"
  assert signal.getsignal(signal.SIGTERM) == before


def _console_scripts():
  """{script: "module:function"}: pyproject.toml's [project.scripts]."""
  if tomllib is not None:
    with open(PYPROJECT, "rb") as f:
      return tomllib.load(f)["project"]["scripts"]
  return {
    e.name: e.value
    for e in importlib.metadata.distribution("mtd_tf").entry_points
    if e.group == "console_scripts"
  }


SCRIPTS = _console_scripts()
# Tools that load TensorFlow before parsing their flags (~7 s a run): none
# since mtd_tf.priors loads its TensorFlow modules on first use.
IMPORTS_TENSORFLOW = set()


def _summary(module):
  """The first line of a module's docstring, read without importing it."""
  source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
  return ast.get_docstring(ast.parse(source)).splitlines()[0]


def test_every_tool_is_a_console_script_of_cli_run():
  assert SCRIPTS and all(entry.endswith(":run") for entry in SCRIPTS.values())


@pytest.mark.parametrize("flag", ["--help", "--version"])
@pytest.mark.parametrize(
  "script",
  [
    pytest.param(s, marks=pytest.mark.slow) if s in IMPORTS_TENSORFLOW else s
    for s in sorted(SCRIPTS)
  ],
)
def test_help_and_version_of_every_tool(script, flag):
  """As the installed script runs; --version also as `python -m module`."""
  entry = SCRIPTS[script]
  module = entry.split(":")[0]
  done = tool_process.run_script(script, entry, flag, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  if flag == "--help":
    assert done.stdout.startswith(_summary(module)), done.stdout[:200]
    assert f"\nFlags of {script}:\n" in done.stdout
    assert "Shared flags:" in done.stdout
  else:
    assert done.stdout == f"{script} (mtd_tf) {mtd_tf.__version__}\n"
    # As a module (`cli.program_name` then names it after the module).
    done = tool_process.run(module, flag, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.endswith(f" (mtd_tf) {mtd_tf.__version__}\n")
