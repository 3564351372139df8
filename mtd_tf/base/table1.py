"""Table I of the paper and the section IV settings: one home for each constant.

Every tool, the experiments and the tests read these; nothing else restates
them. TensorFlow-free so that command-line tools can use them as flag
defaults without loading TensorFlow. See docs/conventions.md.
"""

import types

# Diffusion time at which the M-step evaluates a prior's score (eq. 18).
T_PRIOR = 0.01

# Algorithm 1's defaults shared by both data sets.
MAX_ITERATIONS = 100  # T
GRADIENT_STEPS = 1  # gradient steps per M-step
LEARNING_RATE = 1e-3  # mu of eq. (18)
TOLERANCE = 1e-5  # stop when ||F(tau+1) - F(tau)||_F < this
NUM_ROTATIONS = 4  # K

# Section IV's simulated measurements.
SIZE_FACTOR = 11  # N / L
DENSITY = 0.1  # p L^2 / N^2

# VP-SDE of eq. (6): beta(t) = beta_min + (beta_max - beta_min) t.
BETA_MIN = 0.1
BETA_MAX = 20.0

# The two experiments: image size, SNRs, gamma(tau), F(0), shipped prior
# (by name, see `mtd_tf.priors.load_prior`). The keys are the data kinds;
# what else depends on a kind (convention, curvature, clip range) is
# `mtd_tf.priors.kinds`, which reads this table.
DATASETS = types.MappingProxyType(
  {
    "gaussian": types.MappingProxyType(
      dict(
        image_size=5,
        snrs=(1.0, 5.0, 10.0),
        gamma="constant:1",
        init="uniform",
        prior="gaussian_fc",
      )
    ),
    "mnist": types.MappingProxyType(
      dict(
        image_size=28,
        snrs=(0.1, 0.5, 1.0),
        gamma="linear",
        init="mnist_mean",
        prior="mnist_unet",
      )
    ),
  }
)


def gamma_for(kind):
  """Table I's prior weight schedule gamma(tau) for a prior's data kind.

  Args:
    kind: a prior's `kind` ("gaussian", "mnist"); anything else gets the
      constant weight 1.

  Returns:
    A schedule string for `em.gamma_schedule`.
  """
  entry = DATASETS.get(kind)
  return entry["gamma"] if entry is not None else "constant:1"
