"""Speed and memory of one EM iteration, with baselines: the benchmark library.

For each preset (a measurement size) `run_preset` measures, in one process
and on one machine:

  compile_s            first call minus a steady-state call
  iteration_s_*        seconds per EM iteration (median, min, max over
                       repetitions, after warm-up)
  fft_floor_s          seconds of just the FFTs that any FFT-based E-step must
                       do per iteration (D K inverse transforms for the
                       correlations, D K forward transforms for S1), the
                       fastest of TensorFlow eager, XLA and scipy.fft with
                       all cores
  naive_iteration_s    a direct numpy computation of the same posterior
                       weights and grad Q, patch by patch and shift by shift
                       as the paper's published code does, timed on a few
                       patches and scaled to all of them
  peak_rss_mb          peak resident memory of the preset's own process

`run_isolated` runs each preset in its own subprocess (`mtd-bench --worker`)
so that its peak memory is its own, and `table` formats the records.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import logging
import numpy as np

__all__ = ["PRESETS", "naive_iteration_seconds", "fft_floor_seconds",
           "run_preset", "run_isolated", "table", "check_settings",
           "RECORD_PREFIX", "BenchmarkError"]

RECORD_PREFIX = "BENCH_RECORD "


class BenchmarkError(ValueError):
  """Benchmark settings that make no sense, with what to change."""


PRESETS = {
    "paper-gaussian": dict(image_size=5, shape=(55, 55), num_rotations=4),
    "paper-mnist": dict(image_size=28, shape=(308, 308), num_rotations=4),
    "micrograph": dict(image_size=28, shape=(4088, 4088), num_rotations=4),
    "micrograph-k3": dict(image_size=28, shape=(5740, 4088), num_rotations=4),
}


def _median_spread(samples):
  return float(np.median(samples)), float(np.min(samples)), float(
      np.max(samples))


def naive_iteration_seconds(patch_set, image, sigma, num_rotations,
                            max_patches=2):
  """Seconds per EM iteration of a direct numpy E-step and grad Q.

  For each patch, each shift l and rotation k: build C T_l Z R_k F by
  rolling the zero-padded rotated image, take the residual norm (eq. 15),
  normalise, then accumulate grad Q (eq. 16) shift by shift. Timed on
  `max_patches` patches and scaled to all of them.
  """
  size = image.shape[0]
  rotated = [np.rot90(image, 4 * k // num_rotations) if 4 % num_rotations == 0
             else image for k in range(num_rotations)]
  padded = []
  for g in rotated:
    z = np.zeros((2 * size, 2 * size))
    z[:size, :size] = g
    padded.append(z)
  count = min(max_patches, len(patch_set))
  start = time.perf_counter()
  grad = np.zeros((2 * size, 2 * size))
  for patch in patch_set[:count]:
    logl = np.empty((2 * size, 2 * size, num_rotations))
    for lx in range(2 * size):
      for ly in range(2 * size):
        for k, z in enumerate(padded):
          view = np.roll(z, (-lx, -ly), axis=(0, 1))[:size, :size]
          logl[lx, ly, k] = -np.sum((patch - view)**2) / (2 * sigma**2)
    weights = np.exp(logl - logl.max())
    weights /= weights.sum()
    for lx in range(2 * size):
      for ly in range(2 * size):
        for k, z in enumerate(padded):
          w = weights[lx, ly, k]
          view = np.roll(z, (-lx, -ly), axis=(0, 1))[:size, :size]
          residual = np.zeros((2 * size, 2 * size))
          residual[:size, :size] = w * (patch - view) / sigma**2
          grad += np.roll(residual, (lx, ly), axis=(0, 1))
  per_patch = (time.perf_counter() - start) / count
  return per_patch * len(patch_set)


def fft_floor_seconds(num_patches, image_size, num_rotations, repeats=3,
                      chunk=256):
  """Fastest way found to do one iteration's unavoidable FFTs.

  Returns:
    (seconds, {"tf_eager": s, "tf_xla": s, "scipy": s}).
  """
  import scipy.fft  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = 2 * image_size
  batch = min(chunk, num_patches)
  rounds = -(-num_patches // batch)
  rng = np.random.default_rng(0)
  real = rng.standard_normal((batch, num_rotations, n, n)).astype(np.float32)
  spectra = np.fft.rfft2(real).astype(np.complex64)

  def timed(fn):
    fn()
    samples = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      samples.append(time.perf_counter() - start)
    return min(samples)

  tf_real = tf.constant(real)
  tf_spec = tf.constant(spectra)

  def eager():
    for _ in range(rounds):
      tf.signal.irfft2d(tf_spec, fft_length=[n, n]).numpy()
      tf.signal.rfft2d(tf_real).numpy()

  @tf.function(jit_compile=True)
  def xla_pair(spec, real_in):
    return (tf.reduce_sum(tf.signal.irfft2d(spec, fft_length=[n, n])),
            tf.reduce_sum(tf.abs(tf.signal.rfft2d(real_in))))

  def xla():
    for _ in range(rounds):
      [t.numpy() for t in xla_pair(tf_spec, tf_real)]

  workers = os.cpu_count() or 1

  def scipy_fft():
    for _ in range(rounds):
      scipy.fft.irfft2(spectra, s=(n, n), workers=workers)
      scipy.fft.rfft2(real, workers=workers)

  parts = {"tf_eager": timed(eager), "tf_xla": timed(xla),
           "scipy": timed(scipy_fft)}
  scale = num_patches / (rounds * batch)
  parts = {k: v * scale for k, v in parts.items()}
  return min(parts.values()), parts


def check_settings(names, repeats, num_streams, chunk_size):
  """Refuses unknown presets or non-positive counts, before any work."""
  unknown = [n for n in names if n not in PRESETS]
  if unknown:
    raise BenchmarkError(f"Unknown presets {unknown}: use {sorted(PRESETS)}.")
  if int(repeats) < 1:
    raise BenchmarkError(f"repeats must be >= 1, got {repeats}.")
  if num_streams is not None and int(num_streams) < 1:
    raise BenchmarkError(f"num_streams must be >= 1, got {num_streams}.")
  if int(chunk_size) < 1:
    raise BenchmarkError(f"chunk_size must be >= 1, got {chunk_size}.")


def _em_seconds(data, sigma, init, options, iterations):
  """Seconds of `iterations` EM iterations on prepared patch spectra."""
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  batch = em.ProblemBatch(sigmas=sigma, inits=init, m_steps=["closed_form"],
                          prior_weights=[0.0])
  result = em.run_prepared(data, batch, None, options,
                           max_iterations=iterations)
  return result.seconds


def run_preset(name, repeats=5, num_streams=None, chunk_size=64):
  """Measures one preset in this process; returns its JSON record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtd_tf import datasets  # pylint: disable=g-import-not-at-top
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf import patches  # pylint: disable=g-import-not-at-top
  from mtd_tf import provenance  # pylint: disable=g-import-not-at-top
  from mtd_tf import simulation  # pylint: disable=g-import-not-at-top
  check_settings([name], repeats, num_streams, chunk_size)
  preset = PRESETS[name]
  size = preset["image_size"]
  num_rotations = preset["num_rotations"]
  if size == 28:
    image = datasets.shipped_digits()["targets"][3]
  else:
    image = np.random.default_rng(0).uniform(0, 1, (size, size))
  sim = simulation.simulate_measurement(image, snr=1.0, seed=0,
                                        measurement_shape=preset["shape"],
                                        num_rotations=num_rotations)
  patch_set = patches.extract_patches(sim.measurement, size)
  streams = num_streams or em.resolved_streams(em.EMOptions())
  options = em.EMOptions(num_rotations=num_rotations, tolerance=0.0,
                         chunk_size=chunk_size, num_streams=streams)
  data = patches.patch_spectra(
      [patch_set], patches.balanced_chunk_size(len(patch_set), chunk_size,
                                               streams), tf.float32)
  del sim  # Only the patches' spectra are needed from here on.
  init = image[None] + 0.1
  sigma = [float(np.linalg.norm(image) / size)]

  first = _em_seconds(data, sigma, init, options, 1)
  iterations = 3 if len(patch_set) > 5000 else 20
  samples = [_em_seconds(data, sigma, init, options, iterations) / iterations
             for _ in range(repeats)]
  median, low, high = _median_spread(samples)
  floor, floor_parts = fft_floor_seconds(len(patch_set), size, num_rotations)
  naive = naive_iteration_seconds(patch_set, image, sigma[0], num_rotations)
  return {
      "preset": name, "L": size, "shape": list(preset["shape"]),
      "K": num_rotations, "dtype": "float32", "patches": len(patch_set),
      "chunk_size": chunk_size, "num_streams": streams,
      "compile_s": max(first - median, 0.0),
      "iteration_s_median": median, "iteration_s_min": low,
      "iteration_s_max": high,
      "seconds_per_patch": median / len(patch_set),
      "fft_floor_s": floor, "fft_floor_parts_s": floor_parts,
      "naive_iteration_s": naive,
      "speedup_vs_naive": naive / median,
      "ratio_to_floor": median / floor,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "environment": provenance.environment(),
  }


def table(records):
  """The records as a text table, one row per preset."""
  header = (f"{'preset':<16}{'patches':>8}{'compile s':>10}{'s/iter':>9}"
            f"{'min':>8}{'max':>8}{'us/patch':>9}{'floor s':>9}"
            f"{'x floor':>8}{'naive s':>10}{'speedup':>9}{'RSS MB':>8}")
  lines = [header]
  for r in records:
    lines.append(
        f"{r['preset']:<16}{r['patches']:>8d}{r['compile_s']:>10.2f}"
        f"{r['iteration_s_median']:>9.4f}{r['iteration_s_min']:>8.4f}"
        f"{r['iteration_s_max']:>8.4f}{r['seconds_per_patch'] * 1e6:>9.1f}"
        f"{r['fft_floor_s']:>9.4f}{r['ratio_to_floor']:>8.2f}"
        f"{r['naive_iteration_s']:>10.1f}{r['speedup_vs_naive']:>9.0f}"
        f"{r['peak_rss_mb']:>8.0f}")
  return "\n".join(lines)




def run_isolated(names, repeats=5, num_streams=None, chunk_size=64):
  """Runs each preset in its own subprocess; returns their records.

  Each preset runs as `python -m mtd_tf.bench --worker`, so its peak
  resident memory is its own.

  Raises:
    RuntimeError: a preset's process failed (with the end of its stderr).
  """
  check_settings(names, repeats, num_streams, chunk_size)
  records = []
  for i, name in enumerate(names):
    logging.info("[%d/%d] %s ...", i + 1, len(names), name)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mtd_tf.bench", "--worker", f"--preset={name}",
         f"--repeats={repeats}", f"--num_streams={num_streams or 0}",
         f"--chunk_size={chunk_size}", "--quiet"],
        capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines()
             if line.startswith(RECORD_PREFIX)]
    if done.returncode or not lines:
      tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
      raise RuntimeError(f"preset {name} failed (exit {done.returncode}): "
                         f"{tail[0]}")
    records.append(json.loads(lines[-1][len(RECORD_PREFIX):]))
    logging.info("[%d/%d] %s done in %.3g s", i + 1, len(names), name,
                 time.perf_counter() - start)
  return records
