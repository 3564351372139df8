"""Score priors: the `Prior` contract, its implementations, loading by name
or path, versioned export, the VP-SDE (eq. 6), score networks, sampling,
the TF Serving request contract and the orientation classifier a prior may
carry.

The names below are the public API of priors.
"""

from mtd_tf.priors.core import KERAS_FILE
from mtd_tf.priors.core import ORIENTATION_FILE
from mtd_tf.priors.core import ORIENTATION_KEY
from mtd_tf.priors.core import GaussianPrior
from mtd_tf.priors.core import Prior
from mtd_tf.priors.core import PriorError
from mtd_tf.priors.core import SavedModelPrior
from mtd_tf.priors.core import ScorePrior
from mtd_tf.priors.core import as_prior
from mtd_tf.priors.core import available
from mtd_tf.priors.core import check_image_size
from mtd_tf.priors.core import convention_of
from mtd_tf.priors.core import export_prior
from mtd_tf.priors.core import load_prior
from mtd_tf.priors.core import probe
from mtd_tf.priors.core import shipped_root

__all__ = [
  "Prior",
  "PriorError",
  "GaussianPrior",
  "ScorePrior",
  "SavedModelPrior",
  "as_prior",
  "check_image_size",
  "convention_of",
  "probe",
  "shipped_root",
  "available",
  "load_prior",
  "export_prior",
  "KERAS_FILE",
  "ORIENTATION_KEY",
  "ORIENTATION_FILE",
]
