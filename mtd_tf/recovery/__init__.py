"""Reliable recovery on top of EM: start families, pruning and selection
(`starts`), the data set's gauge (`gauge`), the recommended method
(`recommended.multistart_em`) and the registry of methods that experiments
and reconstructions share (`methods`).

The names below are the recommended method's public API.
"""

from mtd_tf.recovery.recommended import RECOMMENDED_DENSE_GRID_WEIGHT
from mtd_tf.recovery.recommended import RECOMMENDED_GRIDS_PER_AXIS
from mtd_tf.recovery.recommended import RECOMMENDED_ITERATIONS
from mtd_tf.recovery.recommended import RECOMMENDED_T_SCHEDULE
from mtd_tf.recovery.recommended import MultiStartResult
from mtd_tf.recovery.recommended import RecoveryOptions
from mtd_tf.recovery.recommended import log_prior_differences
from mtd_tf.recovery.recommended import make_starts
from mtd_tf.recovery.recommended import multistart_em
from mtd_tf.recovery.recommended import recommended_options

__all__ = [
  "RecoveryOptions",
  "MultiStartResult",
  "multistart_em",
  "log_prior_differences",
  "make_starts",
  "recommended_options",
  "RECOMMENDED_ITERATIONS",
  "RECOMMENDED_T_SCHEDULE",
  "RECOMMENDED_GRIDS_PER_AXIS",
  "RECOMMENDED_DENSE_GRID_WEIGHT",
]
