"""Issue 26 (third hardening round): limits, causes, exit codes, quiet starts.

Each test asserts the exit status, the one line, and that nothing was
written or no work started (or the correct result).
"""

import dataclasses
import errno
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from mtd_tf import cli
from mtd_tf import em
from mtd_tf.base import atomic
from mtd_tf.base import memory
from mtd_tf.em import options as options_lib
from mtd_tf.em import problem
from mtd_tf.model import rotations
from mtd_tf.model import simulation
from mtd_tf.pipelines import experiments
from mtd_tf.pipelines import prior_samples
from mtd_tf.priors import orientation
from mtd_tf.priors import sampling
from trainers import configs
from trainers import mnist_prior
from trainers import orientation_classifier

# A fresh interpreter as a user starts it: TF_CPP_MIN_LOG_LEVEL unset, so
# `cli.run`'s own default and its quiet TensorFlow import are what show.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _fresh(module, *args, cwd=None, timeout=300):
  """Runs `module.run(args)`; stdout's last line says whether TF loaded."""
  code = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('tensorflow loaded' if 'tensorflow' in "
    "sys.modules else 'tensorflow not loaded'))\n"
    f"from {module} import run\n"
    f"run({[module.rsplit('.', 1)[-1], *map(str, args)]!r})\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code],
    cwd=cwd,
    env=CLEAN_ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


# Case 4: t_prior and T0 in the VP-SDE's (0, 1].


@pytest.mark.parametrize("t_prior", [5.0, 1e300, 1.0 + 1e-9])
def test_t_prior_outside_the_sde_time_is_refused(t_prior):
  with pytest.raises(ValueError, match=r"t_prior must be in \(0, 1\]"):
    em.EMOptions(t_prior=t_prior)
  assert em.EMOptions(t_prior=1.0).t_prior == 1.0


def test_t_schedule_start_outside_the_sde_time_is_refused():
  with pytest.raises(ValueError, match=r"T0=2, .*\(0, 1\]"):
    em.EMOptions(t_schedule="geometric:2")
  assert em.EMOptions(t_schedule="geometric:1").t_schedule == "geometric:1"


@pytest.mark.parametrize("flag", ["--t_prior=5", "--t_prior=1e300"])
def test_experiment_tool_refuses_t_prior_before_work(tmp_path, run_tool, flag):
  done = run_tool(
    "mtd_tf.experiment",
    "--dataset=gaussian",
    f"--out_dir={tmp_path / 'out'}",
    flag,
    cwd=tmp_path,
  )
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1
  assert "t_prior must be in (0, 1]" in done.stderr
  assert os.listdir(tmp_path) == []


# Case 5: sizes against what TensorFlow and the machine can hold.


def test_rotation_operators_past_tensorflows_limit_are_refused():
  # Sparse operators: K L^2 16 taps, so K = 1000 is 100 MB, and the limit
  # is K = 21399 at L = 28.
  rotations.rotation_set(28, 1000)
  with pytest.raises(ValueError, match="2 GiB TensorFlow can hold"):
    rotations.rotation_set(28, 30000)
  with pytest.raises(ValueError, match="use num_rotations <= 21399"):
    em.EMOptions(num_rotations=30000, dtype="float64").check_size(28)
  # Quarter turns need no operators, so any image size passes.
  rotations.rotation_set(200, 4)
  assert options_lib.TENSOR_LIMIT_BYTES == rotations.TENSOR_LIMIT_BYTES


def test_em_larger_than_memory_is_refused_with_its_sizes():
  opts = em.EMOptions(num_rotations=360)
  parts = opts.memory_bytes(28, num_streams=2)
  assert parts["rotation operators"] == 360 * 28**2 * 16 * (12 + 4)
  assert parts["E-step buffers"] == 6 * 2 * 64 * 360 * 56**2 * 4
  with pytest.raises(ValueError, match=r"needs about .* GiB .*rotation"):
    opts.check_size(28, 2, available_bytes=2**30)
  opts.check_size(28, 2, available_bytes=sum(parts.values()))
  assert em.EMOptions().memory_bytes(28) == {
    "E-step buffers": 6 * 64 * 4 * 56**2 * 4
  }


def test_simulator_builds_only_the_drawn_rotations():
  image = np.random.default_rng(0).standard_normal((7, 7))
  for count in (3, 4, 8):
    mats = rotations.rotation_matrices(7, count)
    for k in range(count):
      np.testing.assert_allclose(
        rotations.rotate_image(image, k, count),
        (mats[k] @ image.reshape(-1)).reshape(7, 7),
        rtol=1e-13,
        atol=1e-15,
      )
  start = time.perf_counter()
  sim = simulation.simulate_measurement(
    image, snr=1, size_factor=6, num_rotations=10**9, seed=0
  )
  assert time.perf_counter() - start < 10
  assert sim.num_rotations == 10**9 and np.all(sim.rotations < 10**9)


def test_simulate_tool_takes_a_billion_rotations(tmp_path, run_tool):
  done = run_tool(
    "mtd_tf.simulate",
    "--digit=3",
    "--snr=1",
    "--num_rotations=1000000000",
    "--out=m.npz",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  with np.load(tmp_path / "m.npz") as data:
    assert int(data["num_rotations"]) == 10**9


def test_memory_budget_is_a_fraction_of_the_available_memory():
  available = memory.available_memory()
  assert available is not None and available > 0
  assert memory.memory_budget() <= memory.MEMORY_FRACTION * available
  assert memory.memory_budget(123) == 123
  assert memory.format_bytes(3 * 2**30) == "3 GiB"


def test_experiment_too_large_for_memory_is_refused_before_work(
  tmp_path, run_tool
):
  # 10^8 trials need about 100 TiB: refused on any machine.
  config = experiments.default_config("gaussian", trials=10**8)
  with pytest.raises(experiments.ExperimentError, match="fewer trials"):
    experiments.check_memory(config)
  with pytest.raises(
    experiments.ExperimentError, match="need at least 1.09 GiB"
  ):
    experiments.check_memory(
      experiments.default_config("gaussian", trials=1000),
      available_bytes=2**28,
    )
  small = experiments.default_config("gaussian", trials=2)
  experiments.check_memory(small)
  done = run_tool(
    "mtd_tf.experiment",
    "--dataset=gaussian",
    "--trials=100000000",
    f"--out_dir={tmp_path / 'out'}",
    cwd=tmp_path,
  )
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1
  assert "1200000000 runs (3 SNRs x 100000000 trials" in done.stderr
  assert "TiB" in done.stderr
  assert os.listdir(tmp_path) == []


def test_too_many_prior_samples_are_refused_before_sampling(tmp_path, run_tool):
  with pytest.raises(sampling.SamplingError, match="ask for at most"):
    prior_samples.SampleConfig(
      prior="mnist_unet", out="s.png", num_samples=10**9
    )
  with pytest.raises(sampling.SamplingError, match="of 28 x 28"):
    prior_samples.check_size(30000, 28, available_bytes=2**30)
  done = run_tool(
    "mtd_tf.sample_prior",
    "--num_samples=100000000",
    "--out=s.png",
    cwd=tmp_path,
  )
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "ask for at most" in done.stderr
  assert os.listdir(tmp_path) == []


# Case 8: the trainers check the export folder, the prior's kind, the data.


def test_gaussian_samples_beyond_memory_are_refused_without_tensorflow(
  tmp_path,
):
  done = _fresh(
    "trainers.train_gaussian_prior",
    "--num_samples=100000000000",
    f"--checkpoint_dir={tmp_path / 'ck'}",
    cwd=tmp_path,
  )
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "num_samples=100000000000: the samples need about" in done.stderr
  assert done.stdout.strip().endswith("tensorflow not loaded")
  assert os.listdir(tmp_path) == []


def test_trainers_refuse_an_export_folder_that_is_a_file(tmp_path):
  (tmp_path / "afile").write_text("")
  runs = [
    (tool, target, f"--checkpoint_dir={tmp_path / 'ck'}")
    for tool in ("trainers.train_gaussian_prior", "trainers.train_mnist_prior")
    for target in ("afile", "afile/sub")
  ]
  runs.append(("trainers.train_orientation", "afile", "--epochs=1"))
  for tool, target, extra in runs:
    done = _fresh(tool, f"--export_dir={target}", extra, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"usage error: --export_dir={target}" in done.stderr
    assert done.stdout.strip().endswith("tensorflow not loaded")
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_export_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  def read_only(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(tempfile, "mkstemp", read_only)
  with pytest.raises(configs.TrainingError, match="Read-only file system"):
    configs.check_export_dir(str(tmp_path / "m"))
  assert os.listdir(tmp_path) == []


def test_orientation_needs_a_kind_with_an_orientation(tmp_path):
  with pytest.raises(ValueError, match="fix no orientation"):
    orientation_classifier.train_orientation_prior(
      "gaussian_fc",
      str(tmp_path / "m"),
      orientation.OrientationConfig(epochs=1),
      images=np.zeros((40, 5, 5), np.float32),
    )
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "bad,message", [(np.nan, "NaN or Inf"), (1.5, "outside [0, 1]")]
)
def test_bad_training_images_are_refused_before_any_step(
  tmp_path, bad, message
):
  images = np.full((40, 28, 28), 0.5, np.float32)
  images[7, 3, 3] = bad
  config = configs.TrainConfig(
    name="t", steps=1, batch_size=8, checkpoint_dir=str(tmp_path / "ck")
  )
  with pytest.raises(configs.TrainingError, match="image 7") as info:
    mnist_prior.train_mnist_prior(config, configs.MnistDataConfig(), images)
  assert message in str(info.value)
  with pytest.raises(configs.TrainingError, match=message.split()[0]):
    orientation_classifier.train_orientation_prior(
      "mnist_unet/2",
      str(tmp_path / "m"),
      orientation.OrientationConfig(epochs=1),
      images=images,
    )
  assert os.listdir(tmp_path) == []


# Case 12: the real cause of numbers float32 cannot hold; outputs named.


def _measurement():
  image = np.random.default_rng(1).uniform(0, 1, (5, 5))
  return simulation.simulate_measurement(image, snr=1, seed=1)


def test_sigma_too_large_says_so_with_the_numbers():
  sim = _measurement()
  with pytest.raises(problem.EMDivergedError) as info:
    em.approximate_em(
      sim.measurement, 5, 1e30, init=np.ones((5, 5)), options=em.EMOptions()
    )
  message = str(info.value)
  assert "sigma=1e+30 is too large for float32" in message
  assert "1e+60" in message and "too small" not in message


def test_data_and_init_too_large_say_so():
  sim = _measurement()
  with pytest.raises(problem.EMDivergedError, match="data are too large"):
    em.approximate_em(
      sim.measurement * np.float32(1e37),
      5,
      1.0,
      init=np.ones((5, 5)),
      options=em.EMOptions(),
    )
  with pytest.raises(problem.EMDivergedError, match=r"init \(F\(0\)\) is too"):
    em.approximate_em(
      sim.measurement,
      5,
      1.0,
      init=np.full((5, 5), 1e30),
      options=em.EMOptions(),
    )
  # float64 holds them: the same sigma runs.
  result = em.approximate_em(
    sim.measurement,
    5,
    1e30,
    init=np.ones((5, 5)),
    options=em.EMOptions(dtype="float64", max_iterations=2),
  )
  assert np.all(np.isfinite(result.estimate))
  assert problem.too_large("float32", image=np.full((5, 5), np.nan)) is None


def test_a_full_disk_names_the_output(tmp_path):
  out = tmp_path / "out.npz"
  with pytest.raises(OSError) as info:
    with atomic.atomic_file(out):
      raise OSError(errno.ENOSPC, "No space left on device")
  assert str(out) in str(info.value) and "No space left" in str(info.value)
  with pytest.raises(OSError, match="Could not write .*out.npz: disk gone"):
    with atomic.atomic_file(out):
      raise OSError("disk gone")
  assert os.listdir(tmp_path) == []


# Case 14: exit codes and flags.


@pytest.mark.parametrize(
  "module,args",
  [
    ("mtd_tf.simulate", ["--digit=3", "--snr=1", "--seed=-1"]),
    ("mtd_tf.experiment", ["--dataset=gaussian", "--out_dir=o", "--seed=-1"]),
    ("mtd_tf.sample_prior", ["--seed=-1"]),
    ("mtd_tf.demo", ["--seed=-1"]),
    (
      "mtd_tf.reconstruct",
      ["--measurement=m.npz", "--image_size=5", "--seed=-1"],
    ),
    ("trainers.train_gaussian_prior", ["--seed=-1"]),
    ("trainers.train_gaussian_prior", ["--mu_seed=4294967296"]),
  ],
)
def test_a_negative_seed_is_a_usage_error_naming_the_flag(
  tmp_path, run_tool, module, args
):
  done = run_tool(module, *args, cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1
  flag = args[-1].split("=")[0]
  assert f"usage error: {flag}=" in done.stderr
  assert "seeds are integers from 0 to 4294967295" in done.stderr
  assert os.listdir(tmp_path) == []


def test_simulate_output_equal_to_its_image_is_a_usage_error(
  tmp_path, run_tool
):
  np.save(tmp_path / "f.npy", np.ones((5, 5)))
  before = (tmp_path / "f.npy").read_bytes()
  done = run_tool(
    "mtd_tf.simulate", "--image=f.npy", "--snr=1", "--out=f.npy", cwd=tmp_path
  )
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "also an input" in done.stderr
  assert (tmp_path / "f.npy").read_bytes() == before


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_simulate_refuses_a_bad_pixel_size(tmp_path, run_tool, value):
  done = run_tool(
    "mtd_tf.simulate",
    "--digit=3",
    "--snr=1",
    f"--pixel_size={value}",
    "--out=m.mrc",
    cwd=tmp_path,
  )
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "--pixel_size must be positive and finite" in done.stderr
  assert os.listdir(tmp_path) == []


def test_sample_prior_wrong_extension_is_a_usage_error_without_tensorflow(
  tmp_path,
):
  done = _fresh("mtd_tf.sample_prior", "--out=a.jpg", cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1 and "extension '.jpg'" in done.stderr
  assert done.stdout.strip().endswith("tensorflow not loaded")
  assert os.listdir(tmp_path) == []


def test_repeated_snrs_are_refused():
  with pytest.raises(experiments.ExperimentError, match="SNRs repeat"):
    experiments.default_config("gaussian", snrs=(1.0, 1))


def _gaussian_config(seed):
  """The config `mtd-experiment --dataset=gaussian --snrs=1 --trials=2
  --methods=no_prior_closed_form --max_iterations=3 --seed=SEED` makes."""
  return experiments.default_config(
    "gaussian",
    snrs=(1.0,),
    trials=2,
    seed=seed,
    methods=("no_prior_closed_form",),
    options=dataclasses.replace(
      experiments.table_options("gaussian"), max_iterations=3, progress_every=10
    ),
  )


def test_resume_with_another_seed_is_refused_and_keeps_the_blocks(tmp_path):
  partial = tmp_path / "partial"
  experiments.run_experiment(
    _gaussian_config(3), block_size=1, partial_dir=str(partial)
  )
  blocks = {p.name: p.read_bytes() for p in partial.iterdir()}
  assert len(blocks) == 2
  with pytest.raises(experiments.ExperimentError) as info:
    experiments.run_experiment(
      _gaussian_config(4), block_size=1, partial_dir=str(partial), resume=True
    )
  assert "another experiment (seed 3 there, 4 here)" in str(info.value)
  assert {p.name: p.read_bytes() for p in partial.iterdir()} == blocks
  with pytest.raises(experiments.ExperimentError, match="--block_size"):
    experiments.run_experiment(
      _gaussian_config(3), block_size=2, partial_dir=str(partial), resume=True
    )
  assert {p.name: p.read_bytes() for p in partial.iterdir()} == blocks
  # The same experiment resumes from them.
  results, _ = experiments.run_experiment(
    _gaussian_config(3), block_size=1, partial_dir=str(partial), resume=True
  )
  assert results["blocks"] == {"total": 2, "resumed": 2}


def test_experiment_tool_resume_with_another_seed_keeps_the_blocks(
  tmp_path, run_tool
):
  out = tmp_path / "out"
  (out / "partial").mkdir(parents=True)
  experiments.save_block(
    str(out / "partial"),
    "0123456789abcdef",
    0,
    np.zeros((1, 5, 5)),
    np.zeros(1, int),
    1.0,
    np.ones(1),
    _gaussian_config(3),
  )
  before = (out / "partial" / "block-0000.npz").read_bytes()
  done = run_tool(
    "mtd_tf.experiment",
    "--dataset=gaussian",
    "--snrs=1",
    "--trials=2",
    "--methods=no_prior_closed_form",
    "--max_iterations=3",
    "--seed=4",
    "--block_size=1",
    "--resume",
    f"--out_dir={out}",
    cwd=tmp_path,
  )
  assert done.returncode == 1, done.stderr
  assert "holds finished blocks of another experiment" in done.stderr
  assert "seed 3 there, 4 here" in done.stderr.splitlines()[-1]
  assert (out / "partial" / "block-0000.npz").read_bytes() == before
  assert os.listdir(out) == ["partial"]


def test_a_symlinked_output_is_written_through(tmp_path, run_tool):
  target = tmp_path / "data" / "real.npz"
  target.parent.mkdir()
  target.write_bytes(b"old")
  (tmp_path / "out.npz").symlink_to(target)
  done = run_tool(
    "mtd_tf.simulate", "--digit=3", "--snr=1", "--out=out.npz", cwd=tmp_path
  )
  assert done.returncode == 0, done.stderr
  assert os.path.islink(tmp_path / "out.npz")
  with np.load(target) as data:
    assert data["measurement"].shape == (308, 308)
  assert sorted(os.listdir(target.parent)) == ["real.npz"]
  # A link whose target's folder is missing is refused, naming the link.
  (tmp_path / "dangling.npz").symlink_to(tmp_path / "gone" / "x.npz")
  with pytest.raises(FileNotFoundError, match="where the link .* points"):
    atomic.check_output_path(tmp_path / "dangling.npz")


def test_a_failed_folder_write_leaves_no_folder_it_created(tmp_path):
  path = tmp_path / "model" / "1"
  with pytest.raises(RuntimeError):
    with atomic.atomic_directory(path):
      raise RuntimeError("export failed")
  assert os.listdir(tmp_path) == []


# Case 15: refusals print one line, TensorFlow's chatter stays out.


def test_log_lines_below_the_level_are_dropped():
  text = (
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR\n"
    "I0000 00:00:1796622454.618757   32445 port.cc:153] oneDNN custom "
    "operations are on.\n"
    "I0000 00:00:1796622454.619056   32445 cudart_stub.cc:31] Could not "
    "find cuda drivers on your machine, GPU will not be used.\n"
    "I0000 00:00:1796622224.895393   30346 cpu_feature_guard.cc:227] This "
    "TensorFlow binary is optimized\n"
    "To enable the following instructions: AVX2, in other operations.\n"
    "E0000 00:00:1796622459.650255   32445 cuda_platform.cc:52] failed call "
    "to cuInit: INTERNAL\n"
    "E0000 00:00:1796622459.650255   32445 other.cc:1] a real error\n"
    "/x.py:1: UserWarning: something\n"
  )
  kept = cli.kept_log_lines(text, 2)
  assert kept.splitlines() == [
    "E0000 00:00:1796622459.650255   32445 other.cc:1] a real error",
    "/x.py:1: UserWarning: something",
  ]
  assert cli.kept_log_lines(text, 0) == text


def test_a_refusal_after_loading_tensorflow_prints_one_line():
  done = _fresh(
    "mtd_tf.reconstruct", "--measurement=/nonexistent", "--image_size=28"
  )
  assert done.returncode == 1
  assert done.stderr.splitlines() == [
    "reconstruct: error: Measurement file /nonexistent does not exist."
  ]


@pytest.mark.parametrize(
  "module,args",
  [
    ("mtd_tf.simulate", ["--digit=3", "--snr=1", "--out=m.txt"]),
    ("mtd_tf.simulate", ["--digit=3", "--snr=1e-60"]),
    ("mtd_tf.experiment", ["--dataset=gaussian", "--out_dir=o", "--trials=0"]),
    ("mtd_tf.demo", ["--snr=0"]),
    ("trainers.train_gaussian_prior", ["--steps=0"]),
  ],
)
def test_refusals_that_need_no_tensorflow_do_not_load_it(
  tmp_path, module, args
):
  done = _fresh(module, *args, cwd=tmp_path)
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1, done.stderr
  assert done.stdout.strip().endswith("tensorflow not loaded")
  assert os.listdir(tmp_path) == []


def test_results_json_of_a_block_records_its_settings(tmp_path):
  config = _gaussian_config(3)
  record = experiments.settings(config)
  assert record["seed"] == 3 and record["snrs"] == [1.0]
  assert record["options.max_iterations"] == 3
  json.dumps(record)
