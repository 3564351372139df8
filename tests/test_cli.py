"""`cli.run`: exit statuses, one-line errors, Ctrl-C and SIGTERM."""

import os
import signal

import pytest

from mtd_tf import cli


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
