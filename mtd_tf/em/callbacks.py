"""Callbacks on EM's runs: where TensorBoard summaries and checkpoints hook in.

As Keras's callbacks watch `Model.fit`, these watch `runner.run_loop`, the
one place every compiled EM run of a program goes through (a front end,
each evaluation of an accelerator, each phase of the recommended method).
They are active inside a ``with callbacks.active([...]):`` block (a
context variable), so that the front ends, the accelerators and the
recommended method need not pass them down.

The runs of a block are numbered in the order they begin. A deterministic
program (EM on the same inputs with the same options) begins the same runs
in the same order when it is run again: that is what lets a checkpoint
(`checkpoints.py`) hand back the runs that had finished and the state of
the one in flight instead of running them again.
"""

import contextlib
import contextvars
import dataclasses
import typing

import numpy as np

__all__ = [
  "Callback",
  "Resume",
  "Run",
  "active",
  "labelled",
  "current",
  "current_labels",
]


@dataclasses.dataclass(frozen=True)
class Run:
  """What a callback learns of a run when it begins.

  Attributes:
    index: the run's number in its `active` block (0, 1, ...).
    batch: the `problem.ProblemBatch` (B problems: sigmas, inits, M-steps,
      prior weights).
    start_iteration: tau of its first iteration (> 0: a run that continues
      earlier iterations, as the recommended method's phase 2).
    total: the iteration it stops at (T in all).
    labels: B names of the problems (`labelled`; default "0", "1", ...).
    t_prior: float64 numpy [T], the prior's diffusion time at each
      iteration (None without a prior).
    prior_weight: float64 numpy [T, B], gamma(tau) times each problem's
      prior weight, the prior's weight in the M-step of eq. (18) (None
      without a prior).
  """

  index: int
  batch: typing.Any
  start_iteration: int
  total: int
  labels: tuple
  t_prior: typing.Optional[np.ndarray] = None
  prior_weight: typing.Optional[np.ndarray] = None


class Resume(typing.NamedTuple):
  """Where a run in flight stood: the loop state and its history so far.

  Attributes:
    state: a `loop.LoopState` of numpy arrays (the last finished segment).
    rows: list of float64 numpy [n, B, F] history blocks (`loop.
      HISTORY_FIELDS`) of the iterations before it.
    seconds: the run's wall time so far.
  """

  state: typing.Any
  rows: list
  seconds: float


class Callback:
  """Base class: every method does nothing (override what you need)."""

  def on_run_begin(self, run):
    """Called as `run` begins.

    Returns:
      None (run it), a finished `problem.EMResult` (the run is not run: its
      result is this), or a `Resume` (continue from that state).
    """
    del run
    return None

  def on_segment_end(self, run, state, rows, seconds):
    """Called after each compiled segment of `run`.

    Args:
      run: the `Run`.
      state: the `loop.LoopState` (tensors) after the segment.
      rows: list of float64 numpy [n, B, F] history blocks of the whole
        run so far (`loop.HISTORY_FIELDS`).
      seconds: the run's wall time so far.
    """
    del run, state, rows, seconds

  def on_run_end(self, run, result):
    """Called when `run` has finished with the `problem.EMResult` result."""
    del run, result


class _Block:
  """The callbacks of one `active` block and its run counter."""

  def __init__(self, callbacks):
    self.callbacks = tuple(callbacks)
    self.runs = 0


_BLOCK = contextvars.ContextVar("mtd_tf_em_callbacks", default=None)
_LABELS = contextvars.ContextVar("mtd_tf_em_labels", default=None)


@contextlib.contextmanager
def active(callbacks):
  """Makes `callbacks` (a list of `Callback`) watch the EM runs inside.

  Blocks nest: an inner block's callbacks replace the outer's, and its runs
  are numbered from 0.
  """
  callbacks = [c for c in callbacks if c is not None]
  for callback in callbacks:
    if not isinstance(callback, Callback):
      raise TypeError(
        f"Expected em.callbacks.Callback objects, got {type(callback)}."
      )
  token = _BLOCK.set(_Block(callbacks) if callbacks else None)
  try:
    yield
  finally:
    _BLOCK.reset(token)


@contextlib.contextmanager
def labelled(labels):
  """Names the B problems of the runs begun inside (e.g. "start 3")."""
  token = _LABELS.set(tuple(str(label) for label in labels))
  try:
    yield
  finally:
    _LABELS.reset(token)


def current():
  """The active block's callbacks (an empty tuple outside any block)."""
  block = _BLOCK.get()
  return block.callbacks if block is not None else ()


def current_labels():
  """The labels of the innermost `labelled` block (None outside any).

  A method that runs its problems' starts as one batch names them from
  these (`recovery.recommended`: "<problem>/start 3").
  """
  return _LABELS.get()


def begin(batch, start_iteration, total, t_prior=None, prior_weight=None):
  """Numbers a new run and asks each callback how it begins (`runner`).

  Returns:
    (`Run` or None outside a block, None or the first callback's
    `EMResult` or `Resume`).
  """
  block = _BLOCK.get()
  if block is None:
    return None, None
  labels = _LABELS.get()
  if labels is None or len(labels) != batch.size:
    labels = tuple(str(b) for b in range(batch.size))
  run = Run(
    index=block.runs,
    batch=batch,
    start_iteration=int(start_iteration),
    total=int(total),
    labels=labels,
    t_prior=t_prior,
    prior_weight=prior_weight,
  )
  block.runs += 1
  outcome = None
  for callback in block.callbacks:
    answer = callback.on_run_begin(run)
    if outcome is None:
      outcome = answer
  return run, outcome


def segment_end(run, state, rows, seconds):
  """Tells every callback that a segment of `run` finished (`runner`)."""
  for callback in current():
    callback.on_segment_end(run, state, rows, seconds)


def end(run, result):
  """Tells every callback that `run` finished (`runner`)."""
  for callback in current():
    callback.on_run_end(run, result)
