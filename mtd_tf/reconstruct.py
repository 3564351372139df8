"""`python -m mtd_tf.reconstruct`: approximate EM on measurement files.

Reads one or more measurements (.npz, .npy, .mrc; a list or glob of
micrographs that share one image), runs Algorithm 1 with or without a score
prior, prints per-iteration progress, writes the estimate, and prints the
error when the file records the true image.

  python -m mtd_tf.simulate --digit=3 --snr=10 --out=m.npz
  python -m mtd_tf.reconstruct --measurement=m.npz --image_size=28 \
      --out=estimate.npz
"""

import json
import os

import numpy as np
from absl import flags

from mtd_tf import cli
from mtd_tf import datasets
from mtd_tf import em
from mtd_tf import io
from mtd_tf import metrics
from mtd_tf import validation

flags.DEFINE_list("measurement", None,
                  "Measurement file(s) or glob(s): .npz, .npy or .mrc. "
                  "Several micrographs share one image and one sigma.")
flags.DEFINE_integer("image_size", None, "L, the image side in pixels.")
flags.DEFINE_float("sigma", None,
                   "Noise standard deviation; default: the value stored in "
                   "the (first) measurement file.")
flags.DEFINE_string(
    "init", "auto",
    "Initial estimate F(0): 'auto' (mnist_mean for L=28, else uniform), "
    "'mnist_mean' (Table I: the mean of ten training digits), 'uniform' "
    "(U[0,1], --seed), 'truth+R' (the recorded true image plus R relative "
    "noise, for checking local convergence) or a .npy file.")
flags.DEFINE_integer("seed", 0, "Seed of random initialisations.")
flags.DEFINE_enum("m_step", None, em.M_STEPS,
                  "closed_form (exact maximiser of Q) or gradient (eq. 18); "
                  "default closed_form, or gradient with --prior.")
flags.DEFINE_integer("max_iterations", 100, "T, EM iterations at most.")
flags.DEFINE_float("tolerance", 1e-5, "Stop when ||F(t+1)-F(t)||_F < this.")
flags.DEFINE_float("learning_rate", 1e-3, "mu of eq. (18).")
flags.DEFINE_integer("gradient_steps", 1, "Gradient steps per M-step.")
flags.DEFINE_integer("num_rotations", 4, "K, rotations in Phi.")
flags.DEFINE_string("prior", None,
                    "Score prior SavedModel folder, e.g. "
                    "saved_models/mnist_unet/1.")
flags.DEFINE_string("gamma", None,
                    "Prior weight schedule: linear | linear:V | constant:V; "
                    "default Table I's: linear for an MNIST prior, else "
                    "constant:1.")
flags.DEFINE_float("t_prior", None,
                   "Diffusion time of the prior score; default: the prior's "
                   "(0.01).")
flags.DEFINE_integer("chunk_size", 64, "Patches per E-step chunk.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Precision.")
flags.DEFINE_bool("crop", False,
                  "Crop measurement sides to a multiple of L instead of "
                  "stopping with an error.")
flags.DEFINE_integer("progress_every", 10,
                     "Print progress every this many iterations (0: never).")
flags.DEFINE_string("out", "estimate.npz", "Output .npz, .npy or .mrc.")

FLAGS = flags.FLAGS


def initial_estimate(spec, size, truth=None, seed=0):
  """F(0) from an --init spec (see the flag's help).

  Raises:
    UsageError: on an unknown spec or a size mismatch.
  """
  rng = np.random.default_rng(seed)
  if spec == "auto":
    spec = "mnist_mean" if size == 28 else "uniform"
  if spec == "mnist_mean":
    if size != 28:
      raise cli.UsageError("--init=mnist_mean needs --image_size=28.")
    return datasets.mnist_initialisation()
  if spec == "uniform":
    return rng.uniform(0.0, 1.0, (size, size))
  if spec.startswith("truth+"):
    if truth is None:
      raise cli.UsageError("--init=truth+R needs a measurement file that "
                           "records the true image.")
    try:
      level = float(spec[len("truth+"):])
    except ValueError:
      raise cli.UsageError(f"Malformed --init={spec}; use e.g. truth+0.3.") from None
    noise = rng.standard_normal(truth.shape)
    return truth + level * np.linalg.norm(truth) * noise / np.linalg.norm(noise)
  if spec.endswith(".npy"):
    init = np.load(spec, allow_pickle=False)
    if init.shape != (size, size):
      raise cli.UsageError(f"--init file {spec} holds shape {init.shape}; "
                           f"expected {(size, size)}.")
    return init
  raise cli.UsageError(
      f"Unknown --init={spec}: use auto, mnist_mean, uniform, truth+R or a "
      ".npy file.")


def _oracle_error(files, truth, num_rotations):
  """The oracle-alignment error over all files that record their copies."""
  if any(f.corners is None or f.rotations is None for f in files):
    return None
  if len({f.measurement.shape[1] for f in files}) != 1:
    return None
  offsets = np.cumsum([0] + [f.measurement.shape[0] for f in files[:-1]])
  corners = np.vstack([np.asarray(f.corners).reshape(-1, 2) + [offset, 0]
                       for f, offset in zip(files, offsets)])
  rotations = np.concatenate([np.ravel(f.rotations) for f in files])
  if len(corners) == 0:
    return None
  return metrics.oracle_alignment_error(
      np.vstack([f.measurement for f in files]), truth, corners, rotations,
      num_rotations)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.measurement:
    raise cli.UsageError("--measurement is required.")
  if FLAGS.image_size is None or FLAGS.image_size < 1:
    raise cli.UsageError("--image_size is required and must be >= 1.")
  size = FLAGS.image_size
  out_folder = os.path.dirname(os.path.abspath(FLAGS.out))
  if not os.path.isdir(out_folder):
    raise cli.UsageError(f"The folder of --out ({out_folder}) does not exist;"
                         " create it first.")
  files = [io.load_measurement(p) for p in io.expand_paths(FLAGS.measurement)]
  for f in files:
    validation.measurement_array(f.measurement, size, crop=FLAGS.crop,
                                 name=f"measurement {f.path}")
  first = files[0]
  sigma = FLAGS.sigma if FLAGS.sigma is not None else first.sigma
  if sigma is None:
    raise cli.UsageError(f"{first.path} records no sigma: pass --sigma.")
  truth = first.image
  if truth is not None and truth.shape != (size, size):
    truth = None
  init = initial_estimate(FLAGS.init, size, truth, FLAGS.seed)

  prior = None
  gamma = FLAGS.gamma or "constant:1"
  t_prior = FLAGS.t_prior or 0.01
  if FLAGS.prior:
    from mtd_tf import priors  # pylint: disable=g-import-not-at-top
    prior = priors.load_prior(FLAGS.prior)
    priors.check_image_size(prior, size)
    # Table I: gamma = tau / T for the MNIST prior, 1 for the Gaussian one.
    table_gamma = {"mnist": "linear", "gaussian": "constant:1"}
    gamma = FLAGS.gamma or table_gamma.get(prior.metadata.get("kind"),
                                           "constant:1")
    t_prior = FLAGS.t_prior or prior.t_prior
  m_step = FLAGS.m_step or ("gradient" if prior is not None else "closed_form")

  print(f"{len(files)} measurement(s), L={size}, sigma={sigma:.4g}, "
        f"K={FLAGS.num_rotations}, M-step={m_step}"
        + (f", prior={FLAGS.prior} (gamma {gamma}, t={t_prior})"
           if prior is not None else ", no prior"), flush=True)
  result = em.approximate_em(
      [f.measurement for f in files], size, sigma, init=init,
      num_rotations=FLAGS.num_rotations, max_iterations=FLAGS.max_iterations,
      tolerance=FLAGS.tolerance, m_step=m_step,
      learning_rate=FLAGS.learning_rate, gradient_steps=FLAGS.gradient_steps,
      prior=prior, gamma=gamma, t_prior=t_prior, chunk_size=FLAGS.chunk_size,
      dtype=FLAGS.dtype, crop=FLAGS.crop,
      progress_every=FLAGS.progress_every)
  summary = {"iterations": result.iterations, "seconds": result.seconds,
             "final_log_likelihood": float(result.log_likelihood[-1])
             if len(result.log_likelihood) else None}
  if truth is not None:
    summary["error"] = metrics.relative_error(truth, result.estimate,
                                              FLAGS.num_rotations)
    summary["initial_error"] = metrics.relative_error(truth, init,
                                                      FLAGS.num_rotations)
    floor = _oracle_error(files, truth, FLAGS.num_rotations)
    if floor is not None:
      summary["oracle_alignment_error"] = floor
  io.save_estimate(FLAGS.out, result.estimate, sigma=sigma,
                   log_likelihood=result.log_likelihood,
                   iterations=result.iterations,
                   pixel_size=first.pixel_size,
                   error=summary.get("error"))
  print(f"Wrote {FLAGS.out} after {result.iterations} iterations "
        f"({result.seconds:.2f} s).")
  if "error" in summary:
    print(f"Relative error vs the recorded true image: {summary['error']:.4f} "
          f"(initial {summary['initial_error']:.4f}"
          + (f"; the copies averaged at their true positions reach "
             f"{summary['oracle_alignment_error']:.4f}"
             if "oracle_alignment_error" in summary else "") + ").")
  print(json.dumps(summary))


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
