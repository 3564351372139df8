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
  paper_baseline_s     one EM iteration with the loop structure of the
                       paper's published code (`paper_baseline.py`), timed
                       on `BASELINE_PATCHES` patches and scaled to all
  paper_reference_s    the paper's code itself, measured on this kind of
                       machine (`paper_baseline.PAPER_ITERATION_SECONDS`;
                       null where not measured)
  speedup_vs_paper_baseline   paper_baseline_s / iteration_s_median
  peak_rss_mb          peak resident memory of the preset's own process

Two presets measure data-set scale:

  many-micrographs     `micrographs` micrographs of 4088 x 4088 written as
                       MRC files to a temporary folder (by a child process)
                       and streamed from disk every iteration
                       (`streaming.StreamingData`, memory budget
                       `memory_budget_bytes`); the keys above (the floor and
                       the baselines scaled from one micrograph) plus
                       `micrographs`, `first_pass_s` and `spilled_mb`
  accelerated          the micrograph preset's data from one start: plain EM
                       for `PLAIN_ITERATIONS` iterations sets
                       `target_log_likelihood` (of F(100)); Anderson
                       acceleration, the diagonal secant method and
                       SQUAREM (`acceleration.METHODS`) run until they
                       reach it: `plain_iterations`, `plain_s`,
                       `anderson_iterations`, `anderson_s`,
                       `secant_iterations`, `secant_s`,
                       `squarem_iterations`, `squarem_s`, and the one
                       with fewer iterations (`accelerated_method`) as
                       `accelerated_iterations`, `accelerated_s`

`run_isolated` runs each preset in its own subprocess (`mtd-bench --worker`)
so that its peak memory is its own, and `table` formats the records.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import typing

from absl import logging
import numpy as np

from mtd_tf.base import provenance
from mtd_tf.model import datasets
from mtd_tf.model import io
from mtd_tf.pipelines import paper_baseline

__all__ = [
  "PRESETS",
  "paper_baseline_seconds",
  "fft_floor_seconds",
  "run_preset",
  "run_isolated",
  "table",
  "check_settings",
  "check_sizes",
  "write_micrographs",
  "RECORD_PREFIX",
  "BenchmarkError",
  "BASELINE_PATCHES",
  "PLAIN_ITERATIONS",
  "DEFAULT_MICROGRAPHS",
]

RECORD_PREFIX = "BENCH_RECORD "
# Patches the paper-structured baseline is timed on (scaled to all).
BASELINE_PATCHES = 16
# Plain EM iterations whose log-likelihood SQUAREM must reach.
PLAIN_ITERATIONS = 100
DEFAULT_MICROGRAPHS = 8


class BenchmarkError(ValueError):
  """Benchmark settings that make no sense, with what to change."""


PRESETS = {
  "paper-gaussian": dict(image_size=5, shape=(55, 55), num_rotations=4),
  "paper-mnist": dict(image_size=28, shape=(308, 308), num_rotations=4),
  "micrograph": dict(image_size=28, shape=(4088, 4088), num_rotations=4),
  "micrograph-k3": dict(image_size=28, shape=(5740, 4088), num_rotations=4),
  "many-micrographs": dict(image_size=28, shape=(4088, 4088), num_rotations=4),
  "accelerated": dict(image_size=28, shape=(4088, 4088), num_rotations=4),
  "recommended-streamed": dict(
    image_size=28, shape=(4088, 4088), num_rotations=4
  ),
}


def _median_spread(samples):
  return (
    float(np.median(samples)),
    float(np.min(samples)),
    float(np.max(samples)),
  )


def paper_baseline_seconds(
  measurement, image, sigma, num_rotations, max_patches=BASELINE_PATCHES
):
  """Seconds per EM iteration of the paper's loop structure, and its reference.

  Returns:
    (seconds of `paper_baseline.paper_iteration_seconds` timed on
    `max_patches` patches and scaled to all, the paper's own figure for this
    (L, N) or None).
  """
  size = image.shape[0]
  seconds = paper_baseline.paper_iteration_seconds(
    measurement, image, sigma, num_rotations, max_patches=max_patches
  )
  reference = (
    paper_baseline.PAPER_ITERATION_SECONDS.get((size, measurement.shape[0]))
    if (measurement.shape[0] == measurement.shape[1])
    else None
  )
  return seconds, reference


def fft_floor_seconds(
  num_patches, image_size, num_rotations, repeats=3, chunk=256
):
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
    return (
      tf.reduce_sum(tf.signal.irfft2d(spec, fft_length=[n, n])),
      tf.reduce_sum(tf.abs(tf.signal.rfft2d(real_in))),
    )

  def xla():
    for _ in range(rounds):
      [t.numpy() for t in xla_pair(tf_spec, tf_real)]

  workers = os.cpu_count() or 1

  def scipy_fft():
    for _ in range(rounds):
      scipy.fft.irfft2(spectra, s=(n, n), workers=workers)
      scipy.fft.rfft2(real, workers=workers)

  parts = {
    "tf_eager": timed(eager),
    "tf_xla": timed(xla),
    "scipy": timed(scipy_fft),
  }
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


# Presets that write --micrographs files to a temporary folder, with the
# offset grids their spectra may spill (the recommended method's 4).
_WRITES_MICROGRAPHS = {"many-micrographs": 1, "recommended-streamed": 4}


def check_sizes(names, chunk_size, num_streams, micrographs, free_bytes=None):
  """Refuses, before any work, sizes this machine cannot hold.

  Each preset's EM with this chunk size must fit in memory
  (`em.EMOptions.check_size`), and the micrographs the scale presets write,
  with the spectra they may spill, must fit on the temporary folder's disk.

  Args:
    names: the presets to run.
    chunk_size, num_streams: as the flags (num_streams None: one per core).
    micrographs: micrographs of the scale presets.
    free_bytes: free disk bytes (default: the temporary folder's).

  Raises:
    BenchmarkError: one line with what is needed and what to change.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  # Deferred: the tool checks sizes before anything loads (no TensorFlow).
  from mtd_tf.base import memory  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import options as em_options  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import problem  # pylint: disable=g-import-not-at-top

  check_settings(names, 1, num_streams, chunk_size)
  streams = num_streams or problem.resolved_streams(em_options.EMOptions())
  for name in names:
    preset = PRESETS[name]
    try:
      em_options.EMOptions(
        chunk_size=int(chunk_size), num_rotations=preset["num_rotations"]
      ).check_size(preset["image_size"], streams)
    except ValueError as err:
      raise BenchmarkError(f"--chunk_size={chunk_size}: {err}") from None
  writing = [n for n in names if n in _WRITES_MICROGRAPHS]
  if not writing:
    return
  if int(micrographs) < 1:
    raise BenchmarkError(f"micrographs must be >= 1, got {micrographs}.")
  folder = tempfile.gettempdir()
  free = shutil.disk_usage(folder).free if free_bytes is None else free_bytes
  for name in writing:
    preset = PRESETS[name]
    size = preset["image_size"]
    pixels = int(np.prod(preset["shape"]))
    patches = pixels // size**2
    grids = _WRITES_MICROGRAPHS[name]
    # A float32 MRC, and the spectra of each grid family ([D, 2L, L+1]
    # complex64) that may be spilled beside it.
    each = 4 * pixels + grids * patches * 2 * size * (size + 1) * 8
    needed = int(micrographs) * each
    if needed > free:
      raise BenchmarkError(
        f"--micrographs={micrographs}: the {name} preset writes and spills "
        f"about {memory.format_bytes(needed)} in {folder}, which has "
        f"{memory.format_bytes(free)} free: use at most "
        f"{max(int(free // each), 0)} micrographs or set TMPDIR to a larger "
        "disk."
      )


def _em_seconds(data, sigma, init, options, iterations):
  """Seconds of `iterations` EM iterations on prepared patch spectra."""
  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import em  # pylint: disable=g-import-not-at-top

  batch = em.ProblemBatch(
    sigmas=sigma, inits=init, m_steps=["closed_form"], prior_weights=[0.0]
  )
  result = em.run_prepared(
    data, batch, None, options, max_iterations=iterations
  )
  return result.seconds


class _PresetData(typing.NamedTuple):
  """A preset's simulated measurement and what EM needs of it."""

  image: np.ndarray  # float [L, L], the true image
  measurement: np.ndarray  # float32 [H, W]
  sigma: float  # the simulated noise level
  num_patches: int
  num_streams: int
  options: typing.Any  # em.EMOptions
  data: typing.Any  # patches.PatchSpectra


def _preset_data(preset, chunk_size, num_streams, dtype="float32"):
  """Simulates a preset's measurement (SNR 1, seed 0) and its spectra."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import patches  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  size, num_rotations = preset["image_size"], preset["num_rotations"]
  image = _preset_image(size)
  sim = simulation.simulate_measurement(
    image,
    snr=1.0,
    seed=0,
    measurement_shape=preset["shape"],
    num_rotations=num_rotations,
  )
  patch_set = patches.extract_patches(sim.measurement, size)
  streams = num_streams or em.resolved_streams(em.EMOptions())
  options = em.EMOptions(
    num_rotations=num_rotations,
    tolerance=0.0,
    chunk_size=chunk_size,
    num_streams=streams,
    dtype=dtype,
  )
  data = patches.patch_spectra(
    [patch_set],
    patches.balanced_chunk_size(len(patch_set), chunk_size, streams),
    tf.as_dtype(dtype),
  )
  return _PresetData(
    image=image,
    measurement=sim.measurement,
    sigma=float(sim.sigma),
    num_patches=len(patch_set),
    num_streams=streams,
    options=options,
    data=data,
  )


def run_preset(
  name,
  repeats=5,
  num_streams=None,
  chunk_size=64,
  micrographs=DEFAULT_MICROGRAPHS,
  memory_budget_bytes=None,
):
  """Measures one preset in this process; returns its JSON record."""
  if name == "many-micrographs":
    return _run_many_micrographs(
      repeats, num_streams, chunk_size, micrographs, memory_budget_bytes
    )
  if name == "accelerated":
    return _run_accelerated(num_streams, chunk_size)
  if name == "recommended-streamed":
    return _run_recommended_streamed(
      num_streams, chunk_size, micrographs, memory_budget_bytes
    )
  check_settings([name], repeats, num_streams, chunk_size)
  preset = PRESETS[name]
  size = preset["image_size"]
  num_rotations = preset["num_rotations"]
  problem = _preset_data(preset, chunk_size, num_streams)
  image, data, options = problem.image, problem.data, problem.options
  streams, num_patches = problem.num_streams, problem.num_patches
  measurement = problem.measurement
  del problem  # Only the patches' spectra and the measurement are needed.
  init = image[None] + 0.1
  sigma = [float(np.linalg.norm(image) / size)]

  first = _em_seconds(data, sigma, init, options, 1)
  iterations = 3 if num_patches > 5000 else 20
  samples = [
    _em_seconds(data, sigma, init, options, iterations) / iterations
    for _ in range(repeats)
  ]
  median, low, high = _median_spread(samples)
  floor, floor_parts = fft_floor_seconds(num_patches, size, num_rotations)
  baseline, reference = paper_baseline_seconds(
    measurement, image, sigma[0], num_rotations
  )
  return {
    "preset": name,
    "L": size,
    "shape": list(preset["shape"]),
    "K": num_rotations,
    "dtype": "float32",
    "patches": num_patches,
    "chunk_size": chunk_size,
    "num_streams": streams,
    "compile_s": max(first - median, 0.0),
    "iteration_s_median": median,
    "iteration_s_min": low,
    "iteration_s_max": high,
    "seconds_per_patch": median / num_patches,
    "fft_floor_s": floor,
    "fft_floor_parts_s": floor_parts,
    "paper_baseline_s": baseline,
    "paper_reference_s": reference,
    "speedup_vs_paper_baseline": baseline / median,
    "ratio_to_floor": median / floor,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "environment": provenance.environment(),
  }


def table(records):
  """The records as a text table, one row per preset."""
  header = (
    f"{'preset':<18}{'patches':>8}{'compile s':>10}{'s/iter':>9}"
    f"{'min':>8}{'max':>8}{'us/patch':>9}{'floor s':>9}"
    f"{'x floor':>8}{'paper-loop s':>13}{'paper s':>8}"
    f"{'speedup':>8}{'RSS MB':>8}"
  )
  lines = [header]
  for r in records:
    if "iteration_s_median" not in r:
      continue
    reference = r.get("paper_reference_s")
    reference = "-" if reference is None else f"{reference:.3g}"
    name = r["preset"] + (f" x{r['micrographs']}" if "micrographs" in r else "")
    lines.append(
      f"{name:<18}{r['patches']:>8d}{r['compile_s']:>10.2f}"
      f"{r['iteration_s_median']:>9.4f}{r['iteration_s_min']:>8.4f}"
      f"{r['iteration_s_max']:>8.4f}{r['seconds_per_patch'] * 1e6:>9.1f}"
      f"{r['fft_floor_s']:>9.4f}{r['ratio_to_floor']:>8.2f}"
      f"{r['paper_baseline_s']:>13.1f}{reference:>8}"
      f"{r['speedup_vs_paper_baseline']:>8.0f}{r['peak_rss_mb']:>8.0f}"
    )
  for r in records:
    if "accelerated_iterations" in r:
      lines.append(
        f"{r['preset']}: to log-likelihood {r['target_log_likelihood']:.6g} "
        f"plain EM {r['plain_iterations']} iterations {r['plain_s']:.3g} s, "
        f"{r.get('accelerated_method', 'squarem')} "
        f"{r['accelerated_iterations']} iterations "
        f"{r['accelerated_s']:.3g} s ({r['iteration_ratio']:.2f} x fewer, "
        f"{r['time_ratio']:.2f} x less time)"
        + "".join(
          f", {m} {r[m + '_iterations']} iterations {r[m + '_s']:.3g} s"
          for m in ("anderson", "secant", "squarem")
          if m != r.get("accelerated_method")
          and r.get(m + "_iterations") is not None
        )
      )
  for r in records:
    if "plain_seconds" in r:
      lines.append(
        f"{r['preset']}: {r['micrographs']} micrographs, the recommended "
        f"method ({r['starts']} starts, {r['problem_iterations']} "
        f"start-iterations) {r['seconds']:.4g} s = {r['time_ratio']:.2f} x "
        f"single-start EM's {r['plain_iterations']} iterations "
        f"({r['plain_seconds']:.4g} s); peak RSS {r['peak_rss_mb']:.0f} MB"
      )
  # Streamed micrographs against one held in memory, measured in this run.
  single = [r for r in records if r["preset"] == "micrograph"]
  for r in records:
    if "micrographs" in r and "iteration_s_median" in r and single:
      one = single[0]["iteration_s_median"]
      lines.append(
        f"{r['preset']}: {r['micrographs']} micrographs "
        f"{r['iteration_s_median']:.3g} s per iteration = "
        f"{r['iteration_s_median'] / one:.2f} x the micrograph preset's "
        f"{one:.3g} s"
      )
  return "\n".join(lines)


def write_micrographs(
  folder, count, image_size=28, shape=(4088, 4088), num_rotations=4, snr=1.0
):
  """Writes `count` simulated micrographs as folder/mic_###.mrc.

  The micrograph preset's image (a shipped digit for L = 28), seeds 0, 1,
  ...; sigma goes in each file's sidecar.

  Returns:
    (sorted list of paths, sigma).
  """
  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  image = _preset_image(image_size)
  paths = []
  sigma = None
  for i in range(int(count)):
    sim = simulation.simulate_measurement(
      image,
      snr=snr,
      seed=i,
      measurement_shape=shape,
      num_rotations=num_rotations,
    )
    sigma = sim.sigma
    path = os.path.join(folder, f"mic_{i:03d}.mrc")
    io.save_measurement(path, sim)
    paths.append(path)
    del sim
  return paths, sigma


def _preset_image(size):
  if size == 28:
    return datasets.shipped_digits()["targets"][3]
  return np.random.default_rng(0).uniform(0, 1, (size, size))


def _write_in_child(folder, count, preset):
  """`write_micrographs` in a child process: its memory is not this one's."""
  code = (
    "import sys; from mtd_tf.pipelines import benchmarks; "
    "benchmarks.write_micrographs(sys.argv[1], int(sys.argv[2]), "
    f"{preset['image_size']}, {tuple(preset['shape'])}, "
    f"{preset['num_rotations']})"
  )
  done = subprocess.run(
    [sys.executable, "-c", code, folder, str(count)],
    capture_output=True,
    text=True,
    check=False,
  )
  if done.returncode:
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"Writing the micrographs failed: {tail[0]}")


def _run_many_micrographs(
  repeats, num_streams, chunk_size, count, memory_budget_bytes
):
  """The many-micrographs preset: micrographs streamed from MRC files."""
  import tempfile  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top

  if int(count) < 1:
    raise BenchmarkError(f"micrographs must be >= 1, got {count}.")
  preset = PRESETS["many-micrographs"]
  size, num_rotations = preset["image_size"], preset["num_rotations"]
  budget = (
    streaming.DEFAULT_MEMORY_BUDGET_BYTES
    if memory_budget_bytes is None
    else int(memory_budget_bytes)
  )
  streams = num_streams or em.resolved_streams(em.EMOptions())
  with tempfile.TemporaryDirectory(prefix="mtd_bench_") as folder:
    _write_in_child(folder, count, preset)
    image = _preset_image(size)
    data = streaming.StreamingData(
      os.path.join(folder, "*.mrc"),
      size,
      chunk_size=chunk_size,
      dtype=tf.float32,
      memory_budget_bytes=budget,
      num_streams=streams,
      spill_dir=folder,
    )
    options = em.EMOptions(
      num_rotations=num_rotations,
      tolerance=0.0,
      chunk_size=chunk_size,
      num_streams=streams,
    )
    sigma = float(np.linalg.norm(image) / size)
    batch = em.ProblemBatch(
      sigmas=[sigma],
      inits=image[None] + 0.1,
      m_steps=["closed_form"],
      prior_weights=[0.0],
    )
    # The first pass reads, transforms and spills; it also traces.
    first_pass = em.run_streaming(data, batch, None, options, 1).seconds
    samples = [
      em.run_streaming(data, batch, None, options, 1).seconds
      for _ in range(int(repeats))
    ]
    spilled = data.spilled_bytes
    data.close()
    measurement = io.load_measurement(
      os.path.join(folder, "mic_000.mrc")
    ).measurement
  median, low, high = _median_spread(samples)
  patches_per = int(data.patch_counts[0])
  floor_one, floor_parts = fft_floor_seconds(patches_per, size, num_rotations)
  baseline, _ = paper_baseline_seconds(measurement, image, sigma, num_rotations)
  total = data.num_patches
  scale = total / patches_per
  return {
    "preset": "many-micrographs",
    "L": size,
    "shape": list(preset["shape"]),
    "K": num_rotations,
    "dtype": "float32",
    "patches": total,
    "micrographs": int(count),
    "memory_budget_bytes": budget,
    "chunk_size": chunk_size,
    "num_streams": streams,
    "compile_s": max(first_pass - median, 0.0),
    "first_pass_s": first_pass,
    "iteration_s_median": median,
    "iteration_s_min": low,
    "iteration_s_max": high,
    "seconds_per_patch": median / total,
    "fft_floor_s": floor_one * scale,
    "fft_floor_parts_s": {k: v * scale for k, v in floor_parts.items()},
    "paper_baseline_s": baseline * scale,
    "paper_reference_s": None,
    "speedup_vs_paper_baseline": baseline * scale / median,
    "ratio_to_floor": median / (floor_one * scale),
    "spilled_mb": spilled / 2**20,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "environment": provenance.environment(),
  }


def _run_recommended_streamed(
  num_streams, chunk_size, count, memory_budget_bytes
):
  """The recommended-streamed preset: the recommended method on streamed
  micrographs against single-start EM on the same files, in this run.

  Both use the preconditioned M-step and the preset's prior (the shipped
  mnist_unet at L = 28, a Gaussian prior otherwise) from the same start;
  single-start EM runs `PLAIN_ITERATIONS` iterations (tolerance 0), the
  recommended method its own schedule (`recovery.recommended_options`:
  every start to the prune point on one grid, the survivor on the offset
  grids, tolerance as Table I's).
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf import recovery  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import callbacks  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import streaming  # pylint: disable=g-import-not-at-top
  from mtd_tf.recovery import recommended  # pylint: disable=g-import-not-at-top

  class RunTimes(callbacks.Callback):
    """Each EM run's starts, iterations and seconds."""

    def __init__(self):
      self.records = []

    def on_run_end(self, run, result):
      self.records.append(
        {
          "starts": int(run.batch.size),
          "iterations": int(np.max(result.iterations)),
          "seconds": float(result.seconds),
        }
      )

  if int(count) < 1:
    raise BenchmarkError(f"micrographs must be >= 1, got {count}.")
  preset = PRESETS["recommended-streamed"]
  size, num_rotations = preset["image_size"], preset["num_rotations"]
  budget = (
    streaming.DEFAULT_MEMORY_BUDGET_BYTES
    if memory_budget_bytes is None
    else int(memory_budget_bytes)
  )
  streams = num_streams or em.resolved_streams(em.EMOptions())
  prior = _preset_prior(size)
  init = (
    datasets.mnist_initialisation()
    if size == 28
    else np.full((size, size), 0.5)
  )  # [L, L]
  options = em.EMOptions(
    num_rotations=num_rotations,
    chunk_size=chunk_size,
    num_streams=streams,
    m_step="preconditioned",
    progress_every=0,
  )
  with tempfile.TemporaryDirectory(prefix="mtd_bench_") as folder:
    _write_in_child(folder, count, preset)
    sigma = io.load_measurement(os.path.join(folder, "mic_000.mrc")).sigma
    data = streaming.StreamingData(
      os.path.join(folder, "*.mrc"),
      size,
      chunk_size=chunk_size,
      memory_budget_bytes=budget,
      num_streams=streams,
      spill_dir=folder,
    )
    try:
      batch = em.ProblemBatch([sigma], init[None], ["preconditioned"], [1.0])
      plain = em.run_streaming(
        data,
        batch,
        prior,
        dataclasses.replace(options, tolerance=0.0),
        PLAIN_ITERATIONS,
      )
      data.close()  # the same cold start for the recommended method
      em_options, recovery_options = recommended.recommended_options(
        options, size
      )
      runs = RunTimes()
      start = time.perf_counter()
      with callbacks.active([runs]):
        found = recovery.multistart_em(
          [data],
          size,
          [sigma],
          inits=init[None],
          prior=prior,
          m_step=em_options.m_step,
          options=em_options,
          recovery=recovery_options,
        )
      seconds = time.perf_counter() - start
    finally:
      data.close()
  return {
    "preset": "recommended-streamed",
    "L": size,
    "shape": list(preset["shape"]),
    "K": num_rotations,
    "patches": int(data.num_patches),
    "micrographs": int(count),
    "memory_budget_bytes": budget,
    "chunk_size": chunk_size,
    "num_streams": streams,
    "seconds": seconds,
    "plain_seconds": float(plain.seconds),
    "plain_iterations": int(np.max(plain.iterations)),
    "time_ratio": seconds / float(plain.seconds),
    "starts": int(len(found.groups)),
    "problem_iterations": int(found.problem_iterations),
    # Each EM run of the method: its starts, iterations and seconds (the
    # first pass over a grid family reads, transforms and spills it).
    "runs": runs.records,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "environment": provenance.environment(),
  }


def _preset_prior(size):
  """The shipped MNIST prior at L = 28; a Gaussian prior otherwise."""
  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top

  if size == 28:
    return priors.load_prior("mnist_unet", image_size=size)
  return priors.GaussianPrior(np.full((size, size), 0.5))


def _run_accelerated(num_streams, chunk_size):
  """The accelerated preset: Anderson and SQUAREM against plain EM.

  Counts are conservative for the accelerators: plain EM's is the index
  tau of the first F(tau) at the target (its log-likelihood is seen by
  the E-step of iteration tau + 1), theirs the EM-map evaluation whose
  E-step sees it.
  """

  # Deferred: TensorFlow loads only when a preset runs (--help stays fast).
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import acceleration  # pylint: disable=g-import-not-at-top

  preset = PRESETS["accelerated"]
  size, num_rotations = preset["image_size"], preset["num_rotations"]
  # float64: in float32 the log-likelihood of 2e4 patches is resolved to
  # about 1e-7 of its size, and plain EM's last iterations move it less.
  problem = _preset_data(preset, chunk_size, num_streams, "float64")
  image, sigma, data = problem.image, problem.sigma, problem.data
  options, streams = problem.options, problem.num_streams
  del problem
  # Table I's start for L = 28 (the mean of ten training digits).
  init = (
    np.asarray(datasets.mnist_initialisation(), np.float64)
    if size == 28
    else np.full((size, size), image.mean())
  )
  batch = em.ProblemBatch(
    sigmas=[sigma],
    inits=init[None],
    m_steps=["closed_form"],
    prior_weights=[0.0],
  )
  em.run_prepared(data, batch, None, options, 1)  # trace outside the timing
  plain = em.run_prepared(data, batch, None, options, PLAIN_ITERATIONS + 1)
  history = plain.log_likelihood[:, 0]  # log p(F(tau)), tau = 0..100
  target = float(history[PLAIN_ITERATIONS])
  plain_iterations = int(np.argmax(history >= target))
  plain_s = plain.seconds * plain_iterations / len(history)
  em_map = em.prepared_em_map(data, batch, None, options)
  runs = {
    method: getattr(acceleration, method)(
      em_map,
      init,
      max_evaluations=3 * PLAIN_ITERATIONS,
      target_log_likelihood=[target],
    )
    for method in acceleration.METHODS
  }

  def to_target(method):
    """Evaluations and seconds to the target (None: not reached)."""
    count = float(runs[method].evaluations_to_target[0])
    if not np.isfinite(count):
      return None, None
    return int(count), float(runs[method].seconds_to_target[0])

  counts = {method: to_target(method) for method in runs}
  # The winner: fewer evaluations, then less time (not reached: last).
  method = min(
    runs,
    key=lambda m: (counts[m][0] is None, counts[m][0] or 0, counts[m][1] or 0),
  )
  result = runs[method]
  accelerated_iterations, accelerated_s = counts[method]
  reached = accelerated_iterations is not None
  return {
    "preset": "accelerated",
    "L": size,
    "shape": list(preset["shape"]),
    "K": num_rotations,
    "dtype": "float64",
    "m_step": "closed_form",
    "init": "mnist_mean" if size == 28 else "mean",
    "chunk_size": chunk_size,
    "num_streams": streams,
    "target_log_likelihood": target,
    "plain_iterations": plain_iterations,
    "plain_s": plain_s,
    "accelerated_method": method,
    "accelerated_iterations": accelerated_iterations,
    "accelerated_s": accelerated_s,
    "iteration_ratio": (
      plain_iterations / accelerated_iterations if reached else None
    ),
    "time_ratio": plain_s / accelerated_s if reached else None,
    "accepted_cycles": int(result.accepted.sum()),
    "cycles": int(result.accepted.shape[0]),
    **{f"{m}_iterations": counts[m][0] for m in runs},
    **{f"{m}_s": counts[m][1] for m in runs},
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "environment": provenance.environment(),
  }


def run_isolated(
  names,
  repeats=5,
  num_streams=None,
  chunk_size=64,
  micrographs=DEFAULT_MICROGRAPHS,
  memory_budget_bytes=None,
):
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
      [
        sys.executable,
        "-m",
        "mtd_tf.bench",
        "--worker",
        f"--preset={name}",
        f"--repeats={repeats}",
        f"--num_streams={num_streams or 0}",
        f"--chunk_size={chunk_size}",
        f"--micrographs={micrographs}",
        f"--memory_budget_mb={(memory_budget_bytes or 0) / 2**20}",
        "--quiet",
      ],
      capture_output=True,
      text=True,
      check=False,
    )
    lines = [
      line
      for line in done.stdout.splitlines()
      if line.startswith(RECORD_PREFIX)
    ]
    if done.returncode or not lines:
      tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
      raise RuntimeError(
        f"preset {name} failed (exit {done.returncode}): {tail[0]}"
      )
    records.append(json.loads(lines[-1][len(RECORD_PREFIX) :]))
    logging.info(
      "[%d/%d] %s done in %.3g s",
      i + 1,
      len(names),
      name,
      time.perf_counter() - start,
    )
  return records
