"""Reliable recovery on top of EM: start families, pruning and selection
(`starts`), the data set's gauge (`gauge`), the recommended method
(`recommended.multistart_em`), the registry of methods that experiments
and reconstructions share (`methods`) and the gain between a
measurement's units and a prior's (`units`).

The names below are the public API of recovery; they load on first use, so
that the methods registry (which tools read to define their flags) comes
without TensorFlow.
"""

from mtd_tf.base import lazy

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
  "estimate_gain": "units",
  "GainEstimate": "units",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy.package_api("mtd_tf.recovery", _API)
