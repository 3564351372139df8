"""`mtd-sample-prior`: probability-flow samples of a score prior, as a PNG grid.

Draws samples from a shipped or exported prior by the probability-flow ODE
of the VP-SDE (from t = 1 down to --eps) and writes them as a square grid.

Example:
  python -m mtd_tf.sample_prior --prior=mnist_unet --out=mnist_samples.png
"""

from absl import flags

from mtd_tf import cli
from mtd_tf.base import atomic


def define_flags(fv):
  flags.DEFINE_string(
    "prior",
    "mnist_unet",
    "Shipped prior name (mnist_unet, gaussian_fc, "
    "mnist_unet/1) or an exported prior folder.",
    flag_values=fv,
  )
  flags.DEFINE_string("out", "prior_samples.png", "Output PNG.", flag_values=fv)
  flags.DEFINE_integer("num_samples", 64, "Number of samples.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise.", flag_values=fv)
  flags.DEFINE_float(
    "eps", 1e-3, "Final diffusion time, in (0, 1).", flag_values=fv
  )
  flags.DEFINE_float(
    "rtol", 1e-3, "Relative tolerance of the ODE solver.", flag_values=fv
  )
  flags.DEFINE_float(
    "atol", 1e-3, "Absolute tolerance of the ODE solver.", flag_values=fv
  )


def main(fv):
  if fv.num_samples < 1:
    raise cli.UsageError(
      f"--num_samples={fv.num_samples}: ask for at least one sample."
    )
  try:
    atomic.check_output_path(fv.out, (".png",))
  except (ValueError, OSError) as err:
    raise cli.UsageError(f"--out: {err}") from None
  # Deferred: the pipeline loads TensorFlow, which --help and the checks
  # above need not wait for.
  from mtd_tf.pipelines import prior_samples  # pylint: disable=g-import-not-at-top
  from mtd_tf.priors import sampling  # pylint: disable=g-import-not-at-top

  try:
    config = prior_samples.SampleConfig(
      prior=fv.prior,
      out=fv.out,
      num_samples=fv.num_samples,
      seed=fv.seed,
      eps=fv.eps,
      rtol=fv.rtol,
      atol=fv.atol,
    )
  except sampling.SamplingError as err:
    raise cli.UsageError(str(err)) from err
  try:
    result = prior_samples.sample_grid(config)
  except sampling.SamplingError as err:
    # Raised before any sampling: too many samples for the prior's size,
    # or a prior the ODE cannot sample.
    raise cli.UsageError(str(err)) from err
  print(
    f"Wrote {result.num_samples} samples to {result.path} "
    f"({result.evaluations} score evaluations)."
  )


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
