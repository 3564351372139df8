"""Tests of mtd_tf.starts: windows find copies, pruning and selection."""

import numpy as np
import pytest

from mtd_tf.model import datasets
from mtd_tf.model import simulation
from mtd_tf.recovery import starts


def test_windows_hold_copies_at_high_snr():
  digit = datasets.shipped_digits()["targets"][4]
  sim = simulation.simulate_measurement(digit, snr=5.0, seed=[6, 1])
  windows = starts.window_starts(sim.measurement, 28, 3)
  assert windows.shape == (3, 28, 28)
  # Each window overlaps a planted copy: its energy exceeds pure noise.
  noise_energy = 28 * 28 * sim.sigma**2
  for window in windows:
    assert np.sum(window**2) > 1.5 * noise_energy


def test_windows_are_distinct_and_inside():
  rng = np.random.default_rng(0)
  measurement = rng.standard_normal((60, 60))
  windows = starts.window_starts(measurement, 10, 4)
  assert windows.shape == (4, 10, 10)
  assert len({w.tobytes() for w in windows}) == 4


def test_prune_keeps_the_best_of_each_group():
  objective = np.array([1.0, 5.0, 3.0, np.nan, -2.0, -1.0])
  groups = np.array([0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(
    starts.prune(objective, groups, 2), [False, True, True, False, True, True]
  )


def test_select_picks_the_highest_objective():
  rng = np.random.default_rng(1)
  objective = rng.standard_normal(12)
  groups = np.repeat([3, 1, 2], 4)
  problems, winners = starts.select(objective, groups)
  np.testing.assert_array_equal(problems, [1, 2, 3])
  for p, w in zip(problems, winners):
    members = np.flatnonzero(groups == p)
    assert w == members[np.argmax(objective[members])]


def test_bad_input_raises():
  with pytest.raises(starts.StartsError):
    starts.prune([1.0, 2.0], [0], 1)
  with pytest.raises(starts.StartsError):
    starts.prune([1.0], [0], 0)
  with pytest.raises(starts.StartsError):
    starts.window_starts(np.zeros((5, 5)), 10, 1)
