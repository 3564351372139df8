"""Shared plumbing of the command-line tools: exit codes and one-line errors.

Usage errors (unknown flags, malformed or missing flag values) exit with
status 2; failures (unreadable files, bad data) exit with status 1. Either
way the user sees one line saying what was wrong, never a traceback.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

__all__ = ["run", "UsageError"]

UsageError = app.UsageError


def _program():
  return os.path.basename(sys.argv[0]) if sys.argv else "mtd_tf"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    sys.stderr.write(f"{_program()}: usage error: {err} (run with "
                     "--helpshort to see the flags)\n")
    sys.exit(2)


def run(main):
  """`absl.app.run(main)` with the exit-code and error conventions above."""

  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as err:
      sys.stderr.write(f"{_program()}: usage error: {err}\n")
      sys.exit(2)
    except (ValueError, OSError, KeyError) as err:
      message = str(err).strip().splitlines()
      sys.stderr.write(f"{_program()}: error: "
                       f"{message[0] if message else type(err).__name__}\n")
      sys.exit(1)

  app.run(guarded, flags_parser=_parse_flags)
