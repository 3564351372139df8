"""Approximate EM for MTD (Algorithm 1) and everything it runs on.

The E-step (eq. 14-16, `estep`), the M-steps and their registry (eq. 16-18,
`mstep`), options (`options`), the compiled loop (`problem`, `loop`, `runner`, `front_ends`), the
accelerators (`acceleration`, `accelerated`), streamed micrographs
(`streaming`) and `tf.distribute` workers (`distributed`).

The names below are EM's public API.
"""

from mtd_tf.em.accelerated import auto_accelerator
from mtd_tf.em.accelerated import uses_acceleration
from mtd_tf.em.front_ends import approximate_em
from mtd_tf.em.front_ends import batched_em
from mtd_tf.em.front_ends import collect_patches
from mtd_tf.em.front_ends import prepared_em_map
from mtd_tf.em.front_ends import run_prepared
from mtd_tf.em.front_ends import run_streaming
from mtd_tf.em.loop import LoopSpec
from mtd_tf.em.loop import build_em_loop
from mtd_tf.em.mstep import M_STEPS
from mtd_tf.em.mstep import register_m_step
from mtd_tf.em.options import EMOptions
from mtd_tf.em.options import gamma_schedule
from mtd_tf.em.problem import EMDivergedError
from mtd_tf.em.problem import EMResult
from mtd_tf.em.problem import ProblemBatch
from mtd_tf.em.problem import resolved_streams
from mtd_tf.em.runner import run_loop

__all__ = [
  "EMOptions",
  "EMResult",
  "EMDivergedError",
  "ProblemBatch",
  "gamma_schedule",
  "approximate_em",
  "batched_em",
  "run_prepared",
  "run_streaming",
  "run_loop",
  "build_em_loop",
  "collect_patches",
  "resolved_streams",
  "uses_acceleration",
  "auto_accelerator",
  "M_STEPS",
  "register_m_step",
  "LoopSpec",
  "prepared_em_map",
]
