"""EM's callbacks see every run; a run resumed from a saved state is the same."""

import numpy as np
import pytest

from mtd_tf import em
from mtd_tf.em import callbacks
from mtd_tf.em import loop
from mtd_tf.model import simulation

SIZE = 5


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  sim = simulation.simulate_measurement(image, snr=3.0, seed=4)
  init = rng.uniform(0, 1, (SIZE, SIZE))
  return sim, init


class _Recorder(callbacks.Callback):
  """Keeps every segment's state (numpy) and history, and the results."""

  def __init__(self, resume=None):
    self.runs, self.segments, self.results = [], [], []
    self._resume = resume

  def on_run_begin(self, run):
    self.runs.append(run)
    return self._resume

  def on_segment_end(self, run, state, rows, seconds):
    assert seconds >= 0
    self.segments.append(
      (run.index, loop.LoopState(*[np.asarray(t) for t in state]), list(rows))
    )

  def on_run_end(self, run, result):
    self.results.append((run.index, result))


def _options(**fields):
  return em.EMOptions(
    max_iterations=25,
    tolerance=0.0,
    dtype="float64",
    m_step="preconditioned",
    estimate_shift_prior="occupancy",
    estimate_sigma=True,
    progress_every=0,
    **fields,
  )


def test_callbacks_see_each_iteration_of_every_run(problem):
  sim, init = problem
  recorder = _Recorder()
  with callbacks.active([recorder]):
    result = em.approximate_em(
      sim.measurement, SIZE, 1.3 * sim.sigma, init=init, options=_options()
    )
  assert [run.index for run in recorder.runs] == [0]
  assert recorder.runs[0].total == 25 and recorder.runs[0].labels == ("0",)
  _, state, rows = recorder.segments[-1]
  history = np.concatenate(rows)  # [T, B, F]
  assert history.shape == (25, 1, len(loop.HISTORY_FIELDS))
  fields = dict(zip(loop.HISTORY_FIELDS, np.moveaxis(history[:, 0], -1, 0)))
  np.testing.assert_allclose(fields["log_likelihood"], result.log_likelihood)
  # Iteration 0's E-step used the given sigma and a uniform rho.
  assert fields["sigma"][0] == pytest.approx(1.3 * sim.sigma)
  assert fields["empty_probability"][0] == pytest.approx(
    (4 * SIZE - 1) / (4 * SIZE**2)
  )
  assert fields["sigma"][-1] == pytest.approx(sim.sigma, rel=0.1)
  assert np.all(fields["relative_change"] >= 0)
  assert recorder.results[0][1] is not None
  # run_loop's result is the batch's: [B, L, L].
  np.testing.assert_allclose(
    recorder.results[0][1].estimate[0], result.estimate
  )
  # Outside the block nothing is called.
  em.approximate_em(
    sim.measurement, SIZE, sim.sigma, init=init, options=_options()
  )
  assert len(recorder.runs) == 1


def test_a_run_resumed_from_a_segment_state_ends_identically(problem):
  sim, init = problem
  recorder = _Recorder()
  with callbacks.active([recorder]):
    whole = em.approximate_em(
      sim.measurement, SIZE, 1.3 * sim.sigma, init=init, options=_options()
    )
  # Adaptive segments start at one iteration: several to choose from.
  assert len(recorder.segments) >= 2
  _, state, rows = recorder.segments[len(recorder.segments) // 2]
  assert 0 < int(state.tau) < 25
  resumed = _Recorder(callbacks.Resume(state, rows, 1.0))
  with callbacks.active([resumed]):
    again = em.approximate_em(
      sim.measurement, SIZE, 1.3 * sim.sigma, init=init, options=_options()
    )
  np.testing.assert_array_equal(again.estimate, whole.estimate)
  np.testing.assert_array_equal(again.log_likelihood, whole.log_likelihood)
  assert again.sigma == whole.sigma and again.iterations == whole.iterations
  assert again.seconds >= 1.0
  # A finished result handed back is the run's result: nothing runs.
  done = _Recorder(recorder.results[0][1])
  with callbacks.active([done]):
    same = em.approximate_em(
      sim.measurement, SIZE, 1.3 * sim.sigma, init=init, options=_options()
    )
  np.testing.assert_array_equal(same.estimate, whole.estimate)
  assert not done.segments and not done.results


def test_labels_and_nested_blocks():
  outer, inner = _Recorder(), _Recorder()
  batch = em.ProblemBatch(
    [0.5, 0.5], np.zeros((2, SIZE, SIZE)), ["closed_form"] * 2, [0.0, 0.0]
  )
  with callbacks.active([outer]):
    with callbacks.labelled(["start 0", "start 3"]):
      run, _ = callbacks.begin(batch, 0, 10)
    with callbacks.active([inner]):
      nested, _ = callbacks.begin(batch, 2, 10)
  assert run.labels == ("start 0", "start 3") and run.index == 0
  assert nested.index == 0 and nested.labels == ("0", "1")
  assert len(outer.runs) == 1 and len(inner.runs) == 1
  assert callbacks.current() == ()
  with pytest.raises(TypeError, match="Callback"):
    with callbacks.active([object()]):
      pass
