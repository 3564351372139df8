"""mtd_tf: multi-target detection with approximate EM and score-based priors.

Implements Zabatani, Kreymer and Bendory, "Score-based diffusion priors for
multi-target detection": the MTD measurement model (eq. 1-2), the approximate
EM of Kreymer, Singer and Bendory (eq. 9-16) and its score-prior M-step
(Algorithm 1, eq. 17-18). Definitions shared by code, tests and docs:
docs/conventions.md.

Importing the package changes nothing in the process (no flags, no
environment variables) and loads TensorFlow only when a numerical entry
point below is first used.
"""

from mtd_tf.base import lazy

__version__ = "0.2.0"

# The modules a user reaches first, by their short names (loaded on first
# use): `from mtd_tf import datasets, metrics, simulation`.
_MODULES = {
  "datasets": "mtd_tf.model.datasets",
  "metrics": "mtd_tf.model.metrics",
  "simulation": "mtd_tf.model.simulation",
}

# Entry point name -> the module that defines it (loaded on first use).
_ENTRY_POINTS = {
  "approximate_em": "mtd_tf.em",
  "batched_em": "mtd_tf.em",
  "EMOptions": "mtd_tf.em",
  "posterior_weights": "mtd_tf.em.estep",
  "relative_error": "mtd_tf.model.metrics",
  "extract_patches": "mtd_tf.model.patches",
  "simulate_measurement": "mtd_tf.model.simulation",
  "load_prior": "mtd_tf.priors",
  "estimate_sigma": "mtd_tf.model.noise",
  "multistart_em": "mtd_tf.recovery",
}

__all__ = sorted(_ENTRY_POINTS) + sorted(_MODULES) + ["__version__"]


# mtd_tf.base.lazy imports only the standard library.
__getattr__, __dir__ = lazy.package_api(
  "mtd_tf",
  {name: module[len("mtd_tf.") :] for name, module in _ENTRY_POINTS.items()},
  _MODULES,
)
