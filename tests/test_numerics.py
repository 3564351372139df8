"""Finite results or a clear error at any SNR; segments; interruption."""

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mtd_tf import cli
from mtd_tf import em
from mtd_tf import priors
from mtd_tf.em import front_ends
from mtd_tf.em import loop as loop_lib
from mtd_tf.em import runner
from mtd_tf.model import datasets
from mtd_tf.model import metrics
from mtd_tf.model import rotations
from mtd_tf.model import simulation


@pytest.mark.parametrize("snr", [0.01, 0.1, 1.0, 100.0, 10_000.0])
@pytest.mark.parametrize(
  "m_step", ["closed_form", "gradient", "preconditioned"]
)
def test_finite_from_snr_001_to_10000(snr, m_step):
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=snr, seed=4)
  result = em.approximate_em(
    sim.measurement,
    5,
    sim.sigma,
    init=rng.uniform(0, 1, (5, 5)),
    options=em.EMOptions(m_step=m_step, max_iterations=30),
  )
  assert np.all(np.isfinite(result.estimate))
  assert np.all(np.isfinite(result.log_likelihood))


@pytest.mark.parametrize("snr", [0.01, 10_000.0])
def test_finite_for_digits_at_extreme_snr(snr):
  digit = datasets.shipped_digits()["targets"][6]
  sim = simulation.simulate_measurement(digit, snr=snr, seed=5)
  result = em.approximate_em(
    sim.measurement,
    28,
    sim.sigma,
    init=datasets.mnist_initialisation(),
    options=em.EMOptions(max_iterations=10),
  )
  assert np.all(np.isfinite(result.estimate))
  assert np.all(np.isfinite(result.log_likelihood))
  if snr > 1000:
    # Near noise-free data from a near start: EM locks on to the digit.
    near = em.approximate_em(
      sim.measurement,
      28,
      sim.sigma,
      init=digit + 0.05,
      options=em.EMOptions(max_iterations=10),
    )
    assert metrics.relative_error(digit, near.estimate) < 0.02


def test_same_seed_same_estimate():
  runs = []
  for _ in range(2):
    rng = np.random.default_rng(8)
    image = rng.uniform(0, 1, (6, 6))
    sim = simulation.simulate_measurement(image, snr=2.0, seed=9)
    runs.append(
      em.approximate_em(
        sim.measurement,
        6,
        sim.sigma,
        init=rng.uniform(0, 1, (6, 6)),
        options=em.EMOptions(
          m_step="gradient", learning_rate=0.05, max_iterations=20
        ),
      )
    )
  np.testing.assert_array_equal(runs[0].estimate, runs[1].estimate)
  np.testing.assert_array_equal(runs[0].log_likelihood, runs[1].log_likelihood)


@pytest.fixture(scope="module")
def small_problem():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (5, 5))
  return image, rng.uniform(0, 1, (5, 5))


def test_nan_prior_ends_the_run_naming_the_prior(small_problem):
  image, init = small_problem
  sim = simulation.simulate_measurement(image, snr=2, seed=4)
  nan_prior = priors.ScorePrior(lambda x, t: x * np.nan, 5)
  for m_step in ("gradient", "preconditioned"):
    with pytest.raises(em.EMDivergedError, match="the prior returned NaN"):
      em.approximate_em(
        sim.measurement,
        5,
        sim.sigma,
        init=init,
        prior=nan_prior,
        options=em.EMOptions(m_step=m_step, max_iterations=5),
      )


def test_huge_learning_rate_names_the_step_size(small_problem):
  image, init = small_problem
  sim = simulation.simulate_measurement(image, snr=2, seed=4)
  with pytest.raises(
    em.EMDivergedError, match="gradient step diverged.*smaller learning_rate"
  ):
    em.approximate_em(
      sim.measurement,
      5,
      sim.sigma,
      init=init,
      options=em.EMOptions(
        m_step="gradient", learning_rate=1e30, max_iterations=10
      ),
    )


@pytest.mark.parametrize(
  "m_step", ["closed_form", "gradient", "preconditioned"]
)
def test_tiny_sigma_in_float32_asks_for_float64(small_problem, m_step):
  image, init = small_problem
  sim = simulation.simulate_measurement(image, sigma=1e-5, seed=4)
  # float32 logits of size ||M_m||^2 / (2 sigma^2) ~ 1e11 carry rounding
  # errors of thousands of nats: refused before EM.
  with pytest.raises(
    em.EMDivergedError,
    match=(
      r"^sigma=1e-05 is too small for float32 against data whose squared "
      r"patch norms reach .* \(the E-step's logits would carry rounding "
      r"errors of .* nats\): use dtype='float64' or a larger sigma\.$"
    ),
  ):
    em.approximate_em(
      sim.measurement,
      5,
      1e-5,
      init=init,
      options=em.EMOptions(m_step=m_step, max_iterations=5),
    )
  # float64 copes, as the message says.
  result = em.approximate_em(
    sim.measurement,
    5,
    1e-5,
    init=init,
    options=em.EMOptions(m_step=m_step, max_iterations=5, dtype="float64"),
  )
  assert np.all(np.isfinite(result.log_likelihood))


def test_a_huge_estimate_is_named_too_large_not_sigma_too_small():
  """Issue 26: a run that overflows float32 names the numbers that did."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from mtd_tf.em import problem  # pylint: disable=g-import-not-at-top

  batch = problem.ProblemBatch([0.5], np.ones((1, 5, 5)), ["closed_form"], [0])
  state = runner._initial_state(batch, 0, tf.float32)._replace(
    images=tf.constant(np.full((1, 5, 5), 1e30), tf.float32),
    iterations=tf.constant([3]),
    failure=tf.constant([loop_lib.BAD_LOG_LIKELIHOOD]),
  )
  message = str(runner._diverged(state, batch, None, 0.01, em.EMOptions()))
  assert "at iteration 4; the estimate is too large for float32" in message
  assert "largest |value| is 1e+30" in message and "too small" not in message
  state = state._replace(images=tf.ones([1, 5, 5]))
  message = str(runner._diverged(state, batch, None, 0.01, em.EMOptions()))
  assert "sigma=0.5 is too small for float32" in message


def test_divergence_in_a_batch_names_the_problem(small_problem):
  image, init = small_problem
  sim = simulation.simulate_measurement(image, snr=2, seed=4)
  with pytest.raises(em.EMDivergedError, match="in problem 1 "):
    em.batched_em(
      [sim.measurement] * 2,
      5,
      [sim.sigma] * 2,
      inits=np.stack([init] * 2),
      m_steps=["closed_form", "gradient"],
      options=em.EMOptions(learning_rate=1e30, max_iterations=10),
    )


def _batch_run(images, inits, dtype):
  sims = [
    simulation.simulate_measurement(f, snr=s, seed=i)
    for i, (f, s) in enumerate(zip(images, (1.0, 5.0, 10.0)))
  ]
  return em.batched_em(
    [s.measurement for s in sims],
    5,
    [s.sigma for s in sims],
    inits=inits,
    m_steps=["closed_form", "gradient", "preconditioned"],
    options=em.EMOptions(max_iterations=40, dtype=dtype, learning_rate=0.01),
  )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.slow
def test_segments_give_the_result_of_one_call(monkeypatch, dtype):
  rng = np.random.default_rng(5)
  images = rng.uniform(0, 1, (3, 5, 5))
  inits = rng.uniform(0, 1, (3, 5, 5))
  calls = []
  real = front_ends.compiled_loop

  def counting(*args, **kwargs):
    loop = real(*args, **kwargs)

    def counted(*call_args):
      calls.append(1)
      return loop(*call_args)

    return counted

  monkeypatch.setattr(front_ends, "compiled_loop", counting)
  monkeypatch.setattr(runner, "_SEGMENT_ITERATIONS", 1)
  single_steps = _batch_run(images, inits, dtype)
  assert len(calls) == int(single_steps.iterations.max()) == 40
  calls.clear()
  monkeypatch.setattr(runner, "_SEGMENT_ITERATIONS", 1000)
  monkeypatch.setattr(runner, "_SEGMENT_SECONDS", 1e9)
  few = _batch_run(images, inits, dtype)
  assert len(calls) == 3  # 1, then 10, then the remaining 29
  np.testing.assert_array_equal(few.estimate, single_steps.estimate)
  np.testing.assert_array_equal(few.iterations, single_steps.iterations)
  np.testing.assert_array_equal(few.log_likelihood, single_steps.log_likelihood)


@pytest.mark.parametrize("during", [False, True])
def test_interrupt_carries_the_last_finished_iteration(monkeypatch, during):
  rng = np.random.default_rng(8)
  image = rng.uniform(0, 1, (5, 5))
  init = rng.uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=2.0, seed=9)
  options = em.EMOptions(max_iterations=20, tolerance=0.0, dtype="float64")
  calls = []
  real = front_ends.compiled_loop

  def interrupted(*args, **kwargs):
    loop = real(*args, **kwargs)

    def segment(*call_args):
      calls.append(1)
      if len(calls) == 4 and not during:
        raise cli.Terminated()  # noticed between segments
      out = loop(*call_args)
      if len(calls) == 4:
        raise KeyboardInterrupt()  # the 4th segment's result is lost
      return out

    return segment

  monkeypatch.setattr(runner, "_SEGMENT_ITERATIONS", 1)
  monkeypatch.setattr(front_ends, "compiled_loop", interrupted)
  with pytest.raises(KeyboardInterrupt) as caught:
    em.approximate_em(sim.measurement, 5, sim.sigma, init=init, options=options)
  partial = caught.value.partial_result
  assert partial.iterations == 3
  assert partial.log_likelihood.shape == (3,)
  monkeypatch.setattr(front_ends, "compiled_loop", real)
  three = em.approximate_em(
    sim.measurement,
    5,
    sim.sigma,
    init=init,
    options=dataclasses.replace(options, max_iterations=3),
  )
  np.testing.assert_array_equal(partial.estimate, three.estimate)
  np.testing.assert_array_equal(partial.log_likelihood, three.log_likelihood)


def test_progress_lines_go_to_absl_logging(caplog, small_problem):
  image, init = small_problem
  sim = simulation.simulate_measurement(image, snr=2, seed=4)
  caplog.set_level(logging.INFO)
  # Other tests may have lowered absl's verbosity.
  caplog.set_level(logging.INFO, logger="absl")
  result = em.approximate_em(
    sim.measurement,
    5,
    sim.sigma,
    init=init,
    options=em.EMOptions(max_iterations=7, tolerance=0.0, progress_every=3),
  )
  lines = [
    r.getMessage()
    for r in caplog.records
    if r.getMessage().startswith("EM iteration")
  ]
  assert [line.split("|")[0] for line in lines] == [
    "EM iteration 3 / 7 ",
    "EM iteration 6 / 7 ",
    "EM iteration 7 / 7 ",
  ]
  last = lines[-1]
  assert re.search(
    r"\| log-likelihood -?[0-9.]+(e[+-]\d+)? \| change "
    r"[0-9.e+-]+ \| running 1 / 1 \| [0-9.e+-]+ s/it \| ETA "
    r"0 s$",
    last,
  ), last
  assert f"{result.log_likelihood[-1]:.3g}" in last


def test_compiled_loops_are_bounded_and_keep_their_prior():
  rot = rotations.rotation_set(5, 4)
  loop_lib._LOOPS.clear()  # pylint: disable=protected-access

  def spec(prior, gamma="linear"):
    return loop_lib.LoopSpec(rot, ("gradient",), prior, 1, gamma, 1)

  prior = priors.GaussianPrior(np.zeros((5, 5)))
  first = loop_lib.compiled_loop(spec(prior))
  assert loop_lib.compiled_loop(spec(prior)) is first
  other = priors.GaussianPrior(np.zeros((5, 5)))
  assert loop_lib.compiled_loop(spec(other)) is not first
  for k in range(12):
    loop_lib.compiled_loop(spec(prior, f"constant:{k}"))
  cache = loop_lib._LOOPS  # pylint: disable=protected-access
  assert len(cache) == loop_lib._LOOP_CACHE_SIZE == 8  # pylint: disable=protected-access
  # Each entry holds its spec, so the id in its key stays that prior's.
  assert all(entry[0].prior is prior for entry in cache.values())


# Ctrl-C as a terminal gives it, even where this process ignores or blocks
# SIGINT (a child inherits both from the process that starts it).
_INTERRUPTED_RUN = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
import sys
import numpy as np
from absl import logging
from mtd_tf import datasets, em, simulation
logging.set_verbosity(logging.INFO)
logging.use_absl_handler()
digit = datasets.shipped_digits()["targets"][3]
sim = simulation.simulate_measurement(digit, snr=1.0, seed=1)
try:
  em.approximate_em(sim.measurement, 28, sim.sigma, init=digit + 0.1,
                    options=em.EMOptions(max_iterations=100000, tolerance=0.0,
                                         progress_every=1))
except KeyboardInterrupt as err:
  partial = err.partial_result
  print("partial", partial.iterations, len(partial.log_likelihood),
        bool(np.all(np.isfinite(partial.estimate))), flush=True)
  sys.exit(130)
"""


@pytest.mark.slow
def test_sigint_is_noticed_within_seconds(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(
    [sys.executable, "-c", _INTERRUPTED_RUN],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=tmp_path,
  )
  try:
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # progress lines, one per iteration
      if "EM iteration 30 / 100000" in line or time.monotonic() > deadline:
        break
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    waited = time.monotonic() - sent
  finally:
    proc.kill()
  assert proc.returncode == 130, out
  assert waited < 5.0, waited
  # The segment in flight is lost; the ones before it are kept.
  _, iterations, history, finite = out.split()
  assert 1 <= int(iterations) < 30 + 1000
  assert int(history) == int(iterations) and finite == "True"


def test_ctrl_c_inside_the_compiled_loops_progress_line_is_not_lost(
  monkeypatch,
):
  # A Ctrl-C landing while the progress line runs inside the compiled loop
  # (a numpy_function) used to be swallowed by TensorFlow: EM ran on.
  from mtd_tf import em  # pylint: disable=g-import-not-at-top
  from mtd_tf.em import loop  # pylint: disable=g-import-not-at-top

  calls = []

  def interrupted(*args, **kwargs):
    calls.append(args)
    if len(calls) == 3:
      raise KeyboardInterrupt

  monkeypatch.setattr(loop.logging, "info", interrupted)
  digit = datasets.shipped_digits()["targets"][3]
  sim = simulation.simulate_measurement(digit, snr=1.0, seed=1)
  with pytest.raises(KeyboardInterrupt) as caught:
    em.approximate_em(
      sim.measurement,
      28,
      sim.sigma,
      init=digit + 0.1,
      options=em.EMOptions(max_iterations=200, tolerance=0.0, progress_every=1),
    )
  partial = caught.value.partial_result
  # Raised at the end of the segment the Ctrl-C landed in, not at T = 200.
  assert 3 <= int(np.max(partial.iterations)) < 200
  assert np.all(np.isfinite(partial.estimate))
  loop.raise_pending_interrupt()  # nothing is left pending
