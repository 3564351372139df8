"""Flags of the trainer tools, generated from the config dataclasses.

`define_config_flags` defines one flag per field of a frozen config
dataclass: named after the field (or its ``flag`` metadata), typed by its
annotation (bool, int, float, str, ``int | None``, ``tuple[int, ...]`` as a
comma-separated list, an enum where the metadata gives ``choices``), with the
field's default unless the tool gives its own, and the field's help: its
``help`` metadata (`configs.option`), else its entry in the class docstring's
``Attributes:`` table (for dataclasses declared outside trainers/, such as
`mtd_tf.priors.orientation.OrientationConfig`). `config_from_flags` reads the
same fields back into the dataclass, so each option is declared once.

Only the tools import this. TensorFlow-free: their --help and --version stay
fast.
"""

import dataclasses
import inspect
import re
import types
import typing

from absl import flags

from mtd_tf import cli

_DEFINE = {
  bool: flags.DEFINE_bool,
  int: flags.DEFINE_integer,
  float: flags.DEFINE_float,
  str: flags.DEFINE_string,
}
_ENTRY = re.compile(r"^(\s+)(\w+): (.*)$")


def define_config_flags(fv: flags.FlagValues, config_class: type, **defaults):
  """Defines in fv one flag per field of the dataclass config_class.

  Args:
    fv: the tool's flag values.
    config_class: a dataclass whose fields are `configs.option`s or are
      documented in its docstring's ``Attributes:`` table.
    **defaults: the tool's defaults, by field name, where they differ from
      the dataclass's (required fields need one).

  Raises:
    TypeError: a default for no field, a required field without one, or a
      field without help.
  """
  unknown = set(defaults) - {f.name for f in dataclasses.fields(config_class)}
  if unknown:
    raise TypeError(f"{config_class.__name__} has no fields {sorted(unknown)}")
  documented = attribute_docs(config_class)
  for field in dataclasses.fields(config_class):
    default = defaults.get(field.name, field.default)
    if default is dataclasses.MISSING:
      raise TypeError(f"{config_class.__name__}.{field.name} needs a default.")
    help_text = field.metadata.get("help") or documented.get(field.name)
    if not help_text:
      raise TypeError(f"{config_class.__name__}.{field.name} has no help.")
    _define(fv, field, default, help_text)


def config_from_flags(fv: flags.FlagValues, config_class: type):
  """The frozen config_class of parsed flags (`define_config_flags`).

  Raises:
    cli.UsageError: a flag value the configuration refuses, or a list item
      that is not an integer.
  """
  values = {}
  for field in dataclasses.fields(config_class):
    name = flag_name(field)
    value = getattr(fv, name)
    if _base_type(field.type) is tuple:
      value = _integers(name, value, field.default)
    convert = field.metadata.get("from_flag")
    values[field.name] = convert(value) if convert else value
  return usage_checked(config_class, **values)


def flag_name(field: dataclasses.Field) -> str:
  """The flag of a config field: its ``flag`` metadata, else its name."""
  return field.metadata.get("flag", field.name)


def attribute_docs(config_class: type) -> dict:
  """The ``Attributes:`` table of a class docstring, name -> help sentence.

  Continuation lines are joined and the first letter capitalised, so the
  text reads as a flag's help. A class without the table gives {}.
  """
  lines = (inspect.getdoc(config_class) or "").splitlines()
  if "Attributes:" not in lines:
    return {}
  docs, name, indent = {}, None, None
  for line in lines[lines.index("Attributes:") + 1 :]:
    if not line.strip() or not line[0].isspace():
      break  # The table ends at a blank line or the next section.
    match = _ENTRY.match(line)
    if match and indent in (None, len(match.group(1))):
      indent, name = len(match.group(1)), match.group(2)
      docs[name] = match.group(3)
    elif name:
      docs[name] += " " + line.strip()
  return {k: v[:1].upper() + v[1:] for k, v in docs.items()}


def usage_checked(config_class, **kwargs):
  """config_class(**kwargs), its refusals (ValueError) turned into usage errors."""
  try:
    return config_class(**kwargs)
  except ValueError as err:
    raise cli.UsageError(str(err)) from err


def print_summary(result):
  """The final one-line summary on stdout."""
  print(
    f"step {result.step} train_loss {result.train_loss:.3g} heldout_loss "
    f"{result.heldout_loss:.3g} seconds {result.train_seconds:.3g} run "
    f"{result.run_dir} export {result.export_dir or '-'}"
  )


def _base_type(annotation):
  """int for ``int | None``, tuple for ``tuple[int, ...]``, else itself."""
  if typing.get_origin(annotation) in (types.UnionType, typing.Union):
    (annotation,) = [
      a for a in typing.get_args(annotation) if a is not type(None)
    ]
  return typing.get_origin(annotation) or annotation


def _define(fv, field, default, help_text):
  name, kind = flag_name(field), _base_type(field.type)
  if "choices" in field.metadata:
    flags.DEFINE_enum(
      name, default, list(field.metadata["choices"]), help_text, flag_values=fv
    )
  elif kind is tuple:
    flags.DEFINE_list(
      name, [str(v) for v in default], help_text, flag_values=fv
    )
  else:
    _DEFINE[kind](name, default, help_text, flag_values=fv)


def _integers(name, items, example):
  """The tuple of ints of a list flag's items; a usage error names the flag."""
  try:
    return tuple(int(item) for item in items)
  except ValueError as err:
    raise cli.UsageError(
      f"--{name}={','.join(items)}: give integers such as "
      f"{','.join(str(v) for v in example)}."
    ) from err
