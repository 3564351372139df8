"""TensorBoard summaries of EM's iterations: a callback on EM's runs.

`TensorBoard(logdir)` is a `callbacks.Callback`: inside
``with callbacks.active([board]):`` (or `writing(logdir)`) it writes, for
every EM iteration tau of every problem, the paper's quantities

  em/log_likelihood          log p(M; F(tau)), the data log-likelihood (eq.
                             13) of the problem's leading start (the highest
                             of its starts still running)
  em/relative_change         ||F(tau+1) - F(tau)|| / ||F(tau)||, EM's stop rule
  em/sigma                   the noise level the E-step of tau used
  em/empty_probability       epsilon, the shift prior rho's mass on patches
                             without a copy (eq. 14)
  em/seconds_per_iteration   wall time per iteration of the segment (of
                             the whole run: problems batched together
                             share it)
  prior/weight               gamma(tau) lambda, the prior's weight in the
                             M-step (eq. 18); only with a prior
  prior/diffusion_time       t(tau), the time of the score in eq. (18)
  starts/<start>             each start's log-likelihood (eq. 13): a start
                             that is pruned or stops has a curve that stops
  estimate/<start>           F(tau) as an image scaled to [0, 1], at the
                             start, every `image_every` iterations (at most
                             once per compiled segment: the estimates exist
                             only between segments) and the last

After the recommended method's prune point the survivors' log-likelihood
is the composite one over its offset grids (`recovery.recommended`), so
their curves step there.

Problems are named by their labels (`callbacks.labelled`):
"<problem>/<start>" (the problem may hold "/": "recommended/snr_1/trial_0/
start 2") or just "<start>". Each problem gets its own TensorBoard run, the
folder `logdir/<problem>` (`logdir` itself for a bare "<start>"), with one
`tf.summary` writer, flushed at every segment end and closed by `close`.

Steps are iterations: tau for a run that continues earlier ones (the
recommended method's survivors from the prune point on), and a running
count per problem where runs begin again at tau 0 (an accelerator's
one-iteration evaluations, `accelerated.py`), so each writer's steps only
grow. Only iterations not yet written are written at each segment end
(a run resumed from a checkpoint, `checkpoints.py`, writes its earlier
iterations again, at the same steps: TensorBoard keeps the later values).

Summaries are written with `tf.summary.write` and the metadata of
TensorBoard's scalar and image plugins, as `tf.summary.scalar` and
`tf.summary.image` write them: those two need the `tensorboard` package,
`tf.summary.write` does not, so the package is needed only to view the
files (`pip install mtd_tf[tensorboard]`). Scalars are float32, as
TensorBoard reads them (its data server takes float32 scalars only).
"""

import contextlib
import dataclasses
import os
import typing

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

from mtd_tf.em import callbacks as callbacks_lib

__all__ = [
  "TensorBoard",
  "writing",
  "check_logdir",
  "split_label",
  "read_events",
  "LOG_LIKELIHOOD",
  "RELATIVE_CHANGE",
  "SIGMA",
  "EMPTY_PROBABILITY",
  "SECONDS",
  "PRIOR_WEIGHT",
  "DIFFUSION_TIME",
  "SCALAR_TAGS",
  "PRIOR_TAGS",
  "START_TAG",
  "IMAGE_TAG",
  "IMAGE_EVERY",
]

LOG_LIKELIHOOD = "em/log_likelihood"
RELATIVE_CHANGE = "em/relative_change"
SIGMA = "em/sigma"
EMPTY_PROBABILITY = "em/empty_probability"
SECONDS = "em/seconds_per_iteration"
PRIOR_WEIGHT = "prior/weight"
DIFFUSION_TIME = "prior/diffusion_time"
# The scalars of every problem at every iteration (in `loop.HISTORY_FIELDS`
# order, then the time), and those of a run with a prior.
SCALAR_TAGS = (
  LOG_LIKELIHOOD,
  RELATIVE_CHANGE,
  SIGMA,
  EMPTY_PROBABILITY,
  SECONDS,
)
PRIOR_TAGS = (PRIOR_WEIGHT, DIFFUSION_TIME)
START_TAG = "starts/{}"
IMAGE_TAG = "estimate/{}"
# Estimates are drawn every this many iterations (and the first and last).
IMAGE_EVERY = 5

# The metadata TensorBoard's own scalar and image summaries carry: the
# plugin that shows them and how its data server stores them.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
  plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
  data_class=summary_pb2.DATA_CLASS_SCALAR,
)
_IMAGE_METADATA = summary_pb2.SummaryMetadata(
  plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
  data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
)


def check_logdir(logdir):
  """Refuses a log folder that cannot be written, before any work.

  Args:
    logdir: the folder (created with its parents when missing).

  Returns:
    The absolute path.

  Raises:
    ValueError: logdir, or a folder above it, is a file.
    PermissionError: its nearest existing folder is not writable.
  """
  path = os.path.abspath(os.fspath(logdir))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "" if existing == path else f" ({existing} is a file)"
    raise ValueError(
      f"logdir {logdir} is not a folder{where}: give a folder for "
      "TensorBoard's event files."
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(
      f"logdir {logdir}: {existing} is not writable; choose another folder."
    )
  return path


def split_label(label):
  """(problem, start) of a label "<problem>/<start>" or "<start>".

  The problem is everything before the last "/" ("" for a bare start).
  """
  problem, _, start = str(label).rpartition("/")
  return problem, start


def _folder(logdir, problem):
  """The run folder of a problem: its name's parts under logdir."""
  # No part may climb out of logdir.
  parts = [p for p in problem.split("/") if p not in ("", ".", "..")]
  return os.path.join(logdir, *parts)


def _scalar(tag, value, step):
  tf.summary.write(
    tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA
  )


def _image(tag, image, step):
  """Writes image [L, L] scaled to [0, 1] (a constant one mid-grey)."""
  image = np.asarray(image, np.float64)
  low, high = float(image.min()), float(image.max())
  scaled = (
    (image - low) / (high - low) if high > low else np.full_like(image, 0.5)
  )
  pixels = np.round(255 * scaled).astype(np.uint8)[:, :, None]  # [L, L, 1]
  height, width = image.shape
  # The image plugin's blob sequence: width, height, then the PNGs.
  blobs = tf.stack(
    [
      tf.constant(str(width)),
      tf.constant(str(height)),
      tf.io.encode_png(pixels),
    ]
  )  # string [3]
  tf.summary.write(tag, blobs, step=step, metadata=_IMAGE_METADATA)


@dataclasses.dataclass
class _RunLog:
  """What the callback keeps of a run in progress."""

  starts: list  # (problem, start) of each of the B problems
  groups: dict  # problem -> int [S] its starts' indices in the batch
  offsets: dict  # problem -> step of tau = 0 (step = offset + tau)
  written: int = 0  # iterations of the run already written
  seconds: float = 0.0  # the run's wall time at the last segment end


@dataclasses.dataclass
class _Estimate:
  """A start's latest estimate and the step of the last one drawn."""

  step: int
  image: np.ndarray  # float [L, L]
  drawn: typing.Optional[int] = None


class TensorBoard(callbacks_lib.Callback):
  """Writes TensorBoard summaries of EM's iterations (module docstring).

  Args:
    logdir: the folder of the runs (created when first written).
    image_every: draw each start's estimate every this many iterations (at
      most once per compiled segment), besides its first and last.
  """

  def __init__(self, logdir, image_every=IMAGE_EVERY):
    self.logdir = check_logdir(logdir)
    if isinstance(image_every, bool) or int(image_every) < 1:
      raise ValueError(f"image_every must be >= 1, got {image_every!r}.")
    self.image_every = int(image_every)
    self._writers = {}  # problem -> tf.summary writer, made when first used
    self._next_step = {}  # problem -> the step after the last one written
    self._estimates = {}  # (problem, start) -> _Estimate
    self._runs = {}  # id(run) -> _RunLog of the runs in progress

  def _writer(self, problem):
    if problem not in self._writers:
      self._writers[problem] = tf.summary.create_file_writer(
        _folder(self.logdir, problem)
      )
    return self._writers[problem]

  def on_run_begin(self, run):
    starts = [split_label(label) for label in run.labels]
    groups = {}
    for b, (problem, _) in enumerate(starts):
      groups.setdefault(problem, []).append(b)
    # A run that begins at a tau already written (an accelerator's next
    # evaluation) continues the problem's count instead.
    offsets = {
      problem: max(self._next_step.get(problem, 0) - run.start_iteration, 0)
      for problem in groups
    }
    self._runs[id(run)] = _RunLog(
      starts, {p: np.array(m) for p, m in groups.items()}, offsets
    )
    # Each start's first estimate: where EM begins (a start, a window).
    inits = np.asarray(run.batch.inits)  # [B, L, L]
    for b, key in enumerate(starts):
      if key not in self._estimates:
        step = offsets[key[0]] + run.start_iteration
        self._estimates[key] = _Estimate(step, inits[b])
        self._draw(key)
    return None

  def _draw(self, key):
    """Writes a start's latest estimate if it was not drawn yet."""
    estimate = self._estimates[key]
    if estimate.drawn is not None and estimate.drawn >= estimate.step:
      return
    problem, start = key
    with self._writer(problem).as_default():
      _image(IMAGE_TAG.format(start), estimate.image, estimate.step)
    estimate.drawn = estimate.step

  def on_segment_end(self, run, state, rows, seconds):
    log = self._runs.get(id(run))
    if log is None or not rows:
      return
    history = np.concatenate(rows)  # [n, B, F]
    new = history[log.written :]
    if len(new):
      per_iteration = (seconds - log.seconds) / len(new)
      for i, row in enumerate(new, start=log.written):  # row [B, F]
        tau = run.start_iteration + i
        for problem in log.groups:
          self._write_iteration(run, log, problem, tau, row, per_iteration)
    log.written, log.seconds = len(history), seconds
    # The estimates after the segment: F(start_iteration + iterations).
    images = state.images.numpy()  # [B, L, L]
    iterations = state.iterations.numpy()  # [B]
    for b, key in enumerate(log.starts):
      step = log.offsets[key[0]] + run.start_iteration + int(iterations[b])
      estimate = self._estimates[key]
      if step <= estimate.step:
        continue  # a start that has stopped
      estimate.step, estimate.image = step, images[b]
      if estimate.drawn is None or step - estimate.drawn >= self.image_every:
        self._draw(key)
    for problem in log.groups:
      self._writer(problem).flush()

  def _write_iteration(self, run, log, problem, tau, row, seconds):
    """The scalars of one problem at iteration tau; row float [B, F]."""
    members = log.groups[problem]  # int [S]
    log_likelihood = row[members, 0]  # [S]
    running = np.isfinite(log_likelihood)
    if not running.any():
      return  # every start of the problem has stopped
    lead = members[int(np.nanargmax(log_likelihood))]
    step = log.offsets[problem] + tau
    with self._writer(problem).as_default():
      _scalar(LOG_LIKELIHOOD, row[lead, 0], step)
      _scalar(RELATIVE_CHANGE, row[lead, 1], step)
      _scalar(SIGMA, row[lead, 2], step)
      _scalar(EMPTY_PROBABILITY, row[lead, 3], step)
      _scalar(SECONDS, seconds, step)
      if run.t_prior is not None:
        at = min(tau, len(run.t_prior) - 1)
        _scalar(PRIOR_WEIGHT, run.prior_weight[at, lead], step)
        _scalar(DIFFUSION_TIME, run.t_prior[at], step)
      for b in members[running]:
        _scalar(START_TAG.format(log.starts[b][1]), row[b, 0], step)
    self._next_step[problem] = max(self._next_step.get(problem, 0), step + 1)

  def on_run_end(self, run, result):
    del result
    self._runs.pop(id(run), None)

  def close(self):
    """Draws each start's last estimate and closes the writers."""
    for key in self._estimates:
      self._draw(key)
    for writer in self._writers.values():
      writer.close()
    self._writers, self._estimates, self._runs = {}, {}, {}


def read_events(folder):
  """The summaries of one run folder, read back without TensorBoard.

  Args:
    folder: a run folder (`logdir/<problem>`) holding event files.

  Returns:
    {tag: list of (step, value)} in step order: value a float for a
    scalar, uint8 [H, W] for an image (a step written again, by a resumed
    run, keeps its last value).
  """
  found = {}
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  for name in names:
    if not name.startswith("events.out.tfevents."):
      continue
    for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor)
        if value.metadata.plugin_data.plugin_name == "images":
          data = tf.io.decode_png(tensor[2]).numpy()[..., 0]  # [H, W]
        else:
          data = float(tensor)
        found.setdefault(value.tag, {})[int(event.step)] = data
  return {tag: sorted(points.items()) for tag, points in found.items()}


@contextlib.contextmanager
def writing(logdir, image_every=IMAGE_EVERY):
  """Writes summaries of the EM runs inside into logdir (None: nothing).

  The `TensorBoard` callback joins the callbacks already active (in a
  nested `callbacks.active` block) and is closed on the way out, however
  the block ends.

  Yields:
    The `TensorBoard` callback, or None without a logdir.
  """
  if not logdir:
    yield None
    return
  board = TensorBoard(logdir, image_every)
  try:
    with callbacks_lib.active([*callbacks_lib.current(), board]):
      yield board
  finally:
    board.close()
