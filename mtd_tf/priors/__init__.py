"""Score priors: the `Prior` contract, its implementations, loading by name
or path, versioned export, the VP-SDE (eq. 6), score networks, sampling,
the TF Serving request contract and the orientation classifier a prior may
carry.

Modules, by idea:

* protocol: the `Prior` contract of the M-step (eq. 17-18), `PriorError`,
  `as_prior`, `check_image_size`.
* kinds: data kinds ("gaussian", "mnist"): convention, curvature, clip
  range, Table I's entry (`convention_of`).
* gaussian, score, saved_model: `GaussianPrior` (exact N(mu, I)),
  `ScorePrior` (any score function), `SavedModelPrior` (an exported
  network).
* layout: the folder of an exported prior, prior.json and signature checks.
* loading: shipped priors, the prior-class registry, `probe`, `load_prior`.
* export: `export_prior`.
* sde, networks, sampling, serving_requests, orientation: the VP-SDE, the
  score networks, probability-flow samples, TF Serving requests and the
  orientation classifier.

The names below are the public API of priors.
"""

from mtd_tf.priors.export import export_prior
from mtd_tf.priors.gaussian import GaussianPrior
from mtd_tf.priors.kinds import convention_of
from mtd_tf.priors.layout import KERAS_FILE
from mtd_tf.priors.layout import ORIENTATION_FILE
from mtd_tf.priors.layout import ORIENTATION_KEY
from mtd_tf.priors.loading import available
from mtd_tf.priors.loading import load_prior
from mtd_tf.priors.loading import probe
from mtd_tf.priors.loading import register_prior_class
from mtd_tf.priors.loading import shipped_root
from mtd_tf.priors.protocol import Prior
from mtd_tf.priors.protocol import PriorError
from mtd_tf.priors.protocol import as_prior
from mtd_tf.priors.protocol import check_image_size
from mtd_tf.priors.saved_model import SavedModelPrior
from mtd_tf.priors.score import ScorePrior

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
  "register_prior_class",
  "export_prior",
  "KERAS_FILE",
  "ORIENTATION_KEY",
  "ORIENTATION_FILE",
]
