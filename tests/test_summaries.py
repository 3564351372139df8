"""EM shows its work in TensorBoard: the event files, read back."""

import collections
import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf.base import table1
from mtd_tf.em import callbacks
from mtd_tf.em import loop
from mtd_tf.em import summaries
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import experiments
from mtd_tf.pipelines import figures
from mtd_tf.pipelines import reconstruction
from mtd_tf.recovery import methods
from mtd_tf.recovery import recommended

SIZE = 5
ITERATIONS = 16

Point = collections.namedtuple("Point", "step value")


def _events(folder):
  """{tag: [Point]} of the event files directly in folder, and the plugin
  of each tag. Scalars are floats, images uint8 arrays [H, W]."""
  tags, plugins = collections.defaultdict(list), {}
  files = sorted(pathlib.Path(folder).glob("events.out.tfevents.*"))
  assert files, f"no event files in {folder}"
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        plugins.setdefault(value.tag, plugin)
        tensor = tf.make_ndarray(value.tensor)
        if plugin == "images":
          width, height = int(tensor[0]), int(tensor[1])
          data = tf.io.decode_png(tensor[2]).numpy()[..., 0]
          assert data.shape == (height, width)
          tags[value.tag].append(Point(event.step, data))
        else:
          tags[value.tag].append(Point(event.step, float(tensor)))
  return dict(tags), plugins


def _steps(points):
  return [p.step for p in points]


def _values(points):
  return np.array([p.value for p in points])


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
  folder = tmp_path_factory.mktemp("summaries")
  rng = np.random.default_rng(1234)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  sim = simulation.simulate_measurement(image, snr=20.0, seed=2)
  path = folder / "m.npz"
  io.save_measurement(path, sim)
  return path, sim


def test_recommended_method_draws_every_start_until_it_is_pruned(
  measurement, tmp_path, run_tool
):
  path, _ = measurement
  logdir = tmp_path / "runs"
  done = run_tool(
    "mtd_tf.reconstruct",
    f"--measurement={path}",
    f"--image_size={SIZE}",
    f"--out={tmp_path / 'est.npz'}",
    f"--max_iterations={ITERATIONS}",
    "--tolerance=0",
    f"--logdir={logdir}",
    "--quiet",
  )
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.splitlines()[-1])
  assert summary["iterations"] == ITERATIONS
  # One problem: one TensorBoard run, the logdir itself.
  assert not [p for p in logdir.iterdir() if p.is_dir()]
  tags, plugins = _events(logdir)
  for tag in summaries.SCALAR_TAGS:
    assert _steps(tags[tag]) == list(range(ITERATIONS)), tag
    assert plugins[tag] == "scalars"
  assert not set(summaries.PRIOR_TAGS) & set(tags)  # no prior
  # The leading start's log-likelihood ends at the winner's.
  final = tags[summaries.LOG_LIKELIHOOD][-1].value
  assert final == pytest.approx(summary["final_log_likelihood"], rel=1e-6)
  # Every start has a curve; all but the survivor stop at the prune point.
  _, recovery = methods.em_options(
    methods.for_prior("recommended", False), em.EMOptions(), SIZE
  )
  prune_at, keep = int(recovery.prune_at), int(recovery.keep)
  curves = {t: p for t, p in tags.items() if t.startswith("starts/")}
  assert len(curves) == 1 + recovery.num_windows
  lasts = sorted(_steps(points)[-1] for points in curves.values())
  assert lasts == [prune_at - 1] * (len(curves) - keep) + [ITERATIONS - 1]
  for tag, points in curves.items():
    assert _steps(points) == list(range(len(points))), tag
    assert np.all(np.isfinite(_values(points)))
  survivor = max(curves, key=lambda t: len(curves[t]))
  assert curves[survivor][-1].value == pytest.approx(final, rel=1e-6)
  # Each start's estimate: where it began, and later ones.
  for tag in curves:
    start = tag.split("/", 1)[1]
    images = tags[summaries.IMAGE_TAG.format(start)]
    assert plugins[summaries.IMAGE_TAG.format(start)] == "images"
    assert images[0].step == 0 and len(images) >= 2
    assert _steps(images) == sorted(set(_steps(images)))
    for image in images:
      assert image.value.shape == (SIZE, SIZE)
      assert image.value.min() == 0 and image.value.max() == 255
  survivor_images = tags[summaries.IMAGE_TAG.format(survivor.split("/")[1])]
  assert survivor_images[-1].step == ITERATIONS


def test_accelerated_single_start_counts_its_evaluations(measurement, tmp_path):
  path, _ = measurement
  config = reconstruction.ReconstructionConfig(
    measurements=(str(path),),
    image_size=SIZE,
    out=str(tmp_path / "est.npz"),
    method="paper",
    checkpoint_every=0,
    logdir=str(tmp_path / "runs"),
    em=dict(
      max_iterations=ITERATIONS,
      m_step="closed_form",
      acceleration="squarem",
      progress_every=0,
    ),
  )
  summary = reconstruction.reconstruct(config)
  tags, _ = _events(tmp_path / "runs")
  # Every evaluation is a one-iteration run from tau 0: the steps count
  # them (and the log-likelihood at the estimate returned, the last).
  points = tags[summaries.LOG_LIKELIHOOD]
  assert len(points) > 2
  for tag in summaries.SCALAR_TAGS + ("starts/0",):
    assert _steps(tags[tag]) == list(range(len(points))), tag
  assert points[-1].value == pytest.approx(
    summary["final_log_likelihood"], rel=1e-6
  )
  # Each accelerator step's log-likelihood (its start) is an evaluation's.
  with np.load(config.out) as saved:
    history = saved["log_likelihood"].reshape(-1)
  written = _values(points)
  for value in history:
    assert np.min(np.abs(written - value) / abs(value)) < 1e-6
  images = tags[summaries.IMAGE_TAG.format("0")]
  assert images[0].step == 0 and images[-1].step == len(points)


class _Recorder(callbacks.Callback):
  """Keeps each run and its last segment's history."""

  def __init__(self):
    self.runs, self.rows = [], None

  def on_run_begin(self, run):
    self.runs.append(run)

  def on_segment_end(self, run, state, rows, seconds):
    self.rows = np.concatenate(rows)  # [T, B, F]


def test_scalars_are_the_runs_history_and_prior_schedule(tmp_path):
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  sim = simulation.simulate_measurement(image, snr=3.0, seed=4)
  prior = priors.GaussianPrior(np.full((SIZE, SIZE), 0.5))
  options = em.EMOptions(
    max_iterations=12,
    tolerance=0.0,
    dtype="float64",
    gamma="linear",
    t_prior=table1.T_PRIOR,
    progress_every=0,
  )
  recorder = _Recorder()
  board = summaries.TensorBoard(tmp_path, image_every=4)
  with callbacks.active([recorder, board]):
    result = em.approximate_em(
      sim.measurement, SIZE, sim.sigma, init=image, prior=prior, options=options
    )
  board.close()
  tags, _ = _events(tmp_path)
  history = recorder.rows[:, 0]  # [T, F]
  for f, field in enumerate(loop.HISTORY_FIELDS):
    points = tags[f"em/{field}"]
    assert _steps(points) == list(range(12))
    np.testing.assert_allclose(_values(points), history[:, f], rtol=1e-6)
  np.testing.assert_allclose(
    _values(tags[summaries.LOG_LIKELIHOOD]), result.log_likelihood, rtol=1e-6
  )
  run = recorder.runs[0]
  np.testing.assert_allclose(
    _values(tags[summaries.PRIOR_WEIGHT]), run.prior_weight[:, 0], rtol=1e-6
  )
  np.testing.assert_allclose(
    _values(tags[summaries.DIFFUSION_TIME]), run.t_prior, rtol=1e-6
  )
  # gamma "linear" grows the weight with tau (eq. 18).
  assert np.all(np.diff(_values(tags[summaries.PRIOR_WEIGHT])) > 0)
  assert np.all(_values(tags[summaries.SECONDS]) > 0)
  # The last image is the estimate, scaled to [0, 1] (then 0..255).
  last_tag = summaries.IMAGE_TAG.format("0")
  last = tags[last_tag][-1]
  assert last.step == 12
  estimate = result.estimate
  scaled = (estimate - estimate.min()) / (estimate.max() - estimate.min())
  np.testing.assert_array_equal(
    last.value, np.round(255 * scaled).astype(np.uint8)
  )
  # Read back without TensorBoard, and drawn as its dashboard shows it.
  events = summaries.read_events(tmp_path)
  assert set(events) == set(tags)
  for tag, points in tags.items():
    assert [step for step, _ in events[tag]] == _steps(points)
  np.testing.assert_array_equal(events[last_tag][-1][1], last.value)
  drawn = figures.tensorboard_run(events, str(tmp_path / "board.png"))
  assert pathlib.Path(drawn).stat().st_size > 10_000


def test_experiment_writes_a_run_per_problem(tmp_path, monkeypatch):
  multistart_options = experiments._multistart_options  # pylint: disable=protected-access

  def quick(*args):
    # The recommended method in brief: 8 iterations, pruned at 4, one grid.
    em_options, recovery = multistart_options(*args)
    return dataclasses.replace(em_options, max_iterations=8), (
      dataclasses.replace(recovery, prune_at=4, grids_per_axis=1)
    )

  monkeypatch.setattr(experiments, "_multistart_options", quick)
  config = experiments.default_config(
    "gaussian",
    snrs=(1.0, 10.0),
    trials=1,
    seed=3,
    methods=("no_prior", "recommended_no_prior"),
    options=em.EMOptions(max_iterations=8, t_prior=table1.T_PRIOR),
  )
  prior = priors.GaussianPrior(np.arange(25.0).reshape(5, 5) % 5)
  logdir = tmp_path / "runs"
  experiments.run_experiment(config, prior=prior, logdir=str(logdir))
  folders = sorted(
    str(p.parent.relative_to(logdir)) for p in logdir.rglob("events.out.*")
  )
  assert folders == [
    f"{method}/snr_{snr:g}/trial_0"
    for method in sorted(config.methods)
    for snr in config.snrs
  ]
  for folder in folders:
    tags, _ = _events(logdir / folder)
    assert summaries.LOG_LIKELIHOOD in tags
    starts = [t for t in tags if t.startswith("starts/")]
    if folder.startswith("no_prior/"):
      assert starts == ["starts/start 0"]
      assert _steps(tags[starts[0]]) == list(range(8))
    else:  # the starts of each problem, one survivor
      lasts = sorted(_steps(tags[t])[-1] for t in starts)
      assert lasts == [3] * (len(starts) - 1) + [7]


def test_recommended_names_starts_within_their_problems():
  groups = np.array([0, 0, 1, 1, 1])
  members = np.array([1, 2, 4])
  # pylint: disable-next=protected-access
  labels = recommended._start_labels
  assert labels(groups, members) == ["0/start 1", "1/start 0", "1/start 2"]
  with callbacks.labelled(["a/snr_1", "b"]):
    assert labels(groups, members) == [
      "a/snr_1/start 1",
      "b/start 0",
      "b/start 2",
    ]
  assert labels(np.zeros(3, int), [0, 2]) == ["start 0", "start 2"]
  assert summaries.split_label("a/snr_1/start 2") == ("a/snr_1", "start 2")
  assert summaries.split_label("0") == ("", "0")


def test_without_logdir_nothing_is_written(measurement, tmp_path, monkeypatch):
  path, _ = measurement
  monkeypatch.chdir(tmp_path)

  def refuse(*args, **kwargs):
    raise AssertionError("a TensorBoard callback without a logdir")

  monkeypatch.setattr(summaries, "TensorBoard", refuse)
  config = reconstruction.ReconstructionConfig(
    measurements=(str(path),),
    image_size=SIZE,
    out=str(tmp_path / "est.npz"),
    checkpoint_every=0,
    em=dict(max_iterations=12, progress_every=0),
  )
  reconstruction.reconstruct(config)
  assert not list(tmp_path.rglob("events.out.tfevents.*"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["est.npz"]


def test_a_file_as_logdir_is_a_usage_error(measurement, tmp_path, run_tool):
  path, _ = measurement
  taken = tmp_path / "taken"
  taken.write_text("not a folder")
  for logdir in (taken, taken / "below"):
    done = run_tool(
      "mtd_tf.reconstruct",
      f"--measurement={path}",
      f"--image_size={SIZE}",
      f"--out={tmp_path / 'est.npz'}",
      f"--logdir={logdir}",
    )
    assert done.returncode == 2
    assert "is not a folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "est.npz").exists()
  done = run_tool(
    "mtd_tf.experiment",
    "--dataset=gaussian",
    f"--out_dir={tmp_path / 'exp'}",
    f"--logdir={taken}",
  )
  assert done.returncode == 2 and "is not a folder" in done.stderr
  assert not (tmp_path / "exp").exists()
  with pytest.raises(ValueError, match="image_every"):
    summaries.TensorBoard(tmp_path, image_every=0)
