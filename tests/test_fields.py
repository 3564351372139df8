"""The one declaration of config fields (`base.fields.option`) and the one
flag generator (`cli.define_config_flags`, `cli.config_from_flags`,
`cli.config_values`) every tool uses."""

import dataclasses
import subprocess
import sys
import typing

from absl import flags
import pytest

from mtd_tf import cli
from mtd_tf.base import fields
from mtd_tf.base.fields import option
from mtd_tf.em import options

# A registry that grows after the config is declared.
_SOLVERS = ["fast", "exact"]


def _no_zero(value):
  return None if value == "0" else value


@dataclasses.dataclass(frozen=True)
class _Config:
  """A config of every kind of flag.

  Attributes:
    documented: a field declared without `option`, documented
      here over two lines.
  """

  name: str = option(dataclasses.MISSING, "The name.")
  count: int = option(3, "How many.")
  rate: float = option(0.5, "How fast.")
  verbose: bool = option(False, "Say more.")
  limit: int | None = option(None, "At most this many.")
  sizes: tuple[int, ...] = option((1, 2), "Sizes.")
  scales: typing.Tuple[float, ...] = option((0.5,), "Scales.")
  solver: str = option("fast", "Solver.", choices=lambda: tuple(_SOLVERS))
  version: int | None = option(None, "The version.", flag="export_version")
  tag: str = option("", "A tag ('0': none).", from_flag=_no_zero)
  spec: typing.Any = option("a", "A spec of any type.", kind="string")
  documented: int = 7

  def __post_init__(self):
    if self.count < 0:
      raise ValueError(f"count={self.count} must be >= 0.")


def _define(cls=_Config, *argv, **kwargs):
  fv = flags.FlagValues()
  cli.define_config_flags(fv, cls, **kwargs)
  fv(["tool", *argv])
  return fv


def _all(*argv):
  return _define(_Config, *argv, defaults={"name": "n"})


def test_option_refuses_inconsistent_kinds():
  with pytest.raises(ValueError, match="kind must be one of"):
    option(1, "x", kind="int")
  with pytest.raises(ValueError, match="choices are for kind='enum'"):
    option("a", "x", kind="string", choices=("a",))
  with pytest.raises(ValueError, match="needs choices"):
    option("a", "x", kind="enum")


def test_option_keeps_the_explicit_kind_form():
  field = dataclasses.fields(options.EMOptions)[0]
  assert field.metadata["kind"] == "integer"
  assert field.metadata["help"] and field.metadata["flag"] is None


def test_flag_kinds_come_from_the_annotations():
  fv = _all()
  kinds = {
    "name": "string",
    "count": "int",
    "rate": "float",
    "verbose": "bool",
    "limit": "int",
    "sizes": "comma separated list of strings",
    "scales": "comma separated list of strings",
    "solver": "string enum",
    "export_version": "int",
    "tag": "string",
    "spec": "string",
    "documented": "int",
  }
  assert {name: fv[name].flag_type() for name in kinds} == kinds
  assert fv["count"].default == 3 and fv["limit"].default is None
  assert fv["count"].help == "How many."
  assert cli.config_from_flags(fv, _Config) == _Config(name="n")


def test_parsed_values_reach_the_config():
  fv = _all(
    "--count=4",
    "--rate=0.25",
    "--verbose",
    "--limit=9",
    "--sizes=4,5,6",
    "--scales=0.1,2",
    "--spec=b",
  )
  assert cli.config_from_flags(fv, _Config) == _Config(
    name="n",
    count=4,
    rate=0.25,
    verbose=True,
    limit=9,
    sizes=(4, 5, 6),
    scales=(0.1, 2.0),
    spec="b",
  )


def test_list_flags_hold_strings_and_give_tuples_of_their_item_type():
  fv = _all("--sizes=8,16")
  assert fv["sizes"].default == ["1", "2"]
  assert fv["scales"].default == ["0.5"]
  assert cli.config_from_flags(fv, _Config).sizes == (8, 16)


def test_a_bad_list_item_is_a_usage_error_in_one_line():
  fv = _all("--sizes=8,x")
  with pytest.raises(cli.UsageError, match=r"--sizes=8,x: give integers such "):
    cli.config_from_flags(fv, _Config)
  with pytest.raises(cli.UsageError, match="--sizes=8,x: give integers"):
    cli.config_values(fv, _Config, ["sizes"])
  with pytest.raises(cli.UsageError, match="--scales=y: give numbers such as"):
    cli.config_from_flags(_all("--scales=y"), _Config)


def test_a_renamed_flag_fills_its_field():
  fv = _all("--export_version=3")
  assert "version" not in fv
  assert fv["export_version"].help == "The version."
  assert cli.config_from_flags(fv, _Config).version == 3
  assert cli.config_values(fv, _Config, ["version"]) == {"version": 3}


def test_from_flag_converts_the_flag_value():
  assert cli.config_from_flags(_all("--tag=0"), _Config).tag is None
  assert cli.config_from_flags(_all("--tag=x"), _Config).tag == "x"


def test_choices_from_a_callable_are_read_when_the_flags_are_defined():
  _SOLVERS.append("late")
  try:
    fv = _all("--solver=late")
    assert fv["solver"].parser.enum_values == ["fast", "exact", "late"]
    assert cli.config_from_flags(fv, _Config).solver == "late"
  finally:
    _SOLVERS.remove("late")
  with pytest.raises(flags.IllegalFlagValueError):
    _all("--solver=late")


def test_help_falls_back_to_the_docstring_table():
  assert fields.attribute_docs(_Config) == {
    "documented": (
      "A field declared without `option`, documented here over two lines."
    )
  }
  assert (
    _all()["documented"].help == fields.attribute_docs(_Config)["documented"]
  )


def test_a_subset_with_tool_defaults_and_help_gives_overrides():
  names = ("m_step", "max_iterations", "gamma", "progress_every")
  fv = _define(
    options.EMOptions,
    "--max_iterations=5",
    names=names,
    defaults={"m_step": None, "gamma": None, "progress_every": 10},
    helps={"gamma": "Default: the tool's."},
  )
  assert sorted(fv) == sorted(names)  # Only the named fields.
  assert fv["m_step"].default is None
  assert fv["progress_every"].default == 10
  assert fv["gamma"].help.endswith(" Default: the tool's.")
  assert fv["gamma"].help.startswith("Prior weight schedule")
  # Only the flags holding a value, by field name: overrides of the library.
  assert cli.config_values(fv, options.EMOptions, names) == {
    "max_iterations": 5,
    "progress_every": 10,
  }
  replaced = dataclasses.replace(
    options.EMOptions(), **cli.config_values(fv, options.EMOptions, names)
  )
  assert (replaced.max_iterations, replaced.m_step) == (5, "closed_form")


def test_a_subset_read_as_a_config_keeps_the_other_defaults():
  fv = _define(
    _Config, "--count=2", names=["name", "count"], defaults={"name": "n"}
  )
  assert sorted(fv) == ["count", "name"]
  config = cli.config_from_flags(fv, _Config, ["name", "count"])
  assert config == _Config(name="n", count=2)


def test_a_value_the_config_refuses_is_a_usage_error():
  with pytest.raises(cli.UsageError, match="count=-1 must be >= 0"):
    cli.config_from_flags(_all("--count=-1"), _Config)


def test_mistakes_in_a_declaration_or_a_tool_fail_loudly():
  with pytest.raises(TypeError, match="_Config.name is required"):
    _define(_Config)
  with pytest.raises(TypeError, match="defaults for no flag"):
    _define(_Config, defaults={"name": "n", "nothing": 1})
  with pytest.raises(TypeError, match="helps for no flag"):
    _define(_Config, names=["count"], helps={"rate": "x"})
  with pytest.raises(TypeError, match="has no fields"):
    _define(_Config, names=["nothing"])

  @dataclasses.dataclass
  class Undocumented:
    value: int = 1

  with pytest.raises(TypeError, match="Undocumented.value has no help"):
    _define(Undocumented)

  @dataclasses.dataclass
  class Untyped:
    value: typing.Union[bool, str] = option(False, "Either.")

  with pytest.raises(TypeError, match="no flag kind"):
    _define(Untyped)


def test_the_declaration_and_the_generator_load_no_tensorflow():
  code = (
    "import sys\n"
    "from mtd_tf.base import fields\n"
    "assert 'absl' not in sys.modules, 'absl loaded'\n"
    "from absl import flags\n"
    "from mtd_tf import cli\n"
    "from mtd_tf.em import options\n"
    "cli.define_config_flags(flags.FlagValues(), options.EMOptions,\n"
    "                        ['m_step', 'gamma', 'dtype'])\n"
    "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
