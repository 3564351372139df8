"""Config fields that carry their own help: one declaration for a config and
the flags of every tool that exposes it.

A frozen dataclass declares a field with `option(default, help, ...)`; the
tools' flag generator (`cli.define_config_flags`, read back by
`cli.config_from_flags` or `cli.config_values`) takes the flag's type from
the field's annotation (or `kind`), its default, help and choices from the
declaration, so an option added to a config reaches the flags without being
copied by hand. A dataclass declared without `option` (plain defaults)
documents its fields in its docstring's ``Attributes:`` table instead
(`attribute_docs`).

Loads neither TensorFlow nor absl.
"""

import dataclasses
import inspect
import re

__all__ = ["option", "flag_name", "attribute_docs", "KINDS"]

# Flag kinds the generator knows; "list" is a comma-separated list whose
# items are converted to the annotation's item type (`tuple[int, ...]`).
KINDS = ("integer", "float", "string", "bool", "enum", "list")

_ENTRY = re.compile(r"^(\s+)(\w+): (.*)$")


def option(
  default,
  help,  # pylint: disable=redefined-builtin
  *,
  kind=None,
  choices=None,
  flag=None,
  from_flag=None,
):
  """A dataclass field with the metadata a command-line flag needs.

  Args:
    default: the field's default; `dataclasses.MISSING` makes the field
      required (a tool then gives the flag's default).
    help: one or two sentences: the field's documentation and its flag's
      --help.
    kind: the flag's kind, one of `KINDS`; None (usual): inferred from the
      field's annotation by the generator (bool, int, float, str, each
      optionally `| None`, and tuples of them as "list"), "enum" where
      choices are given.
    choices: an enum's values: a tuple of strings or a callable returning
      them (read when the flags are defined, so a registry can grow first).
    flag: the flag's name where it differs from the field's.
    from_flag: callable(flag value) -> field value, where the command line
      spells a value differently from the library (e.g. "none" -> "").

  Returns:
    A `dataclasses.Field`.

  Raises:
    ValueError: an unknown kind, or choices without kind "enum" (or "enum"
      without choices).
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  if choices is not None and kind not in (None, "enum"):
    raise ValueError(f"choices are for kind='enum', not {kind!r}.")
  if kind == "enum" and choices is None:
    raise ValueError("kind='enum' needs choices.")
  metadata = {
    "help": help,
    "kind": kind,
    "choices": choices,
    "flag": flag,
    "from_flag": from_flag,
  }
  return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
  """The flag of a config field: its `option(flag=...)`, else its name."""
  return field.metadata.get("flag") or field.name


def attribute_docs(cls) -> dict:
  """The ``Attributes:`` table of a class docstring, name -> help sentence.

  The help of fields declared without `option` (dataclasses kept free of
  flag details, such as `mtd_tf.priors.orientation.OrientationConfig`).
  Continuation lines are joined and the first letter capitalised, so the
  text reads as a flag's help.

  Args:
    cls: a class whose docstring may hold a Google-style ``Attributes:``
      table.

  Returns:
    {attribute name: text}; {} for a class without the table.
  """
  lines = (inspect.getdoc(cls) or "").splitlines()
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
