"""Reliable recovery on top of EM: start families, pruning and selection
(`starts`), the data set's gauge (`gauge`), the recommended method
(`recommended.multistart_em`) and the registry of methods that experiments
and reconstructions share (`methods`).

The names below are the public API of recovery; they load on first use, so
that the methods registry (which tools read to define their flags) comes
without TensorFlow.
"""

import importlib

# Public name -> the submodule that defines it.
_API = {
  "RecoveryOptions": "recommended",
  "MultiStartResult": "recommended",
  "multistart_em": "recommended",
  "log_prior_differences": "recommended",
  "make_starts": "recommended",
  "recommended_options": "recommended",
  "RECOMMENDED_ITERATIONS": "recommended",
  "RECOMMENDED_T_SCHEDULE": "recommended",
  "RECOMMENDED_GRIDS_PER_AXIS": "recommended",
  "RECOMMENDED_DENSE_GRID_WEIGHT": "recommended",
  "Method": "methods",
  "METHODS": "methods",
  "register_method": "methods",
}

__all__ = sorted(_API)


def __getattr__(name):
  module = _API.get(name)
  if module is not None:
    return getattr(importlib.import_module(f"mtd_tf.recovery.{module}"), name)
  try:  # A submodule not imported yet.
    return importlib.import_module(f"mtd_tf.recovery.{name}")
  except ModuleNotFoundError as err:
    if err.name != f"mtd_tf.recovery.{name}":
      raise  # the submodule exists but misses a dependency
    raise AttributeError(
      f"module 'mtd_tf.recovery' has no attribute {name!r}"
    ) from None


def __dir__():
  return sorted(list(globals()) + list(_API))
