"""mtd_tf: multi-target detection with approximate EM and score-based priors.

Implements Zabatani, Kreymer and Bendory, "Score-based diffusion priors for
multi-target detection": the MTD measurement model (eq. 1-2), the approximate
EM of Kreymer, Singer and Bendory (eq. 9-16) and its score-prior M-step
(Algorithm 1, eq. 17-18).
"""

__version__ = "0.1.0"

import os as _os

# Quieter TensorFlow start-up unless the user asked otherwise.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The most used entry points, at the top level.
from mtd_tf.em import approximate_em  # noqa: E402
from mtd_tf.em import batched_em  # noqa: E402
from mtd_tf.estep import posterior_weights  # noqa: E402
from mtd_tf.metrics import relative_error  # noqa: E402
from mtd_tf.patches import extract_patches  # noqa: E402
from mtd_tf.simulate import simulate_measurement  # noqa: E402

__all__ = ["approximate_em", "batched_em", "posterior_weights",
           "relative_error", "extract_patches", "simulate_measurement"]
