"""The recommended method on streamed micrographs is the in-memory one.

Every start shares one pass over the files per iteration (phase 1 on eq.
(9)'s grid, phase 2 on every offset grid, rho and sigma by EM, the gauge):
the winner and its estimate must be those of the run on the same
micrographs held in memory.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf import priors
from mtd_tf import recovery
from mtd_tf.em import streaming
from mtd_tf.model import metrics
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction
from mtd_tf.recovery import recommended

SIZE = 5


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
  """Three micrographs of one 5 x 5 image, as .npy files and arrays."""
  folder = tmp_path_factory.mktemp("streamed_recommended")
  rng = np.random.default_rng(21)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  paths, arrays = [], []
  for i, shape in enumerate([(40, 45), (35, 40), (45, 45)]):
    sim = simulation.simulate_measurement(
      image, snr=2.0, seed=30 + i, measurement_shape=shape
    )
    arrays.append(np.asarray(sim.measurement, np.float64))
    path = folder / f"mic{i}.npy"
    np.save(path, arrays[-1])
    paths.append(str(path))
  return image, arrays, paths, float(sim.sigma)


def _recommended(estimate_sigma):
  options, recovery_options = recommended.recommended_options(
    em.EMOptions(dtype="float64", chunk_size=16), SIZE
  )
  return (
    dataclasses.replace(options, estimate_sigma=estimate_sigma),
    recovery_options,
  )


@pytest.mark.parametrize(
  "budget,estimate_sigma", [(0, False), (0, True), (2**30, True)]
)
def test_streamed_multistart_equals_in_memory(problem, budget, estimate_sigma):
  image, arrays, paths, sigma = problem
  options, recovery_options = _recommended(estimate_sigma)
  assert recovery_options.prune_at > 0 and recovery_options.grids_per_axis > 1
  prior = priors.GaussianPrior(np.full((SIZE, SIZE), 0.5))
  init = np.full((1, SIZE, SIZE), 0.5)
  common = dict(
    inits=init,
    prior=prior,
    m_step=options.m_step,
    options=options,
    recovery=recovery_options,
  )
  held = recovery.multistart_em([arrays], SIZE, [1.2 * sigma], **common)
  data = streaming.StreamingData(
    paths, SIZE, chunk_size=16, dtype=tf.float64, memory_budget_bytes=budget
  )
  try:
    streamed = recovery.multistart_em([data], SIZE, [1.2 * sigma], **common)
  finally:
    data.close()
  assert len(held.groups) == len(streamed.groups) > 3  # several starts
  assert int(streamed.winner[0]) == int(held.winner[0])
  assert streamed.problem_iterations == held.problem_iterations
  for name in ("estimate", "raw_estimate", "sigma"):
    np.testing.assert_allclose(
      getattr(streamed, name), getattr(held, name), rtol=1e-6, atol=1e-8
    )
  np.testing.assert_allclose(
    streamed.objective, held.objective, rtol=1e-8, equal_nan=True
  )
  if estimate_sigma:  # EM moved sigma from the 20 % too high start
    assert abs(float(held.sigma[0]) - sigma) < 0.1 * sigma
  assert metrics.relative_error(image, held.estimate[0]) < 0.35


def test_streamed_multistart_refuses_several_problems(problem):
  _, arrays, paths, sigma = problem
  data = streaming.StreamingData(paths, SIZE, dtype=tf.float64)
  with pytest.raises(ValueError, match="one problem"):
    recovery.multistart_em(
      [data, arrays],
      SIZE,
      [sigma, sigma],
      inits=np.zeros((2, SIZE, SIZE)),
    )


def test_reconstruct_runs_the_recommended_method_on_streamed_files(
  problem, tmp_path, caplog
):
  """No fallback to one start: streamed and in-memory runs agree."""
  _, arrays, _, _ = problem
  for i, array in enumerate(arrays):
    np.save(tmp_path / f"m{i}.npy", array)
  common = dict(
    measurements=(str(tmp_path / "m*.npy"),),
    image_size=SIZE,
    method="recommended",
    em=dict(progress_every=0, dtype="float64"),
  )
  held = reconstruction.reconstruct(
    reconstruction.ReconstructionConfig(
      out=str(tmp_path / "held.npz"), stream="never", **common
    )
  )
  with caplog.at_level("WARNING"):
    streamed = reconstruction.reconstruct(
      reconstruction.ReconstructionConfig(
        out=str(tmp_path / "streamed.npz"), stream="always", **common
      )
    )
  assert "one start" not in caplog.text
  assert streamed["streamed"] and not held["streamed"]
  a = np.load(tmp_path / "held.npz")["estimate"]
  b = np.load(tmp_path / "streamed.npz")["estimate"]
  assert np.max(np.abs(a - b)) <= 1e-4 * np.linalg.norm(a)
  assert streamed["sigma"] == pytest.approx(held["sigma"], rel=1e-6)
