"""The one pattern of every command-line tool: flags -> frozen config -> call.

A tool is a short module (`mtd_tf/reconstruct.py`, `trainers/...`)::

  \"\"\"`mtd-reconstruct`: approximate EM on measurement files.

  Example:
    mtd-reconstruct --measurement=m.npz --image_size=28
  \"\"\"
  from absl import flags
  from mtd_tf import cli

  def define_flags(fv):
    flags.DEFINE_string("measurement", None, "...", flag_values=fv)

  def main(fv):
    from mtd_tf.pipelines import reconstruction   # the library, imported late
    config = reconstruction.Config(measurement=fv.measurement, ...)
    reconstruction.reconstruct(config)

  def run(argv=None):
    cli.run(main, define_flags, __doc__, argv)

Each tool parses its own `absl.flags.FlagValues`, so importing any set of
tools in one process defines nothing globally; library modules never see
flags. `cli.run` adds the flags every tool shares (--quiet, --verbosity,
--logtostderr, --version, --help) and the conventions: usage errors exit 2,
failures exit 1, each with one line `<tool>: error: ...` and no traceback;
Ctrl-C exits 130 and SIGTERM 143 (raised in the main thread as
`KeyboardInterrupt` / `Terminated`, so tools can save what is complete).
"""

import logging as std_logging
import os
import signal
import sys
import textwrap

from absl import flags
from absl import logging

from mtd_tf import __version__
from mtd_tf.base import fields

__all__ = [
  "run",
  "UsageError",
  "Terminated",
  "version",
  "program_name",
  "define_config_flags",
  "config_values",
]


class UsageError(Exception):
  """A flag value or combination that makes no sense: exit status 2."""


class Terminated(KeyboardInterrupt):
  """Raised in the main thread on SIGTERM (exit status 143).

  A `KeyboardInterrupt`, so code that saves partial work on Ctrl-C does the
  same on SIGTERM.
  """


_COMMON = ("quiet", "verbosity", "logtostderr", "version", "help")


def version():
  """The installed package version (one home: pyproject.toml)."""
  return __version__


def program_name(argv=None):
  argv = sys.argv if argv is None else argv
  name = os.path.basename(argv[0]) if argv and argv[0] else "mtd_tf"
  if name in ("__main__.py", "-c", "-m") or name.endswith(".py"):
    return name[:-3] if name.endswith(".py") else "mtd_tf"
  return name


def _define_common(fv):
  flags.DEFINE_bool(
    "quiet", False, "Print only errors and the final summary.", flag_values=fv
  )
  flags.DEFINE_integer(
    "verbosity",
    0,
    "Logging level: -1 warnings, 0 progress (default), 1 debug.",
    short_name="v",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "logtostderr",
    True,
    "Log to stderr (the only log destination; kept for absl compatibility).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "version", False, "Print the package version and exit.", flag_values=fv
  )
  flags.DEFINE_bool(
    "help", False, "Show this help and exit.", short_name="h", flag_values=fv
  )


def help_text(fv, doc, program):
  """The tool's description, its own flags with defaults, the shared ones."""
  lines = [textwrap.dedent(doc or "").strip(), ""]
  lines.append(f"Flags of {program}:")
  own = sorted(
    (
      f
      for name, f in fv._flags().items()  # pylint: disable=protected-access
      if name == f.name and name not in _COMMON
    ),
    key=lambda f: f.name,
  )
  for f in own:
    default = f.default_as_str if f.default is not None else "none"
    lines.append(f"  --{f.name}: {f.help}")
    lines.append(f"    (default: {default})")
  lines.append(
    "Shared flags: --quiet, --verbosity/-v, --logtostderr, "
    "--version, --help/-h."
  )
  return "\n".join(lines)


_DEFINE = {
  "integer": flags.DEFINE_integer,
  "float": flags.DEFINE_float,
  "string": flags.DEFINE_string,
  "bool": flags.DEFINE_bool,
}


def define_config_flags(fv, cls, names, defaults=None, helps=None):
  """Defines a flag for each named field of a config dataclass.

  The type, default, help and choices come from the field's declaration
  (`base.fields.option`), so an option added to a library config reaches
  every tool that names it without being copied by hand.

  Args:
    fv: the tool's `FlagValues`.
    cls: a dataclass whose fields are declared with `base.fields.option`
      (e.g. `em.EMOptions`).
    names: the fields to expose, in help order.
    defaults: {name: default} where the tool's default differs (None: "the
      library decides", said in the help).
    helps: {name: text} appended to the field's help.
  """
  declared = fields.flag_fields(cls)
  defaults = defaults or {}
  helps = helps or {}
  for name in names:
    field = declared[name]
    meta = field.metadata
    default = defaults.get(name, field.default)
    text = meta["help"] + (f" {helps[name]}" if name in helps else "")
    if meta["kind"] == "enum":
      choices = meta["choices"]
      choices = list(choices() if callable(choices) else choices)
      flags.DEFINE_enum(name, default, choices, text, flag_values=fv)
    else:
      _DEFINE[meta["kind"]](name, default, text, flag_values=fv)


def config_values(fv, names):
  """{name: value} of the named flags that hold a value (not None)."""
  return {name: fv[name].value for name in names if fv[name].value is not None}


class _Formatter(std_logging.Formatter):
  """`tool: message` for progress; `tool: warning: message` above INFO."""

  def __init__(self, program):
    super().__init__()
    self._program = program

  def format(self, record):
    message = record.getMessage()
    if record.levelno >= std_logging.WARNING:
      return f"{self._program}: {record.levelname.lower()}: {message}"
    return f"{self._program}: {message}"


def configure_logging(program, verbosity=0, quiet=False):
  """absl logging to stderr in one short line per record."""
  # absl warns once that logging precedes flag parsing unless its global
  # flags count as parsed; the tools parse their own FlagValues instead.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  handler = logging.get_absl_handler()
  handler.setFormatter(_Formatter(program))
  logging.use_absl_handler()
  level = (
    logging.ERROR
    if quiet
    else (
      logging.DEBUG
      if verbosity >= 1
      else logging.INFO
      if verbosity == 0
      else logging.WARNING
    )
  )
  logging.set_verbosity(level)


def _first_line(err):
  """The line that says what went wrong (TensorFlow's errors raised inside a
  `tf.function` start with "in user code:" and a stack; theirs is the last)."""
  lines = [
    line.strip() for line in str(err).strip().splitlines() if line.strip()
  ]
  if not lines:
    return type(err).__name__
  return lines[-1] if lines[0].startswith("in user code") else lines[0]


def _on_sigterm(signum, frame):
  del signum, frame
  raise Terminated()


def run(main, define_flags, doc, argv=None):
  """Parses flags, runs `main(flag_values)`, maps errors to exit codes.

  Args:
    main: callable(absl.flags.FlagValues) -> None or an int exit status.
    define_flags: callable(FlagValues) that defines the tool's flags in it.
    doc: the tool's module docstring (description and one example).
    argv: the command line (default sys.argv).
  """
  argv = list(sys.argv if argv is None else argv)
  program = program_name(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TF loads.
  fv = flags.FlagValues()
  _define_common(fv)
  define_flags(fv)
  try:
    rest = fv(argv)
  except flags.Error as err:
    sys.stderr.write(
      f"{program}: usage error: {_first_line(err)} (run "
      f"{program} --help to see the flags)\n"
    )
    sys.exit(2)
  if fv.help:
    print(help_text(fv, doc, program))
    sys.exit(0)
  if fv.version:
    print(f"{program} (mtd_tf) {version()}")
    sys.exit(0)
  if len(rest) > 1:
    sys.stderr.write(
      f"{program}: usage error: unexpected arguments: "
      f"{' '.join(rest[1:])} (flags take the form "
      "--name=value)\n"
    )
    sys.exit(2)
  configure_logging(program, fv.verbosity, fv.quiet)
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    status = main(fv)
  except UsageError as err:
    sys.stderr.write(f"{program}: usage error: {_first_line(err)}\n")
    sys.exit(2)
  except Terminated:
    sys.stderr.write(f"{program}: terminated\n")
    sys.exit(143)
  except KeyboardInterrupt:
    sys.stderr.write(f"{program}: interrupted\n")
    sys.exit(130)
  except (ValueError, OSError, KeyError, MemoryError) as err:
    sys.stderr.write(f"{program}: error: {_first_line(err)}\n")
    sys.exit(1)
  except Exception as err:  # pylint: disable=broad-except
    # Never a traceback: name the kind of failure so it can be reported.
    sys.stderr.write(
      f"{program}: error: {type(err).__name__}: {_first_line(err)}\n"
    )
    sys.exit(1)
  finally:
    signal.signal(signal.SIGTERM, previous)
  sys.exit(int(status or 0))
