"""The paper's section IV experiments: error against SNR with and without a prior.

For every SNR and every target image a measurement is simulated (N = 11 L,
density 0.1, K = 4) and reconstructed by each method:

  no_prior              the paper's baseline: Table I's gradient M-step, no prior
  prior                 Algorithm 1 with the score prior (Table I)
  no_prior_closed_form  the baseline with the exact M-step, run to convergence
  prior_preconditioned  Algorithm 1 with steps scaled by the exact curvature of
                        Q and the prior (`mstep.preconditioned_mstep`) instead
                        of Table I's fixed mu

All runs go through the compiled EM loop as one batch: one graph execution.
Targets are never seen by the prior: fresh draws of N(mu, I) with the
prior's mu (Gaussian) or MNIST test-split digits (MNIST). Writes
`results.json`, `error_vs_snr.png` (Figures 3-4), `reconstructions.png`
(Figure 5) and `measurements.png` (Figure 1).

  python -m mtd_tf.experiment --dataset=mnist --out_dir=out/mnist
"""

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
import typing

import numpy as np

from mtd_tf import datasets
from mtd_tf import em
from mtd_tf import io
from mtd_tf import metrics
from mtd_tf import simulate

__all__ = ["ExperimentConfig", "TABLE_I", "run_experiment", "write_results",
           "default_config"]

METHODS = ("no_prior", "prior", "no_prior_closed_form",
           "prior_preconditioned")
# The M-step and prior use of each method.
METHOD_SETUP = {
    "no_prior": ("gradient", False),
    "prior": ("gradient", True),
    "no_prior_closed_form": ("closed_form", False),
    "prior_preconditioned": ("preconditioned", True),
}

# Table I, plus the SNRs of section IV and the shipped priors.
TABLE_I = {
    "gaussian": dict(image_size=5, snrs=(1.0, 5.0, 10.0), gamma="constant:1",
                     init="uniform", prior="saved_models/gaussian_fc/1"),
    "mnist": dict(image_size=28, snrs=(0.1, 0.5, 1.0), gamma="linear",
                  init="mnist_mean", prior="saved_models/mnist_unet/1"),
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One section IV experiment.

  Attributes:
    dataset: "gaussian" or "mnist".
    snrs: the SNRs.
    trials: number of target images.
    seed: seeds targets (Gaussian), initialisations and measurements.
    prior_path: score prior SavedModel folder.
    methods: a subset of METHODS.
    options: Algorithm 1's options (Table I by default).
    size_factor: N / L.
    density: p L^2 / N^2.
    mnist_npz: MNIST file for targets beyond the shipped digits (None: the
      ten shipped test-split digits, one per class).
    digit_classes: MNIST target classes (default 0..trials-1).
  """
  dataset: str
  snrs: typing.Tuple[float, ...]
  trials: int = 10
  seed: int = 0
  prior_path: typing.Optional[str] = None
  methods: typing.Tuple[str, ...] = METHODS
  options: em.EMOptions = em.EMOptions()
  size_factor: int = 11
  density: float = 0.1
  mnist_npz: typing.Optional[str] = None
  digit_classes: typing.Optional[typing.Tuple[int, ...]] = None

  @property
  def image_size(self):
    return TABLE_I[self.dataset]["image_size"]


def default_config(dataset, **overrides):
  """Table I's configuration of `dataset`, with `overrides` applied."""
  if dataset not in TABLE_I:
    raise ValueError(f"dataset must be one of {sorted(TABLE_I)}, got "
                     f"{dataset!r}.")
  table = TABLE_I[dataset]
  options = em.EMOptions(num_rotations=4, max_iterations=100, tolerance=1e-5,
                         learning_rate=1e-3, gradient_steps=1, t_prior=0.01,
                         gamma=table["gamma"])
  fields = dict(dataset=dataset, snrs=table["snrs"],
                prior_path=table["prior"], options=options)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return ExperimentConfig(**fields)


def resolve_prior_path(path):
  """A prior folder as given, or relative to the repository root.

  The shipped priors live in `saved_models/` beside the package; this lets
  the defaults work from any working directory.
  """
  if path is None or os.path.exists(path) or os.path.isabs(path):
    return path
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidate = os.path.join(root, path)
  return candidate if os.path.exists(candidate) else path


def _targets(config, prior, rng):
  """Target images [trials, L, L] and their identifiers."""
  if config.dataset == "gaussian":
    mu = np.asarray(prior.metadata["mu"], np.float64).reshape(5, 5)
    images = mu + rng.standard_normal((config.trials, 5, 5))
    return images, list(range(config.trials))
  classes = config.digit_classes or tuple(range(config.trials))
  if len(classes) != config.trials:
    raise ValueError(f"Got {len(classes)} digit classes for "
                     f"{config.trials} trials.")
  if config.mnist_npz is None:
    if any(not 0 <= c <= 9 for c in classes) or len(set(classes)) != len(
        classes):
      raise ValueError("Without --mnist_npz the targets are the ten shipped "
                       "digits: classes must be distinct, in 0..9.")
    shipped = datasets.shipped_digits()
    return (shipped["targets"][list(classes)],
            [int(shipped["target_indices"][c]) for c in classes])
  (_, _), (x_test, y_test) = datasets.load_mnist(config.mnist_npz)
  indices, seen = [], {}
  for c in classes:
    matches = np.flatnonzero(y_test == c)
    indices.append(int(matches[seen.get(c, 0)]))
    seen[c] = seen.get(c, 0) + 1
  return x_test[indices] / 255.0, indices


def _initial(config, rng):
  if TABLE_I[config.dataset]["init"] == "mnist_mean":
    return np.broadcast_to(datasets.mnist_initialisation(),
                           (config.trials, 28, 28)).copy()
  size = config.image_size
  return rng.uniform(0.0, 1.0, (config.trials, size, size))


def _fingerprint(config, measurements):
  """Identifies an experiment's inputs, so that --resume never mixes runs."""
  digest = hashlib.sha256(repr(dataclasses.asdict(config)).encode())
  for m in measurements[::max(1, len(measurements) // 8)]:
    digest.update(np.ascontiguousarray(m[:8]).tobytes())
  return digest.hexdigest()[:16]


def _block_path(partial_dir, index):
  return os.path.join(partial_dir, f"block-{index:04d}.npz")


def _save_block(partial_dir, fingerprint, index, result):
  os.makedirs(partial_dir, exist_ok=True)
  with io.atomic_path(_block_path(partial_dir, index)) as tmp, open(
      tmp, "wb") as f:
    np.savez(f, fingerprint=fingerprint, estimates=result.estimate,
             iterations=result.iterations, seconds=result.seconds)


def _load_block(partial_dir, fingerprint, index):
  if partial_dir is None or not os.path.exists(_block_path(partial_dir,
                                                           index)):
    return None
  with np.load(_block_path(partial_dir, index)) as data:
    if str(data["fingerprint"]) != fingerprint:
      return None
    return {k: data[k] for k in ("estimates", "iterations", "seconds")}


def run_experiment(config, prior=None, log=print, block_size=None,
                   partial_dir=None, resume=False):
  """Runs every (SNR, target, method) as batched EM.

  By default all runs form one batch: one graph execution. With
  `block_size`, they run in blocks of that many runs, each saved under
  `partial_dir` when done, so that an interrupted experiment continues
  with `resume=True` from the blocks already finished.

  Args:
    config: `ExperimentConfig`.
    prior: a loaded prior (default: loaded from config.prior_path).
    log: where progress lines go.
    block_size: runs per batched execution (None: all).
    partial_dir: folder of finished blocks (None: not kept).
    resume: reuse finished blocks of the same experiment from partial_dir.

  Returns:
    (results dict as written to results.json, arrays dict with "targets",
    "estimates" [runs, L, L], "measurements" [SNRs, N, N] of target 0).
  """
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  unknown = set(config.methods) - set(METHODS)
  if unknown:
    raise ValueError(f"Unknown methods {sorted(unknown)}; use {METHODS}.")
  uses_prior = any(METHOD_SETUP[m][1] for m in config.methods)
  if prior is None and (uses_prior or config.dataset == "gaussian"):
    prior = priors.load_prior(resolve_prior_path(config.prior_path))
  if prior is not None:
    priors.check_image_size(prior, config.image_size)
  rng = np.random.default_rng(config.seed)
  targets, target_ids = _targets(config, prior, rng)
  inits = _initial(config, rng)

  runs, measurements, sigmas, run_inits, m_steps, weights = [], [], [], [], [], []
  shown = []
  for s, snr in enumerate(config.snrs):
    for t, target in enumerate(targets):
      sim = simulate.simulate_measurement(
          target, snr=snr, size_factor=config.size_factor,
          density=config.density,
          num_rotations=config.options.num_rotations,
          seed=[config.seed, s, t])
      if t == 0:
        shown.append(sim.measurement)
      for method in config.methods:
        runs.append({"snr": float(snr), "target_index": int(target_ids[t]),
                     "trial": t, "method": method})
        measurements.append(sim.measurement)
        sigmas.append(sim.sigma)
        run_inits.append(inits[t])
        m_steps.append(METHOD_SETUP[method][0])
        weights.append(1.0 if METHOD_SETUP[method][1] else 0.0)
  block = int(block_size or len(runs))
  blocks = [range(i, min(i + block, len(runs)))
            for i in range(0, len(runs), block)]
  log(f"{config.dataset}: {len(runs)} runs ({len(config.snrs)} SNRs x "
      f"{config.trials} targets x {len(config.methods)} methods), "
      f"{len(blocks)} batched EM execution(s).")
  estimates = np.zeros((len(runs), config.image_size, config.image_size))
  iterations = np.zeros(len(runs), int)
  fingerprint = _fingerprint(config, measurements)
  seconds = 0.0
  for i, indices in enumerate(blocks):
    saved = _load_block(partial_dir, fingerprint, i) if resume else None
    if saved is not None:
      estimates[indices.start:indices.stop] = saved["estimates"]
      iterations[indices.start:indices.stop] = saved["iterations"]
      seconds += float(saved["seconds"])
      log(f"block {i + 1}/{len(blocks)}: resumed from {partial_dir}")
      continue
    chosen = list(indices)
    use_prior = any(weights[j] for j in chosen)
    result = em.batched_em(
        [measurements[j] for j in chosen], config.image_size,
        [sigmas[j] for j in chosen],
        inits=np.stack([run_inits[j] for j in chosen]),
        m_steps=[m_steps[j] for j in chosen],
        prior=prior if use_prior else None,
        prior_weights=[weights[j] for j in chosen], options=config.options)
    estimates[indices.start:indices.stop] = result.estimate
    iterations[indices.start:indices.stop] = result.iterations
    seconds += result.seconds
    if partial_dir is not None:
      _save_block(partial_dir, fingerprint, i, result)
    if len(blocks) > 1:
      log(f"block {i + 1}/{len(blocks)} done in {result.seconds:.1f} s")
  result = em.EMResult(estimates, iterations, None, seconds)
  for b, run in enumerate(runs):
    run["error"] = metrics.relative_error(targets[run["trial"]],
                                          result.estimate[b],
                                          config.options.num_rotations)
    run["error_shift_aligned"] = metrics.shift_aligned_error(
        targets[run["trial"]], result.estimate[b],
        config.options.num_rotations)
    run["iterations"] = int(result.iterations[b])
    run["seconds"] = seconds / len(runs)
  summary = []
  for snr in config.snrs:
    for method in config.methods:
      rows = [r for r in runs
              if r["snr"] == float(snr) and r["method"] == method]
      errors = [r["error"] for r in rows]
      shifted = [r["error_shift_aligned"] for r in rows]
      summary.append({"snr": float(snr), "method": method,
                      "mean_error": float(np.mean(errors)),
                      "std_error": float(np.std(errors)),
                      "mean_error_shift_aligned": float(np.mean(shifted)),
                      "std_error_shift_aligned": float(np.std(shifted)),
                      "count": len(errors)})
  results = {
      "dataset": config.dataset,
      "snrs": [float(s) for s in config.snrs],
      "trials": config.trials,
      "seed": config.seed,
      "parameters": {
          **{k: (v if not callable(v) else getattr(v, "__name__", str(v)))
             for k, v in dataclasses.asdict(config.options).items()},
          "initialisation": TABLE_I[config.dataset]["init"],
          "image_size": config.image_size,
          "size_factor": config.size_factor, "density": config.density,
          "prior": config.prior_path if prior is not None else None,
          "methods": list(config.methods),
          "m_steps": {m: METHOD_SETUP[m][0] for m in config.methods},
      },
      "target_indices": [int(i) for i in target_ids],
      "runs": runs,
      "summary": summary,
      "seconds": {"em_total": seconds,
                  "executions": len(blocks),
                  "note": "runs share batched graph executions; per-run "
                          "seconds are the total divided by the number of "
                          "runs"},
      "environment": environment(),
  }
  arrays = {"targets": targets, "estimates": result.estimate,
            "measurements": np.stack(shown)}
  return results, arrays


def environment():
  """Versions and device, for results files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import mtd_tf  # pylint: disable=g-import-not-at-top
  return {"mtd_tf": mtd_tf.__version__, "tensorflow": tf.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "machine": platform.machine(),
          "device": ", ".join(d.device_type for d in
                              tf.config.list_physical_devices()) or "CPU",
          "cpu_count": os.cpu_count()}


def write_results(out_dir, results, arrays, reconstruction_snr=None):
  """Writes results.json and the three figures, each atomically.

  Returns:
    dict of the written paths.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(out_dir):
    os.makedirs(out_dir, exist_ok=True)
  paths = {}

  def save(fig, name):
    path = os.path.join(out_dir, name)
    with io.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    paths[name] = path

  labels = {"no_prior": "no prior (Table I gradient M-step)",
            "prior": "score prior (Algorithm 1, Table I)",
            "no_prior_closed_form": "no prior, exact M-step",
            "prior_preconditioned": "score prior, preconditioned M-step"}
  methods = list(dict.fromkeys(r["method"] for r in results["summary"]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, title in zip(
      axes, ("", "_shift_aligned"),
      ("error (rotations only, as in the paper)",
       "error aligned over rotations and shifts")):
    for method in methods:
      rows = [r for r in results["summary"] if r["method"] == method]
      ax.errorbar([r["snr"] for r in rows],
                  [r["mean_error" + key] for r in rows],
                  yerr=[r["std_error" + key] for r in rows], marker="o",
                  capsize=3, label=labels.get(method, method))
    ax.set_xscale("log")
    ax.set_xlabel("SNR")
    ax.set_title(f"{results['dataset']}, {results['trials']} targets: "
                 f"{title}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("mean relative error")
  axes[0].legend(fontsize=8)
  save(fig, "error_vs_snr.png")

  snr = reconstruction_snr or max(results["snrs"])
  targets = arrays["targets"]
  fig, axes = plt.subplots(1 + len(methods), len(targets),
                           figsize=(1.3 * len(targets),
                                    1.4 * (1 + len(methods))), squeeze=False)
  for t, target in enumerate(targets):
    axes[0, t].imshow(target, cmap="gray")
    for m, method in enumerate(methods):
      index = next(i for i, r in enumerate(results["runs"])
                   if r["snr"] == snr and r["trial"] == t
                   and r["method"] == method)
      shown = metrics.align(target, arrays["estimates"][index])
      axes[m + 1, t].imshow(shown, cmap="gray")
      axes[m + 1, t].set_title(f"{results['runs'][index]['error']:.2f}",
                               fontsize=7)
  axes[0, 0].set_ylabel("truth", fontsize=7)
  for m, method in enumerate(methods):
    axes[m + 1, 0].set_ylabel(method.replace("_", " "), fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Reconstructions at SNR {snr:g} (error above each)",
               fontsize=9)
  save(fig, "reconstructions.png")

  fig, axes = plt.subplots(1, len(results["snrs"]),
                           figsize=(3.2 * len(results["snrs"]), 3.4),
                           squeeze=False)
  for ax, snr_value, shown in zip(axes[0], results["snrs"],
                                  arrays["measurements"]):
    ax.imshow(shown, cmap="gray")
    ax.set_title(f"SNR {snr_value:g}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  save(fig, "measurements.png")

  path = os.path.join(out_dir, "results.json")
  with io.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(results, f, indent=1)
  paths["results.json"] = path
  return paths


def summary_table(results):
  """Mean errors as a text table: a row per SNR, a column per method.

  Each cell is the mean rotation-aligned error (the paper's), +- its
  standard deviation, then in brackets the mean rotation-and-shift aligned
  error (`metrics.shift_aligned_error`).
  """
  methods = list(dict.fromkeys(r["method"] for r in results["summary"]))
  width = max(26, max(len(m) for m in methods) + 2)
  lines = ["SNR     " + "".join(f"{m:>{width}s}" for m in methods)]
  for snr in results["snrs"]:
    cells = []
    for method in methods:
      row = next(r for r in results["summary"]
                 if r["snr"] == snr and r["method"] == method)
      cell = (f"{row['mean_error']:.3f} +- {row['std_error']:.3f} "
              f"[{row['mean_error_shift_aligned']:.3f}]")
      cells.append(f"{cell:>{width}s}")
    lines.append(f"{snr:<8g}" + "".join(cells))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# python -m mtd_tf.experiment
# ----------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("dataset", None, sorted(TABLE_I), "Which experiment.")
  flags.DEFINE_list("snrs", None, "SNRs (default: the paper's).")
  flags.DEFINE_integer("trials", 10, "Target images.")
  flags.DEFINE_integer("seed", 0, "Seed of targets, starts and measurements.")
  flags.DEFINE_string("prior", None, "Prior SavedModel (default: shipped).")
  flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
  flags.DEFINE_integer("max_iterations", 100, "T.")
  flags.DEFINE_float("learning_rate", 1e-3, "mu.")
  flags.DEFINE_integer("gradient_steps", 1, "N.")
  flags.DEFINE_string("gamma", None, "Prior weight schedule (default Table "
                      "I: constant:1 for gaussian, linear for mnist).")
  flags.DEFINE_float("t_prior", 0.01, "Diffusion time of the prior score.")
  flags.DEFINE_string("mnist_npz", None, "MNIST .npz for more targets.")
  flags.DEFINE_list("digit_classes", None, "MNIST target classes.")
  flags.DEFINE_string("out_dir", None, "Output folder.")
  flags.DEFINE_integer("progress_every", 10, "Progress line period.")
  flags.DEFINE_integer("block_size", 0,
                       "Runs per batched EM execution, each saved when done "
                       "(0: all runs in one execution).")
  flags.DEFINE_bool("resume", False,
                    "Continue an interrupted experiment from the blocks it "
                    "finished (in OUT_DIR/partial).")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mtd_tf import cli  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if fv.dataset is None or fv.out_dir is None:
    raise cli.UsageError("--dataset and --out_dir are required.")
  try:
    snrs = tuple(float(s) for s in fv.snrs) if fv.snrs else None
    classes = (tuple(int(c) for c in fv.digit_classes)
               if fv.digit_classes else None)
  except ValueError as err:
    raise cli.UsageError(f"Malformed --snrs or --digit_classes: {err}") from None
  table = TABLE_I[fv.dataset]
  options = em.EMOptions(
      max_iterations=fv.max_iterations, learning_rate=fv.learning_rate,
      gradient_steps=fv.gradient_steps, t_prior=fv.t_prior,
      gamma=fv.gamma or table["gamma"],
      progress_every=fv.progress_every).validate()
  config = default_config(
      fv.dataset, snrs=snrs, trials=fv.trials, seed=fv.seed,
      prior_path=fv.prior, methods=tuple(fv.methods), options=options,
      mnist_npz=fv.mnist_npz, digit_classes=classes)
  for snr in config.snrs:
    if not snr > 0:
      raise cli.UsageError(f"SNRs must be positive, got {snr}.")
  parent = os.path.dirname(os.path.abspath(fv.out_dir))
  if not os.path.isdir(parent):
    raise cli.UsageError(f"The parent folder of --out_dir ({parent}) does not "
                         "exist.")
  start = time.perf_counter()
  os.makedirs(fv.out_dir, exist_ok=True)
  partial_dir = os.path.join(fv.out_dir, "partial")
  results, arrays = run_experiment(config, block_size=fv.block_size or None,
                                   partial_dir=partial_dir,
                                   resume=fv.resume)
  results["seconds"]["end_to_end"] = time.perf_counter() - start
  paths = write_results(fv.out_dir, results, arrays)
  shutil.rmtree(partial_dir, ignore_errors=True)
  print(summary_table(results))
  print(f"EM {results['seconds']['em_total']:.1f} s, end to end "
        f"{results['seconds']['end_to_end']:.1f} s.")
  for path in paths.values():
    print(f"wrote {path}")


def run():
  from mtd_tf import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
