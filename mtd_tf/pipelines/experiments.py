"""The section IV experiments: planning, running with resume, aggregation.

For every SNR and every target image a measurement is simulated (Table I:
N = 11 L, density 0.1, K = 4, corners 2L apart; or the config's size
factor, density, separation, and continuous rotations, as in micrographs)
and reconstructed by each method:

  no_prior              the paper's baseline: Table I's gradient M-step
  prior                 Algorithm 1 with the score prior (Table I)
  no_prior_closed_form  the baseline with the exact M-step, run to convergence
  prior_preconditioned  Algorithm 1 with steps scaled by the exact curvature of
                        Q and the prior (`mstep.preconditioned_mstep`) instead
                        of Table I's fixed mu
  recommended           several starts, pruning, selection and the prior's
                        gauge (`recovery.multistart_em`, docs/recommended.md)
  recommended_no_prior  the same without the prior

`plan` turns an `ExperimentConfig` into the runs (targets, starts and
measurements, all from the config's seed); `run_experiment` runs them as
batched EM (`em.batched_em`), in blocks that are saved as they finish so an
interrupted experiment resumes; `run_to_folder` also writes results.json
and the figures (`mtd_tf.pipelines.figures`); with a logdir both write
every EM iteration of every problem as TensorBoard summaries
(`em.summaries`, a run folder `<method>/snr_<s>/trial_<i>` per problem).
Targets are never seen by the prior:
fresh draws of N(mu, I) with the prior's mu (Gaussian) or MNIST test-split
digits (MNIST).

results.json (`RESULTS_SCHEMA` = 1): dataset, snrs, trials, seed,
parameters (EM options, initialisation, image_size, size_factor, density,
min_separation (in pixels, 2L unless given), rotations, error_angles (the
angles errors minimise over besides Phi: 360 for continuous rotations,
else 0), prior, methods, m_steps), target_indices, runs (snr,
target_index, trial, method, error, error_shift_aligned, iterations,
seconds, sigma, sigma_true and with estimated sigma sigma_from_data),
summary (per SNR and method: mean_error, std_error, max_error,
mean_error_shift_aligned, std_error_shift_aligned, max_sigma_error,
count), seconds (em_total, executions, and end_to_end from
`run_to_folder`), blocks (total, resumed), settings (the config as
`settings` records it, to recognise a finished experiment), environment
(`provenance.environment`).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import time
import typing

from absl import logging
import numpy as np

from mtd_tf import em
from mtd_tf import priors
from mtd_tf import recovery
from mtd_tf.base import atomic
from mtd_tf.base import memory
from mtd_tf.base import provenance
from mtd_tf.base import table1
from mtd_tf.em import callbacks
from mtd_tf.em import summaries
from mtd_tf.model import datasets
from mtd_tf.model import metrics
from mtd_tf.model import noise
from mtd_tf.model import simulation
from mtd_tf.pipelines import figures
from mtd_tf.recovery import methods

__all__ = [
  "ExperimentConfig",
  "ExperimentError",
  "Plan",
  "PAPER_METHODS",
  "SIGMA_SOURCES",
  "RESULTS_SCHEMA",
  "default_config",
  "table_options",
  "check_config",
  "plan",
  "run_experiment",
  "aggregate",
  "write_results",
  "run_to_folder",
  "summary_table",
  "memory_bytes",
  "check_memory",
]

# The paper's methods (the default of a config); every registered method
# (`recovery.methods.METHODS`) can run.
PAPER_METHODS = methods.PAPER_METHODS
# Where the noise level EM is given comes from (`ExperimentConfig.sigma`).
SIGMA_SOURCES = ("true", "estimated")
RESULTS_SCHEMA = 1


class ExperimentError(ValueError):
  """An experiment configuration that cannot run, with what to change."""


def table_options(dataset, rotations="discrete"):
  """Table I's EM options of a dataset (its prior weight schedule gamma).

  With rotations="continuous", K is `simulation.CONTINUOUS_NUM_ROTATIONS`
  (a fine grid of angles) instead of Table I's 4.
  """
  if dataset not in table1.DATASETS:
    raise ExperimentError(
      f"dataset must be one of {sorted(table1.DATASETS)}, got {dataset!r}."
    )
  return _table_options(table1.DATASETS[dataset]["gamma"], rotations)


def _table_options(gamma, rotations="discrete"):
  """Table I's EM options with prior weight schedule `gamma` (and K = 16
  for continuous rotations)."""
  num_rotations = (
    simulation.CONTINUOUS_NUM_ROTATIONS
    if rotations == "continuous"
    else table1.NUM_ROTATIONS
  )
  return em.EMOptions(
    num_rotations=num_rotations,
    chunk_size=em.chunk_size_for(num_rotations),
    max_iterations=table1.MAX_ITERATIONS,
    tolerance=table1.TOLERANCE,
    learning_rate=table1.LEARNING_RATE,
    gradient_steps=table1.GRADIENT_STEPS,
    t_prior=table1.T_PRIOR,
    gamma=gamma,
  )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One section IV experiment.

  Attributes:
    dataset: "gaussian" or "mnist" (a key of `table1.DATASETS`).
    snrs: the SNRs.
    trials: number of target images.
    seed: seeds targets (Gaussian), initialisations and measurements.
    prior: a shipped prior's name (Table I's by default) or a SavedModel
      folder.
    methods: names from `recovery.methods.METHODS`.
    options: `em.EMOptions` of Algorithm 1 (Table I by default; None in
      a hand-made config means Table I's, with K = 16 for continuous
      rotations).
    size_factor: N / L: each measurement is N x N, and holds
      round(density N^2 / L^2) copies.
    density: p L^2 / N^2.
    min_separation: Chebyshev distance in pixels kept between the copies'
      corners (None: the paper's 2L; L: copies touch; 1..L-1: they
      overlap and add), `simulation.simulate_measurement`.
    rotations: "discrete" (each copy turned by one of EM's K angles, the
      paper's) or "continuous" (an angle uniform on [0, 2 pi); EM still
      runs on its K angles, and errors are minimised over
      `simulation.ERROR_ANGLES` angles too).
    mnist_npz: MNIST file for targets beyond the shipped digits (None: the
      ten shipped test-split digits, one per class).
    digit_classes: MNIST target classes (default 0..trials-1).
    first_digit: with mnist_npz, the targets of a class are its test digits
      first_digit, first_digit + 1, ... (in the order of the test split),
      so that other digits than the first of each class can be tried.
    sigma: the noise level EM is given: "true" (the simulator's) or
      "estimated" (`noise.estimate_sigma` of each measurement, as
      `mtd-reconstruct` does without --sigma; the recommended methods
      refine it by EM, `em.EMOptions.estimate_sigma`).
  """

  dataset: str
  snrs: typing.Tuple[float, ...]
  trials: int = 10
  seed: int = 0
  prior: typing.Optional[str] = None
  methods: typing.Tuple[str, ...] = PAPER_METHODS
  options: typing.Any = None
  size_factor: int = table1.SIZE_FACTOR
  density: float = table1.DENSITY
  mnist_npz: typing.Optional[str] = None
  digit_classes: typing.Optional[typing.Tuple[int, ...]] = None
  first_digit: int = 0
  sigma: str = "true"
  min_separation: typing.Optional[int] = None
  rotations: str = "discrete"

  @property
  def image_size(self):
    return table1.DATASETS[self.dataset]["image_size"]

  @property
  def initialisation(self):
    return table1.DATASETS[self.dataset]["init"]


def default_config(dataset, **overrides):
  """Table I's configuration of `dataset`, with `overrides` (None: keep)."""
  if dataset not in table1.DATASETS:
    raise ExperimentError(
      f"dataset must be one of {sorted(table1.DATASETS)}, got {dataset!r}."
    )
  table = table1.DATASETS[dataset]
  fields = dict(
    dataset=dataset,
    snrs=tuple(table["snrs"]),
    prior=table["prior"],
    options=_table_options(
      table["gamma"], overrides.get("rotations") or "discrete"
    ),
  )
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return check_config(ExperimentConfig(**fields))


def _few(items, most=8):
  """A list for a one-line message: its first `most` items, then a count."""
  items = list(items)
  shown = ", ".join(str(i) for i in items[:most])
  more = f", ... ({len(items)} in all)" if len(items) > most else ""
  return f"[{shown}{more}]"


def check_config(config):
  """Refuses a config that cannot run, before any work; returns it.

  Raises:
    ExperimentError: with one line saying what to change.
  """
  if config.dataset not in table1.DATASETS:
    raise ExperimentError(
      f"dataset must be one of {sorted(table1.DATASETS)},"
      f" got {config.dataset!r}."
    )
  if not config.snrs:
    raise ExperimentError("Give at least one SNR.")
  for snr in config.snrs:
    if not 0 < float(snr) < float("inf"):
      raise ExperimentError(f"SNRs must be positive and finite, got {snr}.")
  values = [float(s) for s in config.snrs]
  repeated = sorted({s for s in values if values.count(s) > 1})
  if repeated:
    raise ExperimentError(
      f"SNRs repeat ({', '.join(f'{s:g}' for s in repeated)} in "
      f"{values}): give each SNR once."
    )
  if int(config.trials) < 1:
    raise ExperimentError(f"trials must be >= 1, got {config.trials}.")
  names = ", ".join(methods.METHODS)
  if not config.methods:
    raise ExperimentError(f"Give at least one method of {names}.")
  unknown = sorted(set(config.methods) - set(methods.METHODS))
  if unknown:
    raise ExperimentError(f"Unknown methods {unknown}: use {names}.")
  if len(set(config.methods)) != len(config.methods):
    raise ExperimentError(f"Methods repeat: {list(config.methods)}.")
  if int(config.size_factor) < 2:
    raise ExperimentError(
      f"size_factor must be >= 2, got {config.size_factor}."
    )
  if not 0 < float(config.density) < float("inf"):
    raise ExperimentError(f"density must be positive, got {config.density}.")
  if config.rotations not in simulation.ROTATION_MODES:
    raise ExperimentError(
      f"rotations must be one of {', '.join(simulation.ROTATION_MODES)}, "
      f"got {config.rotations!r}."
    )
  _check_copies_fit(config)
  if config.options is not None:
    config.options.validate()
  if config.sigma not in SIGMA_SOURCES:
    raise ExperimentError(
      f"sigma must be one of {', '.join(SIGMA_SOURCES)}, got {config.sigma!r}."
    )
  if config.dataset == "mnist":
    classes = config.digit_classes or tuple(range(config.trials))
    if len(classes) != config.trials:
      raise ExperimentError(
        f"Got {len(classes)} digit classes for {config.trials} trials."
      )
    if any(not 0 <= int(c) <= 9 for c in classes):
      if config.digit_classes is None:
        raise ExperimentError(
          f"trials={config.trials} without digit classes: the default "
          "classes 0..trials-1 serve at most 10 trials; give the classes "
          "(--digit_classes) and an MNIST file (--mnist_npz) for more."
        )
      bad = [int(c) for c in classes if not 0 <= int(c) <= 9]
      raise ExperimentError(f"Digit classes must be in 0..9, got {_few(bad)}.")
    if config.mnist_npz is None and len(set(classes)) != len(classes):
      raise ExperimentError(
        "Without an MNIST file the targets are the ten shipped digits: "
        "classes must be distinct (or pass --mnist_npz)."
      )
    if int(config.first_digit) < 0:
      raise ExperimentError(
        f"first_digit must be >= 0, got {config.first_digit}."
      )
    if config.mnist_npz is None and config.first_digit:
      raise ExperimentError(
        "first_digit picks test digits from an MNIST file: pass --mnist_npz."
      )
  elif config.digit_classes or config.first_digit:
    raise ExperimentError(
      "Digit classes and first_digit apply to the mnist dataset only."
    )
  return config


def _check_copies_fit(config):
  """Refuses a separation or density whose copies cannot be placed."""
  size = config.image_size
  try:
    spacing = simulation.min_separation_of(size, config.min_separation)
  except simulation.SimulationError as err:
    raise ExperimentError(str(err)) from None
  side = int(config.size_factor) * size
  requested = int(round(float(config.density) * side**2 / size**2))
  most = simulation.max_copies((side, side), size, spacing)
  if requested > most:
    raise ExperimentError(
      f"density {config.density:.3g} asks for {requested} copies but at "
      f"most {most} fit {spacing} pixels apart in {side} x {side}: use a "
      f"density of at most {most * size**2 / side**2:.3g}"
      + (
        f" or a smaller min_separation (down to {size}: touching copies)."
        if spacing > size
        else "."
      )
    )


def memory_bytes(config, block_size=None):
  """{what: bytes} an experiment holds at once: a lower bound.

  The plan keeps every measurement (float32 N x N per SNR and target);
  each batched execution (a block of `block_size` runs, or all) holds every
  run's patches (float64 and in options.dtype) and their spectra (complex,
  2L x (L + 1) each), counted on eq. (9)'s one patch grid (the recommended
  methods' offset grids and starts hold more); and EM's own buffers
  (`em.EMOptions.memory_bytes`).

  Args:
    config: `ExperimentConfig`.
    block_size: runs per batched execution (None or 0: all).

  Returns:
    {"measurements": ..., "patches and spectra": ..., plus EM's parts}.
  """
  options = _options(config)
  size = config.image_size
  side = int(config.size_factor) * size
  itemsize = 4 if options.dtype == "float32" else 8
  runs = len(config.snrs) * int(config.trials) * len(config.methods)
  block = min(int(block_size or runs), runs)
  per_patch = size**2 * (8 + itemsize) + 2 * size * (size + 1) * 2 * itemsize
  parts = {
    "measurements": len(config.snrs) * int(config.trials) * side**2 * 4,
    "patches and spectra": block * int(config.size_factor) ** 2 * per_patch,
  }
  parts.update(options.memory_bytes(size, em.resolved_streams(options)))
  return parts


def check_memory(config, block_size=None, available_bytes=None):
  """Refuses, before any work, an experiment the machine cannot hold.

  Args:
    config: `ExperimentConfig`.
    block_size: runs per batched execution (None or 0: all).
    available_bytes: memory to fit in (default:
      `memory.memory_budget()`).

  Raises:
    ExperimentError: `memory_bytes` exceeds the budget, or EM's rotation
      operators exceed what TensorFlow holds (`em.EMOptions.check_size`);
      with the sizes and what to change.
  """
  options = _options(config)
  try:
    options.check_size(
      config.image_size, em.resolved_streams(options), available_bytes
    )
  except ValueError as err:
    raise ExperimentError(str(err)) from None
  parts = memory_bytes(config, block_size)
  needed = sum(parts.values())
  budget = memory.memory_budget(available_bytes)
  if budget is None or needed <= budget:
    return
  runs = len(config.snrs) * int(config.trials) * len(config.methods)
  detail = ", ".join(
    f"{memory.format_bytes(v)} of {k}" for k, v in parts.items()
  )
  raise ExperimentError(
    f"{runs} runs ({len(config.snrs)} SNRs x {config.trials} trials x "
    f"{len(config.methods)} methods) need at least "
    f"{memory.format_bytes(needed)} ({detail}) but this machine can "
    f"give them {memory.format_bytes(budget)} "
    f"({memory.budget_source(available_bytes)}): use "
    + (
      "fewer trials or SNRs."
      if parts["measurements"] > budget or block_size
      else "fewer trials or SNRs, or a block size (--block_size)."
    )
  )


def _options(config):
  return (
    config.options
    if config.options is not None
    else _table_options(
      table1.DATASETS[config.dataset]["gamma"], config.rotations
    )
  )


def _error_angles(config):
  """The angles errors minimise over besides Phi (None: Phi only)."""
  if config.rotations != "continuous":
    return None
  return np.linspace(0.0, 2 * np.pi, simulation.ERROR_ANGLES, endpoint=False)


def _uses_prior(config):
  return any(methods.get(m).uses_prior for m in config.methods)


def _targets(config, prior, rng):
  """Target images [trials, L, L] and their identifiers."""
  size = config.image_size
  if config.dataset == "gaussian":
    mu = prior.metadata.get("mu") if prior is not None else None
    if mu is None:
      raise ExperimentError(
        "The Gaussian experiment draws targets from "
        "N(mu, I) with the prior's mu: use a prior whose "
        "metadata records mu (e.g. gaussian_fc)."
      )
    mu = np.asarray(mu, np.float64).reshape(size, size)
    images = mu + rng.standard_normal((config.trials, size, size))
    return images, list(range(config.trials))
  classes = config.digit_classes or tuple(range(config.trials))
  if config.mnist_npz is None:
    shipped = datasets.shipped_digits()
    return (
      shipped["targets"][list(classes)],
      [int(shipped["target_indices"][c]) for c in classes],
    )
  (_, _), (x_test, y_test) = datasets.load_mnist(config.mnist_npz)
  indices, seen = [], {}
  for c in classes:
    matches = np.flatnonzero(y_test == c)
    position = int(config.first_digit) + seen.get(c, 0)
    if position >= len(matches):
      raise ExperimentError(
        f"{config.mnist_npz} has only {len(matches)} test digits of class {c}."
      )
    indices.append(int(matches[position]))
    seen[c] = seen.get(c, 0) + 1
  return x_test[indices] / 255.0, indices


def _initial(config, rng):
  """F(0) of every target [trials, L, L] (Table I's initialisation)."""
  size = config.image_size
  if config.initialisation == "mnist_mean":
    return np.broadcast_to(
      datasets.mnist_initialisation(), (config.trials, size, size)
    ).copy()
  return rng.uniform(0.0, 1.0, (config.trials, size, size))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The runs of an experiment, everything EM needs, before any EM.

  Attributes:
    runs: list of dicts (snr, target_index, trial, method), one per run.
    targets: float [trials, L, L] true images.
    target_ids: identifiers of the targets (MNIST test indices).
    measurements: B float32 arrays [N, N], one per run (shared objects
      between the methods of one (SNR, target)).
    sigmas: float [B], the noise level EM is given (config.sigma; each
      run's "sigma_true" is the simulator's).
    inits: float [B, L, L].
    m_steps: B names from `em.M_STEPS` (each run's method's).
    prior_weights: float [B], 1 where the method uses the prior.
    shown: float32 [SNRs, N, N], the measurement of target 0 per SNR.
  """

  runs: list
  targets: np.ndarray
  target_ids: list
  measurements: list
  sigmas: np.ndarray
  inits: np.ndarray
  m_steps: list
  prior_weights: np.ndarray
  shown: np.ndarray


def plan(config, prior=None):
  """Draws targets, starts and measurements of every run from config.seed.

  Args:
    config: `ExperimentConfig`.
    prior: the loaded prior (the Gaussian experiment reads mu from it).

  Returns:
    `Plan`.
  """

  check_config(config)
  options = _options(config)
  rng = np.random.default_rng(config.seed)
  targets, target_ids = _targets(config, prior, rng)
  inits = _initial(config, rng)
  runs, measurements, sigmas, run_inits, m_steps, weights = (
    [],
    [],
    [],
    [],
    [],
    [],
  )
  shown = []
  for s, snr in enumerate(config.snrs):
    for t, target in enumerate(targets):
      sim = simulation.simulate_measurement(
        target,
        snr=snr,
        size_factor=config.size_factor,
        density=config.density,
        num_rotations=options.num_rotations,
        seed=[config.seed, s, t],
        continuous_rotations=config.rotations == "continuous",
        min_separation=config.min_separation,
      )
      if t == 0:
        shown.append(sim.measurement)
      given = (
        sim.sigma
        if config.sigma == "true"
        else noise.estimate_sigma(sim.measurement, config.image_size)
      )
      for method in config.methods:
        runs.append(
          {
            "snr": float(snr),
            "target_index": int(target_ids[t]),
            "trial": t,
            "method": method,
            "sigma": float(given),
            "sigma_true": float(sim.sigma),
            **(
              {"sigma_from_data": float(given)}
              if config.sigma == "estimated"
              else {}
            ),
          }
        )
        measurements.append(sim.measurement)
        sigmas.append(given)
        run_inits.append(inits[t])
        setup = methods.get(method)
        m_steps.append(setup.m_step)
        weights.append(1.0 if setup.uses_prior else 0.0)
  return Plan(
    runs=runs,
    targets=np.asarray(targets),
    target_ids=target_ids,
    measurements=measurements,
    sigmas=np.asarray(sigmas),
    inits=np.stack(run_inits),
    m_steps=m_steps,
    prior_weights=np.asarray(weights),
    shown=np.stack(shown),
  )


def fingerprint(config, the_plan):
  """Identifies an experiment's inputs, so that resume never mixes runs."""
  digest = hashlib.sha256(repr(dataclasses.asdict(config)).encode())
  measurements = the_plan.measurements
  for m in measurements[:: max(1, len(measurements) // 8)]:
    digest.update(np.ascontiguousarray(m[:8]).tobytes())
  return digest.hexdigest()[:16]


def block_path(partial_dir, index):
  return os.path.join(partial_dir, f"block-{index:04d}.npz")


def settings(config):
  """The settings of an experiment as a flat JSON-able dict (for blocks)."""
  record = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "options" and value is not None:
      for name, option in _asdict(value).items():
        record[f"options.{name}"] = option
    else:
      record[field.name] = list(value) if isinstance(value, tuple) else value
  return json.loads(json.dumps(record, default=str))


def save_block(
  partial_dir,
  key,
  index,
  estimates,
  iterations,
  seconds,
  sigmas,
  config=None,
):
  """Writes a finished block (atomically) under partial_dir.

  With config, the block also records its experiment's `settings`, so that
  a resume with other settings can say which differ.
  """
  os.makedirs(partial_dir, exist_ok=True)
  extra = {} if config is None else {"settings": json.dumps(settings(config))}
  with (
    atomic.atomic_file(block_path(partial_dir, index)) as tmp,
    open(tmp, "wb") as f,
  ):
    np.savez(
      f,
      fingerprint=key,
      estimates=estimates,
      iterations=iterations,
      seconds=seconds,
      sigmas=sigmas,
      **extra,
    )


def _differences(stored, config):
  """'seed 3 there, 4 here' for each setting that differs (at most 3)."""
  here = settings(config)
  names = [
    n for n in sorted(set(stored) | set(here)) if stored.get(n) != here.get(n)
  ]
  return [
    f"{n} {json.dumps(stored.get(n))} there, {json.dumps(here.get(n))} here"
    for n in names[:3]
  ]


def check_partial(partial_dir, key, config, blocks):
  """Refuses to resume from blocks of another experiment, keeping them.

  Args:
    partial_dir: the folder of finished blocks.
    key: this experiment's `fingerprint`.
    config: its `ExperimentConfig`.
    blocks: its blocks (ranges of run indices).

  Raises:
    ExperimentError: a readable block with another fingerprint (other
      settings, or measurements simulated by another version), or with
      another number of runs (another block size); the blocks stay.
  """
  if partial_dir is None or not os.path.isdir(partial_dir):
    return
  for name in sorted(os.listdir(partial_dir)):
    if not (name.startswith("block-") and name.endswith(".npz")):
      continue
    path = os.path.join(partial_dir, name)
    try:
      with np.load(path) as data:
        stored_key = str(data["fingerprint"])
        runs = len(data["estimates"])
        stored = (
          json.loads(str(data["settings"])) if "settings" in data else None
        )
        index = int(name[len("block-") : -len(".npz")])
    except (OSError, ValueError, KeyError):
      continue  # Unreadable: `load_block` warns and it is recomputed.
    if stored_key != key:
      differ = _differences(stored, config) if stored is not None else []
      why = (
        f" ({'; '.join(differ)})"
        if differ
        else " (other settings or another version's measurements)"
      )
      raise ExperimentError(
        f"--resume: {partial_dir} holds finished blocks of another "
        f"experiment{why}: resume it with its own flags, or move "
        f"{partial_dir} away to start this one; its blocks are kept."
      )
    if index < len(blocks) and runs != len(blocks[index]):
      raise ExperimentError(
        f"--resume: {path} holds {runs} runs but this experiment's block "
        f"{index} has {len(blocks[index])}: resume with the --block_size "
        "it was started with; its blocks are kept."
      )


def load_block(partial_dir, key, index):
  """A saved block of the same experiment, or None."""
  if partial_dir is None or not os.path.exists(block_path(partial_dir, index)):
    return None
  try:
    with np.load(block_path(partial_dir, index)) as data:
      if str(data["fingerprint"]) != key:
        return None
      return {
        k: data[k]
        for k in ("estimates", "iterations", "seconds", "sigmas")
        if k in data
      }
  except (OSError, ValueError, KeyError) as err:
    logging.warning(
      "Ignoring unreadable block %s: %s", block_path(partial_dir, index), err
    )
    return None


def aggregate(runs, snrs, methods):
  """Mean, std and worst error per (SNR, method): the summary rows.

  max_sigma_error is the largest |sigma / sigma_true - 1| of the rows (0
  when EM was given the simulator's sigma).
  """
  summary = []
  for snr in snrs:
    for method in methods:
      rows = [
        r for r in runs if r["snr"] == float(snr) and r["method"] == method
      ]
      errors = [r["error"] for r in rows]
      shifted = [r["error_shift_aligned"] for r in rows]
      sigma_errors = [abs(r["sigma"] / r["sigma_true"] - 1) for r in rows]
      summary.append(
        {
          "snr": float(snr),
          "method": method,
          "mean_error": float(np.mean(errors)),
          "std_error": float(np.std(errors)),
          "max_error": float(np.max(errors)),
          "mean_error_shift_aligned": float(np.mean(shifted)),
          "std_error_shift_aligned": float(np.std(shifted)),
          "max_sigma_error": float(np.max(sigma_errors)),
          "count": len(errors),
        }
      )
  return summary


class _Block(typing.NamedTuple):
  """The outcome of one block of runs."""

  estimates: np.ndarray  # float [runs in block, L, L]
  iterations: np.ndarray  # int [runs in block]
  seconds: float
  sigmas: np.ndarray  # float64 [runs in block], the sigma each ended with


def _multistart_methods(config):
  return [m for m in config.methods if methods.get(m).multistart]


def _load_prior(config, prior):
  """The prior the experiment needs (loaded unless given), or None."""
  if prior is None and (_uses_prior(config) or config.dataset == "gaussian"):
    prior = priors.load_prior(config.prior, config.image_size)
  if prior is not None and int(prior.image_size) != config.image_size:
    raise ExperimentError(
      f"The prior is for {prior.image_size} x {prior.image_size} images; "
      f"the {config.dataset} experiment needs {config.image_size}."
    )
  return prior


def _problem(run):
  """A run's name for EM's callbacks: "<method>/snr_<s>/trial_<i>" (its
  TensorBoard run folder, `summaries`)."""
  return f"{run['method']}/snr_{run['snr']:g}/trial_{run['trial']}"


def _run_single_starts(the_plan, indices, prior, options):
  """Algorithm 1 from one start for the block's runs of such methods, as one
  batched EM execution: (run indices, `em.EMResult`) or None."""
  runs = the_plan.runs
  chosen = [j for j in indices if not methods.get(runs[j]["method"]).multistart]
  if not chosen:
    return None
  use_prior = any(the_plan.prior_weights[j] for j in chosen)
  # One start each: start 0, the given one (as a multistart method's).
  with callbacks.labelled([f"{_problem(runs[j])}/start 0" for j in chosen]):
    result = em.batched_em(
      [the_plan.measurements[j] for j in chosen],
      the_plan.targets.shape[-1],
      the_plan.sigmas[chosen],
      inits=the_plan.inits[chosen],
      m_steps=[the_plan.m_steps[j] for j in chosen],
      prior=prior if use_prior else None,
      prior_weights=the_plan.prior_weights[chosen],
      options=options,
    )
  return chosen, result


def _run_multistart(config, the_plan, indices, prior, options, name):
  """`recovery.multistart_em` for the block's runs of one multistart method:
  (run indices, `recovery.MultiStartResult`) or None."""
  members = [j for j in indices if the_plan.runs[j]["method"] == name]
  if not members:
    return None
  method = methods.get(name)
  em_options, recovery_options = _multistart_options(config, options, method)
  # The problems' names; the method names their starts within them.
  with callbacks.labelled([_problem(the_plan.runs[j]) for j in members]):
    found = recovery.multistart_em(
      [the_plan.measurements[j] for j in members],
      config.image_size,
      the_plan.sigmas[members],
      inits=the_plan.inits[members],
      prior=prior if method.uses_prior else None,
      m_step=method.m_step,
      options=em_options,
      recovery=recovery_options,
    )
  return members, found


def _run_block(config, the_plan, indices, prior, options, problem_iterations):
  """Runs one block of runs; records multistart details in the runs."""
  size = config.image_size
  start = indices.start
  estimates = np.zeros((len(indices), size, size))
  iterations = np.zeros(len(indices), int)
  sigmas = np.asarray(the_plan.sigmas[start : indices.stop], np.float64).copy()
  seconds = 0.0
  single = _run_single_starts(the_plan, indices, prior, options)
  if single is not None:
    chosen, result = single
    estimates[np.asarray(chosen) - start] = result.estimate
    iterations[np.asarray(chosen) - start] = result.iterations
    seconds += result.seconds
  for name in _multistart_methods(config):
    done = _run_multistart(config, the_plan, indices, prior, options, name)
    if done is None:
      continue
    members, found = done
    estimates[np.asarray(members) - start] = found.estimate
    iterations[np.asarray(members) - start] = found.iterations
    seconds += found.seconds
    sigmas[np.asarray(members) - start] = found.sigma
    for j, winner, raw in zip(members, found.winner, found.raw_estimate):
      run = the_plan.runs[j]
      run["winning_start"] = int(winner)
      run["error_before_gauge"] = metrics.relative_error(
        the_plan.targets[run["trial"]],
        raw,
        options.num_rotations,
        angles=_error_angles(config),
      )
    problem_iterations[name] = problem_iterations.get(name, 0) + int(
      found.problem_iterations
    )
  return _Block(estimates, iterations, seconds, sigmas)


def _score_runs(
  the_plan, estimates, iterations, sigmas, seconds, options, angles=None
):
  """Each run's errors, iterations, seconds and sigma, into its record.

  `angles` (radians, or None): both errors also minimise over the
  estimate turned by each (continuous rotations).
  """
  runs = the_plan.runs
  for b, run in enumerate(runs):
    target = the_plan.targets[run["trial"]]
    run["error"] = metrics.relative_error(
      target, estimates[b], options.num_rotations, angles=angles
    )
    run["error_shift_aligned"] = metrics.shift_aligned_error(
      target, estimates[b], options.num_rotations, angles=angles
    )
    run["iterations"] = int(iterations[b])
    run["seconds"] = seconds / len(runs)
    run["sigma"] = float(sigmas[b])


def _asdict(options):
  return {
    k: (v if not callable(v) else getattr(v, "__name__", str(v)))
    for k, v in dataclasses.asdict(options).items()
  }


def _results(
  config, the_plan, prior, options, seconds, blocks, resumed, problem_iterations
):
  """The results.json record of a finished experiment."""
  multistart = _multistart_methods(config)
  return {
    "schema": RESULTS_SCHEMA,
    "dataset": config.dataset,
    "snrs": [float(s) for s in config.snrs],
    "trials": config.trials,
    "seed": config.seed,
    "parameters": {
      **_asdict(options),
      "initialisation": config.initialisation,
      "image_size": config.image_size,
      "size_factor": config.size_factor,
      "density": config.density,
      "min_separation": simulation.min_separation_of(
        config.image_size, config.min_separation
      ),
      "rotations": config.rotations,
      "error_angles": (
        simulation.ERROR_ANGLES if config.rotations == "continuous" else 0
      ),
      "sigma": config.sigma,
      "prior": config.prior if prior is not None else None,
      "methods": list(config.methods),
      "m_steps": {m: methods.get(m).m_step for m in config.methods},
      **(
        {"recommended": _recommended_record(config, options, multistart[0])}
        if multistart
        else {}
      ),
    },
    "problem_iterations": problem_iterations,
    "target_indices": [int(i) for i in the_plan.target_ids],
    "runs": the_plan.runs,
    "summary": aggregate(the_plan.runs, config.snrs, config.methods),
    "seconds": {
      "em_total": seconds,
      "executions": blocks,
      "note": "runs share batched graph executions; per-run "
      "seconds are the total divided by the number of "
      "runs",
    },
    "blocks": {"total": blocks, "resumed": resumed},
    "settings": settings(config),
    "environment": provenance.environment(),
  }


def run_experiment(
  config,
  prior=None,
  *,
  block_size=None,
  partial_dir=None,
  resume=False,
  logdir=None,
):
  """Runs every (SNR, target, method) as batched EM.

  By default all runs form one batch: one graph execution. With
  `block_size`, they run in blocks of that many runs, each saved under
  `partial_dir` when done, so that an interrupted experiment continues
  with `resume=True` from the blocks already finished. Stages: the prior
  (`_load_prior`), the plan (`plan`), each block (`_run_block`, or its
  saved copy), the errors (`_score_runs`) and the record (`_results`).

  Args:
    config: `ExperimentConfig`.
    prior: a loaded prior (default: loaded from config.prior when a method
      or the Gaussian targets need it).
    block_size: runs per batched execution (None or 0: all).
    partial_dir: folder of finished blocks (None: not kept).
    resume: reuse finished blocks of the same experiment from partial_dir.
    logdir: folder of TensorBoard summaries of EM's iterations
      (`em.summaries`), a run folder per problem,
      `<method>/snr_<s>/trial_<i>` (blocks resumed from disk are not run,
      so not written); None: none.

  Returns:
    (results dict as written to results.json, arrays dict with "targets",
    "estimates" [runs, L, L], "measurements" [SNRs, N, N] of target 0).
  """
  if logdir:
    with summaries.writing(logdir):
      return run_experiment(
        config,
        prior,
        block_size=block_size,
        partial_dir=partial_dir,
        resume=resume,
      )
  check_config(config)
  if block_size is not None and int(block_size) < 0:
    raise ExperimentError(f"block_size must be >= 0, got {block_size}.")
  check_memory(config, block_size)
  options = _options(config)
  prior = _load_prior(config, prior)
  the_plan = plan(config, prior)
  runs = the_plan.runs
  block = int(block_size or len(runs))
  blocks = [
    range(i, min(i + block, len(runs))) for i in range(0, len(runs), block)
  ]
  logging.info(
    "%s: %d runs (%d SNRs x %d targets x %d methods), %d batched "
    "EM execution(s).",
    config.dataset,
    len(runs),
    len(config.snrs),
    config.trials,
    len(config.methods),
    len(blocks),
  )
  size = config.image_size
  estimates = np.zeros((len(runs), size, size))
  iterations = np.zeros(len(runs), int)
  # The noise level each returned estimate was computed with: the given
  # one, or the recommended methods' EM estimate when sigma is estimated.
  final_sigmas = np.asarray(the_plan.sigmas, np.float64).copy()  # [runs]
  key = fingerprint(config, the_plan)
  if resume:
    check_partial(partial_dir, key, config, blocks)
  seconds = 0.0
  resumed = 0
  problem_iterations = {}
  for i, indices in enumerate(blocks):
    part = slice(indices.start, indices.stop)
    saved = load_block(partial_dir, key, i) if resume else None
    if saved is not None:
      estimates[part] = saved["estimates"]
      iterations[part] = saved["iterations"]
      if "sigmas" in saved:
        final_sigmas[part] = saved["sigmas"]
      seconds += float(saved["seconds"])
      resumed += 1
      logging.info(
        "block %d/%d: resumed from %s", i + 1, len(blocks), partial_dir
      )
      continue
    done = _run_block(
      config, the_plan, indices, prior, options, problem_iterations
    )
    estimates[part] = done.estimates
    iterations[part] = done.iterations
    final_sigmas[part] = done.sigmas
    seconds += done.seconds
    if partial_dir is not None:
      save_block(
        partial_dir,
        key,
        i,
        done.estimates,
        done.iterations,
        done.seconds,
        done.sigmas,
        config,
      )
    if len(blocks) > 1:
      logging.info(
        "block %d/%d done in %.3g s", i + 1, len(blocks), done.seconds
      )
  _score_runs(
    the_plan,
    estimates,
    iterations,
    final_sigmas,
    seconds,
    options,
    _error_angles(config),
  )
  results = _results(
    config,
    the_plan,
    prior,
    options,
    seconds,
    len(blocks),
    resumed,
    problem_iterations,
  )
  arrays = {
    "targets": the_plan.targets,
    "estimates": estimates,
    "measurements": the_plan.shown,
  }
  return results, arrays


def _multistart_options(config, options, method):
  """(`em.EMOptions`, `recovery.RecoveryOptions`) of a multistart method.

  Without the true sigma EM refines each estimate from the data
  (`em.EMOptions.estimate_sigma`); the paper's methods keep it fixed.
  """
  return methods.em_options(
    method,
    options,
    config.image_size,
    config.sigma == "estimated",
    continuous=config.rotations == "continuous",
  )


def _recommended_record(config, options, name):
  """The options of the multistart methods, for results.json."""
  em_options, recovery_options = _multistart_options(
    config, options, methods.get(name)
  )
  return {
    "em": _asdict(em_options),
    "recovery": dataclasses.asdict(recovery_options),
  }


def write_results(out_dir, results, arrays, reconstruction_snr=None):
  """Writes results.json and the three figures into out_dir, each atomically.

  Returns:
    {file name: path} of what was written.
  """
  os.makedirs(out_dir, exist_ok=True)
  draws = (
    ("error_vs_snr.png", lambda p: figures.error_vs_snr(results, p)),
    (
      "reconstructions.png",
      lambda p: figures.reconstructions(
        results,
        arrays,
        p,
        reconstruction_snr,
        results["parameters"].get("num_rotations", table1.NUM_ROTATIONS),
      ),
    ),
    ("measurements.png", lambda p: figures.measurements(results, arrays, p)),
  )
  names = [name for name, _ in draws] + ["results.json"]
  paths = {name: os.path.join(out_dir, name) for name in names}
  # Replaced as a set: results.json and the figures always come from one run.
  with atomic.atomic_files([paths[n] for n in names]) as tmps:
    for (_, draw), tmp in zip(draws, tmps[:-1], strict=True):
      draw(tmp)
    with open(tmps[-1], "w") as f:
      json.dump(results, f, indent=1)
  return paths


def _lock_folder(out_dir):
  """Locks out_dir for one experiment; a second one is refused in one line.

  The lock is a flock on the folder itself (no lock file is left behind),
  released by the kernel when the process ends, however it ends, so a
  killed run never leaves it stale.

  Returns:
    A callable that releases the lock.
  """
  import fcntl  # pylint: disable=g-import-not-at-top

  fd = os.open(out_dir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise ExperimentError(
      f"{out_dir} is in use by another experiment that is still writing "
      "to it: wait for it to finish or choose another --out_dir."
    ) from None
  return lambda: os.close(fd)


def _remove_if_empty(out_dir):
  """Removes a folder this run created if the run left nothing in it."""
  partial = os.path.join(out_dir, "partial")
  if os.path.isdir(partial) and not os.listdir(partial):
    os.rmdir(partial)
  if not os.listdir(out_dir):
    os.rmdir(out_dir)


def run_to_folder(
  config, out_dir, *, block_size=None, resume=False, logdir=None
):
  """Runs an experiment and writes its results and figures into out_dir.

  Finished blocks are kept in `out_dir/partial` while it runs (so that
  `resume=True` continues an interrupted run) and removed at the end.
  out_dir is locked while the run writes to it (a second run on it raises
  `ExperimentError` before any work); results.json and the figures are
  replaced as a set; a run that fails leaves no folder it created empty.
  With `logdir`, EM's iterations are written there as TensorBoard
  summaries (`run_experiment`).

  Returns:
    (results dict, {file name: path}).
  """
  if logdir:
    summaries.check_logdir(logdir)  # before any work
    with summaries.writing(logdir):
      return run_to_folder(
        config, out_dir, block_size=block_size, resume=resume
      )
  check_config(config)
  out_dir = os.fspath(out_dir)
  parent = os.path.dirname(os.path.abspath(out_dir))
  if not os.path.isdir(parent):
    raise FileNotFoundError(
      f"The parent folder of {out_dir} ({parent}) does "
      "not exist: create it first."
    )
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ExperimentError(
      f"{out_dir} exists and is not a folder: choose another output folder."
    )
  if block_size is not None and int(block_size) < 0:
    raise ExperimentError(f"block_size must be >= 0, got {block_size}.")
  check_memory(config, block_size)
  start = time.perf_counter()
  created = not os.path.isdir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  try:
    release = _lock_folder(out_dir)
  except BaseException:
    if created:
      _remove_if_empty(out_dir)
    raise
  partial_dir = os.path.join(out_dir, "partial")
  try:
    results, arrays = run_experiment(
      config, block_size=block_size, partial_dir=partial_dir, resume=resume
    )
    results["seconds"]["end_to_end"] = time.perf_counter() - start
    paths = write_results(out_dir, results, arrays)
    shutil.rmtree(partial_dir, ignore_errors=True)
  except BaseException:
    # Finished blocks stay for --resume; a folder holding nothing goes.
    if created:
      _remove_if_empty(out_dir)
    raise
  finally:
    release()
  return results, paths


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
      row = next(
        r
        for r in results["summary"]
        if r["snr"] == snr and r["method"] == method
      )
      cell = (
        f"{row['mean_error']:.3f} +- {row['std_error']:.3f} "
        f"[{row['mean_error_shift_aligned']:.3f}]"
      )
      cells.append(f"{cell:>{width}s}")
    lines.append(f"{snr:<8g}" + "".join(cells))
  return "\n".join(lines)
