"""Approximate EM for MTD (Algorithm 1) and everything it runs on.

The E-step (eq. 14-16, `estep`), the M-steps (eq. 16-18, `mstep`) and their
registry (`registry`), options (`options`), a batch of problems and its
checks (`problem`), the compiled loop (`loop`) and its runner (`runner`),
the front ends (`front_ends`), the accelerators (`acceleration`,
`accelerated`), streamed micrographs (`streaming`, over the spectra
store `spectra_store` with `micrograph_spectra` and `spill_files`; the
chunk-over-streams loop `chunk_streams`) and `tf.distribute` workers
(`distributed`).

The names below are EM's public API. They load on first use, so that the
options and the registry (which tools read to define their flags) come
without TensorFlow.
"""

from mtd_tf.base import lazy

# Public name -> the submodule that defines it.
_API = {
  "EMOptions": "options",
  "gamma_schedule": "options",
  "chunk_size_for": "options",
  "M_STEPS": "registry",
  "register_m_step": "registry",
  "EMResult": "problem",
  "EMDivergedError": "problem",
  "ProblemBatch": "problem",
  "resolved_streams": "problem",
  "LoopSpec": "loop",
  "build_em_loop": "loop",
  "run_loop": "runner",
  "approximate_em": "front_ends",
  "batched_em": "front_ends",
  "run_prepared": "front_ends",
  "run_streaming": "front_ends",
  "collect_patches": "front_ends",
  "prepared_em_map": "front_ends",
  "uses_acceleration": "accelerated",
  "auto_accelerator": "accelerated",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy.package_api("mtd_tf.em", _API)
