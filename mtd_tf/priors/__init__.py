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

The names below are the public API of priors. They load on first use, so
that a module of this floor that needs no TensorFlow (kinds, orientation's
config) comes without it.
"""

from mtd_tf.base import lazy

# Public name -> the submodule that defines it.
_API = {
  "export_prior": "export",
  "GaussianPrior": "gaussian",
  "convention_of": "kinds",
  "KERAS_FILE": "layout",
  "ORIENTATION_FILE": "layout",
  "ORIENTATION_KEY": "layout",
  "available": "loading",
  "load_prior": "loading",
  "probe": "loading",
  "register_prior_class": "loading",
  "shipped_root": "loading",
  "Prior": "protocol",
  "PriorError": "protocol",
  "as_prior": "protocol",
  "check_image_size": "protocol",
  "SavedModelPrior": "saved_model",
  "ScorePrior": "score",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy.package_api("mtd_tf.priors", _API)
