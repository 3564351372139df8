"""Config fields that carry their own help: one declaration for a library
config and the flags of every tool that exposes it.

A frozen dataclass declares a field with `option(default, help, ...)`; the
tools' `cli.define_config_flags` reads the type, default, help and choices
from it, so an option added to a config reaches the flags without being
copied by hand.
"""

import dataclasses
import typing

__all__ = ["option", "flag_fields"]

# Flag kinds `cli.define_config_flags` knows.
KINDS = ("integer", "float", "string", "bool", "enum")


def option(default, help, *, kind, choices=None):  # pylint: disable=redefined-builtin
  """A dataclass field with the metadata a command-line flag needs.

  Args:
    default: the field's default.
    help: one or two sentences for --help.
    kind: "integer", "float", "string", "bool" or "enum".
    choices: for "enum", a tuple of strings or a callable returning one
      (read when the flags are defined, so a registry can grow first).

  Returns:
    A `dataclasses.field`.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  if (kind == "enum") != (choices is not None):
    raise ValueError("Give choices exactly for kind='enum'.")
  return dataclasses.field(
    default=default,
    metadata={"help": help, "kind": kind, "choices": choices},
  )


def flag_fields(cls) -> typing.Dict[str, dataclasses.Field]:
  """The fields of a config dataclass declared with `option`, by name."""
  return {f.name: f for f in dataclasses.fields(cls) if "kind" in f.metadata}
