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

Flags named ``seed`` or ``*_seed`` seed numpy's and TensorFlow's
generators: `cli.run` refuses values outside 0..2^32 - 1 as usage errors
naming the flag. TensorFlow's C++ start-up lines ("oneDNN custom
operations are on", "Could not find cuda drivers", absl's "All log messages
before absl::InitializeLog()") ignore TF_CPP_MIN_LOG_LEVEL in TensorFlow
2.21: while a tool runs, the first `import tensorflow` has file descriptor 2
redirected, and only the lines at or above TF_CPP_MIN_LOG_LEVEL (2, errors,
unless the environment sets it) are written back (`quiet_tensorflow_import`).
"""

import collections.abc
import contextlib
import dataclasses
import importlib.abc
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import textwrap
import types
import typing

from absl import flags
from absl import logging

from mtd_tf import __version__
from mtd_tf.base import fields
from mtd_tf.model import simulation

__all__ = [
  "run",
  "UsageError",
  "Terminated",
  "version",
  "program_name",
  "define_config_flags",
  "define_placement_flags",
  "config_from_flags",
  "config_values",
  "quiet_tensorflow_import",
  "MAX_SEED",
]


class UsageError(Exception):
  """A flag value or combination that makes no sense: exit status 2."""


class Terminated(KeyboardInterrupt):
  """Raised in the main thread on SIGTERM (exit status 143).

  A `KeyboardInterrupt`, so code that saves partial work on Ctrl-C does the
  same on SIGTERM.
  """


_COMMON = ("quiet", "verbosity", "logtostderr", "version", "help")
# The largest seed every generator the tools seed takes (np.random.seed and
# keras.utils.set_random_seed take 32-bit seeds; default_rng any >= 0).
MAX_SEED = 2**32 - 1


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


def define_placement_flags(fv, rotations_note):
  """--rotations and --min_separation: how copies are turned and spaced.

  Shared by the tools that simulate measurements (`simulation`).

  Args:
    fv: the tool's FlagValues.
    rotations_note: the tool's own end of the --rotations help (what
      its K means for continuous rotations).
  """
  flags.DEFINE_enum(
    "rotations",
    "discrete",
    list(simulation.ROTATION_MODES),
    "How copies are turned: discrete (one of the K angles 2 pi k / K, the "
    f"paper's) or continuous (an angle uniform on [0, 2 pi); {rotations_note}).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "min_separation",
    None,
    "Chebyshev distance in pixels kept between copies' corners (default: "
    "2L, the paper's; L: copies touch; below L, down to 1, they overlap "
    "and add).",
    flag_values=fv,
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
# The flag kinds of scalar annotations.
_SCALAR_KINDS = (
  (bool, "bool"),
  (int, "integer"),
  (float, "float"),
  (str, "string"),
)
_SEQUENCES = (tuple, list, collections.abc.Sequence)
_ITEM_WORDS = {int: "integers", float: "numbers"}


def define_config_flags(fv, cls, names=None, defaults=None, helps=None):
  """Defines a flag for each field (or each named field) of a config dataclass.

  Everything about a flag comes from the field's declaration, so an option
  added to a config reaches every tool that exposes it without being copied
  by hand:

  - name: the field's, or its `option(flag=...)`;
  - kind: its `option(kind=...)`, else "enum" where it has choices, else
    its annotation's: bool, int, float, str (each optionally `| None`), or
    a tuple of int, float or str as a comma-separated list
    (`tuple[int, ...]`);
  - default: the field's, unless the tool gives its own;
  - help: its `option` help, else its entry in the class docstring's
    ``Attributes:`` table (`fields.attribute_docs`, for dataclasses kept
    free of flag details), plus the tool's extra text;
  - choices: the enum's, a callable read now (so a registry can grow
    first).

  Read the flags back with `config_from_flags` (the whole config) or
  `config_values` (the fields whose flags hold a value).

  Args:
    fv: the tool's `absl.flags.FlagValues`.
    cls: a dataclass (e.g. `em.EMOptions`, `trainers.configs.TrainConfig`).
    names: the fields to expose, in order; None: all of them.
    defaults: {field name: default} where the tool's default differs from
      the field's (None: "the library decides", which the help should say);
      required fields need one.
    helps: {field name: text} appended to the field's help.

  Raises:
    TypeError: a name, default or help for no exposed field, a required
      field without a default, a field without help, or an annotation of
      no flag kind (give `option(kind=...)`).
  """
  declared = _declared(cls, names)
  defaults, helps = dict(defaults or {}), dict(helps or {})
  for label, given in (("defaults", defaults), ("helps", helps)):
    unknown = sorted(set(given) - set(declared))
    if unknown:
      raise TypeError(f"{label} for no flag of {cls.__name__}: {unknown}")
  docs = fields.attribute_docs(cls)
  hints = _hints(cls)
  for name, field in declared.items():
    default = defaults.get(name, _field_default(field))
    if default is dataclasses.MISSING:
      raise TypeError(f"{cls.__name__}.{name} is required: give a default.")
    text = field.metadata.get("help") or docs.get(name)
    if not text:
      raise TypeError(
        f"{cls.__name__}.{name} has no help: declare it with "
        "base.fields.option or document it under Attributes:."
      )
    if name in helps:
      text += f" {helps[name]}"
    flag = fields.flag_name(field)
    kind, _ = _kind(cls, field, hints)
    if kind == "enum":
      choices = field.metadata["choices"]
      choices = list(choices() if callable(choices) else choices)
      flags.DEFINE_enum(flag, default, choices, text, flag_values=fv)
    elif kind == "list":
      if default is not None and not isinstance(default, str):
        default = [str(item) for item in default]
      flags.DEFINE_list(flag, default, text, flag_values=fv)
    else:
      _DEFINE[kind](flag, default, text, flag_values=fv)


def config_from_flags(fv, cls, names=None):
  """The config of parsed flags defined by `define_config_flags`.

  Args:
    fv: the tool's parsed `FlagValues`.
    cls: the config dataclass the flags were defined from.
    names: the fields read from flags; None: all of them (the others keep
      the class's defaults).

  Returns:
    `cls(**values)`: list flags as tuples of their item type, values passed
    through each field's `option(from_flag=...)`.

  Raises:
    UsageError: a list item of the wrong type, or a value the config
      refuses (its ValueError).
  """
  hints = _hints(cls)
  values = {
    name: _value(fv, cls, field, hints)
    for name, field in _declared(cls, names).items()
  }
  try:
    return cls(**values)
  except ValueError as err:
    raise UsageError(str(err)) from err


def config_values(fv, cls, names=None):
  """The fields whose flags hold a value (not None): overrides of a config.

  For tools whose flags default to None where the library decides: the
  result goes to `dataclasses.replace` or a config's override mapping.

  Args:
    fv: the tool's parsed `FlagValues`.
    cls: the config dataclass the flags were defined from.
    names: the fields to read (as given to `define_config_flags`); None:
      all of them.

  Returns:
    {field name: value}, converted as by `config_from_flags`.

  Raises:
    UsageError: a list item of the wrong type.
  """
  hints = _hints(cls)
  return {
    name: _value(fv, cls, field, hints)
    for name, field in _declared(cls, names).items()
    if fv[fields.flag_name(field)].value is not None
  }


def _declared(cls, names):
  """{name: dataclasses.Field} of cls, all or the named ones in order."""
  every = {field.name: field for field in dataclasses.fields(cls)}
  if names is None:
    return every
  unknown = [name for name in names if name not in every]
  if unknown:
    raise TypeError(f"{cls.__name__} has no fields {unknown}")
  return {name: every[name] for name in names}


def _field_default(field):
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return field.default


def _hints(cls):
  """cls's resolved annotations ({} where they cannot be resolved)."""
  try:
    return typing.get_type_hints(cls)
  except (NameError, TypeError):
    return {}


def _kind(cls, field, hints):
  """(flag kind, list item type or None) of a config field."""
  meta = field.metadata
  annotation = hints.get(field.name, field.type)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    annotation = args[0] if len(args) == 1 else annotation
  if meta.get("choices") is not None:
    return "enum", None
  kind = meta.get("kind")
  if kind in (None, "list") and typing.get_origin(annotation) in _SEQUENCES:
    items = {a for a in typing.get_args(annotation) if a is not Ellipsis}
    item = items.pop() if len(items) == 1 else str
    if item in (int, float, str):
      return "list", item
  elif kind == "list":
    return "list", str
  elif kind is None:
    kind = next((k for t, k in _SCALAR_KINDS if annotation is t), None)
  if kind is None or kind == "list":
    raise TypeError(
      f"{cls.__name__}.{field.name}: no flag kind for {annotation!r}; "
      "declare it with base.fields.option(kind=...)."
    )
  return kind, None


def _value(fv, cls, field, hints):
  """The field's value from its flag: list items typed, from_flag applied."""
  flag = fv[fields.flag_name(field)]
  value = flag.value
  kind, item = _kind(cls, field, hints)
  if kind == "list" and value is not None:
    try:
      value = tuple(item(v) for v in value)
    except ValueError as err:
      example = ",".join(flag.default or ())
      raise UsageError(
        f"--{flag.name}={','.join(value)}: give "
        f"{_ITEM_WORDS.get(item, 'values')}"
        + (f" such as {example}." if example else ".")
      ) from err
  convert = field.metadata.get("from_flag")
  return convert(value) if convert else value


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


def _bad_seed(fv):
  """The usage error of the first seed flag outside 0..MAX_SEED, or None."""
  for name, flag in sorted(fv._flags().items()):  # pylint: disable=protected-access
    if name != flag.name or not (name == "seed" or name.endswith("_seed")):
      continue
    value = flag.value
    if isinstance(value, int) and not 0 <= value <= MAX_SEED:
      return (
        f"--{name}={value}: seeds are integers from 0 to {MAX_SEED} (numpy "
        "and TensorFlow take no negative seeds)."
      )
  return None


# TF_CPP_MIN_LOG_LEVEL counts these severities of absl/glog C++ lines.
_SEVERITIES = "IWEF"
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]*\] ")
# absl's note before its logging is set up; and the second line of the
# cpu_feature_guard record ("To enable the following instructions: ...").
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog()"
_CONTINUATION = "To enable the following instructions:"
_NO_CUDA_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT_FAILED = "failed call to cuInit"


def _min_log_level():
  try:
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
  except ValueError:
    return 0


def kept_log_lines(text, min_level):
  """The lines of captured stderr worth showing at TF_CPP_MIN_LOG_LEVEL.

  Drops absl/glog records below `min_level` (I = 0, W = 1, E = 2, F = 3)
  with their known continuation line, and absl's pre-initialisation note
  when `min_level` >= 1; keeps every other line (Python warnings, errors).
  On a machine without CUDA drivers (TensorFlow says so), the error of
  its failed cuInit is the same news and goes too.
  """
  no_driver = _NO_CUDA_DRIVER in text and min_level >= 1
  kept = []
  dropped = False
  for line in text.splitlines(keepends=True):
    match = _LOG_LINE.match(line)
    if match:
      dropped = _SEVERITIES.index(match.group(1)) < min_level or (
        no_driver and _CUINIT_FAILED in line
      )
    elif line.startswith(_PREAMBLE):
      dropped = min_level >= 1
    elif not (dropped and line.startswith(_CONTINUATION)):
      dropped = False
    if not dropped:
      kept.append(line)
  return "".join(kept)


@contextlib.contextmanager
def _stderr_filtered(min_level):
  """Redirects file descriptor 2; writes back `kept_log_lines` at the end."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):
    yield  # No stderr to redirect.
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      try:
        sys.stderr.flush()
      except (OSError, ValueError):
        pass
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = kept_log_lines(
        capture.read().decode("utf-8", "replace"), min_level
      )
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
  """Runs a module's loader with stderr filtered (`_stderr_filtered`)."""

  def __init__(self, loader, min_level):
    self._loader = loader
    self._min_level = min_level

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    try:
      with _stderr_filtered(self._min_level):
        self._loader.exec_module(module)
        # Finding the devices logs too (a failed cuInit where there is no
        # GPU): do it now, inside the filter, instead of at the first op.
        try:
          module.config.list_physical_devices()
        except Exception:  # pylint: disable=broad-except
          pass  # The first op will say what is wrong.
    finally:
      # The module keeps its own loader, as an ordinary import leaves it.
      module.__loader__ = self._loader
      if getattr(module, "__spec__", None) is not None:
        module.__spec__.loader = self._loader

  def __getattr__(self, name):
    return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` as the other finders do, with a `_QuietLoader`."""

  def __init__(self, min_level):
    self._min_level = min_level

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(name, path, target)
      if spec is not None:
        break
    else:
      return None
    if spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader, self._min_level)
    return spec


@contextlib.contextmanager
def quiet_tensorflow_import(min_level=None):
  """While active, the first `import tensorflow` keeps its C++ chatter out.

  TensorFlow 2.21 writes its start-up lines to file descriptor 2 before it
  reads TF_CPP_MIN_LOG_LEVEL, so only redirecting the descriptor silences
  them; lines at or above `min_level` (default: TF_CPP_MIN_LOG_LEVEL) and
  anything that is not an absl/glog record are written back once the
  import ends. Does nothing once TensorFlow is loaded.
  """
  if "tensorflow" in sys.modules:
    yield
    return
  finder = _QuietTensorFlowFinder(
    _min_log_level() if min_level is None else min_level
  )
  sys.meta_path.insert(0, finder)
  try:
    yield
  finally:
    if finder in sys.meta_path:
      sys.meta_path.remove(finder)


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
  with quiet_tensorflow_import():
    _run(main, define_flags, doc, argv, program)


def _run(main, define_flags, doc, argv, program):
  """`run` once TensorFlow's start-up chatter is taken care of."""
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
  bad_seed = _bad_seed(fv)
  if bad_seed:
    sys.stderr.write(f"{program}: usage error: {bad_seed}\n")
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
