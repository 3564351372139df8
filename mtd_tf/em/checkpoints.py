"""Checkpoints of a program's EM runs, and resuming it after a crash.

A reconstruction is a deterministic sequence of EM runs (`callbacks.py`):
one run, an accelerator's one-iteration evaluations, or the recommended
method's phases. `Checkpointer` is the callback that saves, every
`every` iterations (and at least every `every_seconds` of work), the
results of the runs that have finished and the loop state of the one in
flight (`loop.LoopState`: iteration, every start's estimate, rho, sigma;
and its history). Run again with the same inputs and options inside the
same `callbacks.active` block, the program begins the same runs in the same
order: the checkpointer hands back the finished runs' results (nothing is
computed again; an accelerator's history is rebuilt from them) and the
state of the run in flight, which continues from there. What the program
does between runs (starts, pruning, the gauge) is recomputed from those
results, deterministically.

The files are TensorFlow checkpoints (`tf.train.Checkpoint` of one variable
per array, written by `tf.train.CheckpointManager`, which records a new
checkpoint only once it is whole and keeps the previous one until then);
they are read back by name with `tf.train.load_checkpoint`, since the
number of runs is known only when reading. A fingerprint of the inputs
and options is saved with them: a checkpoint of another problem is refused.
"""

import hashlib
import json
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from mtd_tf.em import callbacks
from mtd_tf.em import loop as loop_lib
from mtd_tf.em.problem import EMResult

__all__ = [
  "Checkpointer",
  "CheckpointError",
  "DEFAULT_EVERY",
  "DEFAULT_EVERY_SECONDS",
  "fingerprint",
  "has_checkpoint",
  "latest_number",
]

# Iterations between checkpoints, and the most seconds of work between two
# (a checkpoint of a few arrays takes milliseconds).
DEFAULT_EVERY = 10
DEFAULT_EVERY_SECONDS = 120.0
_FORMAT = 1
_RESULT_FIELDS = ("estimate", "iterations", "log_likelihood", "sigma")


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed here (one line: what and what to do)."""


def fingerprint(**parts):
  """A short hash of JSON-able parts (inputs and options) of a program."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def latest_number(directory):
  """The number of the latest checkpoint in `directory` (0: none)."""
  found = tf.train.latest_checkpoint(directory)
  return 0 if found is None else int(found.rsplit("-", 1)[-1])


def has_checkpoint(directory):
  """Whether `directory` holds a checkpoint (`tf.train.latest_checkpoint`)."""
  return bool(directory) and tf.train.latest_checkpoint(directory) is not None


def _digest(batch):
  """What identifies a run's input: its sigmas, starts and prior weights."""
  hasher = hashlib.sha256()
  for array in (batch.sigmas, batch.inits, batch.prior_weights):
    hasher.update(np.ascontiguousarray(array, np.float64).tobytes())
  hasher.update(",".join(batch.m_steps).encode())
  return hasher.hexdigest()[:32]


class Checkpointer(callbacks.Callback):
  """Saves and restores a program's EM runs (module docstring).

  Use it in one `callbacks.active` block around the whole program, with
  `resume=True` to continue from the checkpoint in `directory`.

  Attributes:
    directory: the checkpoint folder.
  """

  def __init__(
    self,
    directory,
    key,
    every=DEFAULT_EVERY,
    every_seconds=DEFAULT_EVERY_SECONDS,
    resume=False,
    number=None,
  ):
    """Opens (and with resume, reads) the checkpoint folder.

    Args:
      directory: the folder of the checkpoints (created on the first save).
      key: the program's `fingerprint`: a checkpoint with another is
        refused.
      every: iterations between checkpoints (>= 1).
      every_seconds: the most seconds of work between two checkpoints
        (None: by iterations alone, as multi-worker runs need, whose
        workers must save at the same iterations).
      resume: read the latest checkpoint and continue from it (False: a
        folder holding one is refused, so a run is never overwritten by
        mistake).
      number: with resume, the checkpoint to read (None: the latest; the
        workers of a multi-worker run agree on one, `distributed.
        checkpointer`).

    Raises:
      CheckpointError: resume without a checkpoint, a checkpoint without
        resume, or one of another problem or format.
    """
    self.directory = os.fspath(directory)
    self._key = str(key)
    self._every = int(every)
    if self._every < 1:
      raise CheckpointError(f"checkpoint_every must be >= 1, got {every}.")
    self._every_seconds = every_seconds
    self._finished = []  # [(digest, EMResult)] of runs 0, 1, ...
    self._flight = None  # (index, digest, state, rows, seconds)
    self._resumed = None  # what the checkpoint holds, until replayed
    self._since = 0  # iterations since the last save
    self._saved_at = time.monotonic()
    self._number = 0
    found = tf.train.latest_checkpoint(self.directory)
    if resume and found is not None and number is not None:
      found = f"{found.rsplit('-', 1)[0]}-{int(number)}"
      if not tf.io.gfile.exists(f"{found}.index"):
        raise CheckpointError(
          f"{self.directory} has no checkpoint {number}: remove the "
          "checkpoint folders to start afresh."
        )
    if resume:
      if found is None:
        raise CheckpointError(
          f"--resume: no checkpoint in {self.directory}; run without "
          "--resume to start afresh."
        )
      self._resumed = self._read(found)
    elif found is not None:
      raise CheckpointError(
        f"{self.directory} holds the checkpoint of an unfinished run: pass "
        "--resume to continue it, or remove the folder to start afresh."
      )

  # Callback methods.

  def on_run_begin(self, run):
    if self._resumed is None:
      return None
    digest = _digest(run.batch)
    finished, flight = self._resumed
    if run.index < len(finished):
      saved_digest, result = finished[run.index]
      self._check(run, digest, saved_digest)
      self._finished.append((digest, result))
      return result
    if flight is not None and run.index == flight[0]:
      self._check(run, digest, flight[1])
      self._resumed = None  # replayed: from here on the program runs
      self._flight = (run.index, digest) + tuple(flight[2:])
      return callbacks.Resume(*flight[2:])
    self._resumed = None
    return None

  def on_segment_end(self, run, state, rows, seconds):
    previous = self._flight
    ran = int(state.tau) - (
      int(previous[2].tau)
      if previous is not None and previous[0] == run.index
      else run.start_iteration
    )
    self._flight = (
      run.index,
      _digest(run.batch),
      loop_lib.LoopState(*[np.asarray(t) for t in state]),
      list(rows),
      float(seconds),
    )
    self._since += max(ran, 0)
    self._save_if_due()

  def on_run_end(self, run, result):
    self._finished.append((_digest(run.batch), result))
    self._flight = None
    self._save_if_due()

  # The rest.

  @property
  def has_progress(self):
    """Whether a run has finished or a segment ended (there is work to keep)."""
    return bool(self._finished) or self._flight is not None

  def save(self):
    """Writes a checkpoint of everything seen so far, now."""
    arrays = {"key": tf.Variable(self._key, dtype=tf.string)}
    meta = {"format": _FORMAT, "runs": len(self._finished), "flight": None}
    for index, (digest, result) in enumerate(self._finished):
      meta[f"digest_{index}"] = digest
      meta[f"seconds_{index}"] = float(result.seconds)
      for field in _RESULT_FIELDS:
        arrays[f"run_{index}_{field}"] = _variable(getattr(result, field))
    if self._flight is not None:
      index, digest, state, rows, seconds = self._flight
      meta.update(flight=index, flight_digest=digest, flight_seconds=seconds)
      for field, value in zip(loop_lib.LoopState._fields, state):
        arrays[f"flight_{field}"] = _variable(value)
      arrays["flight_rows"] = _variable(
        np.concatenate(rows) if rows else np.zeros((0,))
      )
    arrays["meta"] = tf.Variable(json.dumps(meta), dtype=tf.string)
    checkpoint = tf.train.Checkpoint(**arrays)
    manager = tf.train.CheckpointManager(
      checkpoint, self.directory, max_to_keep=2
    )
    self._number += 1
    manager.save(checkpoint_number=self._number)
    self._since = 0
    self._saved_at = time.monotonic()

  def remove(self):
    """Removes the checkpoint folder (a finished program's)."""
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        path = os.path.join(self.directory, name)
        if os.path.isfile(path):
          os.remove(path)
      try:
        os.rmdir(self.directory)
      except OSError:
        pass

  def _save_if_due(self):
    seconds = time.monotonic() - self._saved_at
    due = self._since >= self._every or (
      self._every_seconds is not None
      and self._since > 0
      and seconds >= self._every_seconds
    )
    if due:
      self.save()

  def _check(self, run, digest, saved):
    if digest != saved:
      raise CheckpointError(
        f"The checkpoint in {self.directory} does not match this run (EM "
        f"run {run.index} starts elsewhere): remove the folder to start "
        "afresh."
      )

  def _read(self, prefix):
    """(finished [(digest, EMResult)], flight or None) of a checkpoint."""
    reader = tf.train.load_checkpoint(prefix)

    def value(name):
      return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    try:
      key = value("key").decode()
      meta = json.loads(value("meta").decode())
    except (tf.errors.OpError, ValueError, KeyError) as err:
      raise CheckpointError(
        f"{self.directory} holds no readable checkpoint of this tool "
        f"({err.__class__.__name__}): remove it to start afresh."
      ) from None
    if meta.get("format") != _FORMAT:
      raise CheckpointError(
        f"{self.directory} holds a checkpoint of format {meta.get('format')}"
        f", not {_FORMAT}: remove it to start afresh."
      )
    if key != self._key:
      raise CheckpointError(
        f"The checkpoint in {self.directory} is of other inputs or options; "
        "resume with the same ones, or remove it to start afresh."
      )
    self._number = int(prefix.rsplit("-", 1)[-1])
    finished = []
    for index in range(int(meta["runs"])):
      fields = {f: value(f"run_{index}_{f}") for f in _RESULT_FIELDS}
      finished.append(
        (
          meta[f"digest_{index}"],
          EMResult(
            estimate=fields["estimate"],
            iterations=fields["iterations"],
            log_likelihood=fields["log_likelihood"],
            seconds=float(meta[f"seconds_{index}"]),
            sigma=fields["sigma"],
          ),
        )
      )
    flight = None
    if meta["flight"] is not None:
      state = loop_lib.LoopState(
        *[value(f"flight_{f}") for f in loop_lib.LoopState._fields]
      )
      rows = value("flight_rows")
      flight = (
        int(meta["flight"]),
        meta["flight_digest"],
        state,
        [rows] if rows.size else [],
        float(meta["flight_seconds"]),
      )
    logging.info(
      "Resuming from %s: %d EM run(s) finished, %s.",
      prefix,
      len(finished),
      "one in flight at iteration %d" % int(flight[2].tau)
      if flight
      else "none in flight",
    )
    return finished, flight


def _variable(value):
  """A checkpoint variable of a numpy value (None as an empty array)."""
  array = np.asarray(np.nan if value is None else value)
  return tf.Variable(array, trainable=False)
