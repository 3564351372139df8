"""`mtd-reconstruct` end to end: recovers a digit; exit codes; one-line errors."""

import importlib
import json
import os
import pathlib

import numpy as np
import pytest
import tool_process

from mtd_tf import reconstruct

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("simulate", "reconstruct", "experiment", "demo", "bench", "serving")


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    reconstruct.run(["mtd-reconstruct", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--measurement", "--image_size", "--prior", "--out", "--quiet"):
    assert flag in out
  assert "Example:" in out and "--dataset" not in out


def test_all_tools_import_and_show_help_in_one_process(capsys):
  for tool in TOOLS:
    module = importlib.import_module(f"mtd_tf.{tool}")
    with pytest.raises(SystemExit) as exit_info:
      module.run([f"mtd-{tool}", "--help"])
    assert exit_info.value.code == 0, tool
    assert "Example:" in capsys.readouterr().out, tool


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
  folder = tmp_path_factory.mktemp("reconstruct")
  # In this process (a subprocess costs ~4 s of start-up).
  import contextlib  # pylint: disable=g-import-not-at-top
  import io as std_io  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top

  from mtd_tf import simulate  # pylint: disable=g-import-not-at-top

  out, cwd = std_io.StringIO(), os.getcwd()
  verbosity = logging.get_verbosity()
  os.chdir(folder)
  try:
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
      simulate.run(
        ["mtd-simulate", "--digit=3", "--snr=10", "--seed=1", "--out=m.npz"]
      )
  finally:
    os.chdir(cwd)
    logging.set_verbosity(verbosity)  # As the tool leaves it for later tests.
  assert info.value.code == 0
  assert "12 copies" in out.getvalue()
  return folder


@pytest.mark.slow
def test_simulate_then_reconstruct_recovers_a_digit(measurement):
  done = tool_process.run(
    "mtd_tf.reconstruct",
    "--measurement=m.npz",
    "--image_size=28",
    "--init=truth+0.3",
    "--method=paper",
    "--out=est.npz",
    cwd=measurement,
  )
  assert done.returncode == 0, done.stderr
  assert "EM iteration 10 / 100" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["initial_error"] == pytest.approx(0.3, abs=1e-6)
  assert summary["error"] < 0.15
  # The oracle-alignment floor is reported too, and EM gets close to it.
  assert 0.05 < summary["oracle_alignment_error"] < summary["error"]
  assert summary["error"] < 1.5 * summary["oracle_alignment_error"]
  with np.load(measurement / "est.npz") as est:
    assert est["estimate"].shape == (28, 28)
    assert float(est["error"]) == pytest.approx(summary["error"])


@pytest.mark.slow
def test_quiet_prints_only_the_summary(measurement):
  done = tool_process.run(
    "mtd_tf.reconstruct",
    "--measurement=m.npz",
    "--image_size=28",
    "--max_iterations=2",
    "--out=quiet.npz",
    "--quiet",
    cwd=measurement,
  )
  assert done.returncode == 0, done.stderr
  assert "EM iteration" not in done.stderr
  assert "measurement(s)" not in done.stderr
  assert len(done.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize(
  "args,code,message",
  [
    (["--bogus"], 2, "Unknown command line flag 'bogus'"),
    (["--image_size=x"], 2, "invalid literal"),
    (["--measurement=m.npz"], 2, "--image_size is required"),
    (
      ["--measurement=m.npz", "--image_size=28", "--out=no/such/dir/e.npz"],
      2,
      "does not exist",
    ),
    (["--measurement=m.npz", "--image_size=28", "--out=e.txt"], 2, "extension"),
    (
      ["--measurement=m.npz", "--image_size=28", "--out=m.npz"],
      2,
      "also an input",
    ),
    (
      ["--measurement=m.npz", "--image_size=28", "--init=cubic"],
      2,
      "Unknown init",
    ),
    (["--measurement=m.npz", "--image_size=28", "--sigma=-1"], 2, "sigma"),
    (["--measurement=m.npz", "--image_size=28", "--sigma=nan"], 2, "sigma"),
    (
      ["--measurement=m.npz", "--image_size=28", "--num_rotations=0"],
      2,
      "num_rotations",
    ),
    (
      ["--measurement=m.npz", "--image_size=28", "--rotations=spiral"],
      2,
      "--rotations",
    ),
    (["--measurement=missing.npz", "--image_size=28"], 1, "does not exist"),
    (["--measurement=m.npz", "--image_size=29"], 1, "not a multiple"),
  ],
)
def test_reconstruct_errors(measurement, args, code, message, run_tool):
  done = run_tool("mtd_tf.reconstruct", *args, cwd=measurement)
  assert done.returncode == code, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_same_command_same_output_bytes(measurement):
  outputs = []
  for name in ("a.npz", "b.npz"):
    done = tool_process.run(
      "mtd_tf.reconstruct",
      "--measurement=m.npz",
      "--image_size=28",
      "--max_iterations=5",
      f"--out={name}",
      cwd=measurement,
    )
    assert done.returncode == 0, done.stderr
    with np.load(measurement / name) as est:
      outputs.append(est["estimate"].tobytes())
  assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_several_mrc_micrographs_by_glob(tmp_path):
  for seed in (1, 2):
    done = tool_process.run(
      "mtd_tf.simulate",
      "--digit=3",
      "--snr=10",
      f"--seed={seed}",
      "--pixel_size=1.5",
      f"--out=mic{seed}.mrc",
      cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
  assert (tmp_path / "mic1.json").exists()
  done = tool_process.run(
    "mtd_tf.reconstruct",
    "--measurement=mic*.mrc",
    "--image_size=28",
    "--init=truth+0.3",
    "--method=paper",
    "--out=est.mrc",
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "2 measurement(s)" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["measurements"] == 2
  assert summary["error"] < 0.12
  import mrcfile  # pylint: disable=g-import-not-at-top

  with mrcfile.open(tmp_path / "est.mrc") as mrc:
    assert mrc.data.shape == (28, 28)
    assert float(mrc.voxel_size.x) == pytest.approx(1.5)


@pytest.mark.slow
def test_streamed_micrographs_give_the_in_memory_estimate(tmp_path):
  """--memory_budget=0 streams the files from disk: the same estimate."""
  for seed in (1, 2):
    done = tool_process.run(
      "mtd_tf.simulate",
      "--digit=3",
      "--snr=10",
      f"--seed={seed}",
      f"--out=mic{seed}.mrc",
      cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
  common = [
    "--measurement=mic*.mrc",
    "--image_size=28",
    "--init=truth+0.3",
    "--method=paper",
    "--max_iterations=5",
    "--tolerance=0",
    "--acceleration=none",
  ]
  streamed = tool_process.run(
    "mtd_tf.reconstruct",
    *common,
    "--memory_budget=0",
    "--out=streamed.npz",
    cwd=tmp_path,
  )
  in_memory = tool_process.run(
    "mtd_tf.reconstruct",
    *common,
    "--stream=never",
    "--out=memory.npz",
    cwd=tmp_path,
  )
  for done in (streamed, in_memory):
    assert done.returncode == 0, done.stderr
  a = json.loads(streamed.stdout.strip().splitlines()[-1])
  b = json.loads(in_memory.stdout.strip().splitlines()[-1])
  assert a["streamed"] and not b["streamed"]
  with (
    np.load(tmp_path / "streamed.npz") as x,
    np.load(tmp_path / "memory.npz") as y,
  ):
    np.testing.assert_allclose(
      x["estimate"], y["estimate"], rtol=1e-4, atol=1e-5
    )
  assert a["final_log_likelihood"] == pytest.approx(
    b["final_log_likelihood"], rel=1e-6
  )


@pytest.fixture(scope="module")
def bad_files(measurement):
  """Broken inputs beside the good measurement."""
  with np.load(measurement / "m.npz") as good:
    m = good["measurement"]
  np.save(measurement / "cube.npy", np.zeros((28, 28, 3)))
  np.save(measurement / "empty.npy", np.zeros((0, 0)))
  nan = m.copy()
  nan[5, 5] = np.nan
  np.savez(measurement / "nan.npz", measurement=nan, sigma=1.0)
  np.savez(measurement / "nokey.npz", data=m)
  np.savez(measurement / "odd.npz", measurement=m[:300, :301], sigma=1.0)
  (measurement / "notes.txt").write_text("not a measurement")
  (measurement / "not_a_model").mkdir(exist_ok=True)
  return measurement


@pytest.mark.parametrize(
  "args,code,message",
  [
    (["--measurement=cube.npy"], 1, "must be a 2-D array"),
    (["--measurement=empty.npy", "--sigma=1"], 1, "is empty"),
    (["--measurement=nan.npz"], 1, "NaN or Inf"),
    (["--measurement=nokey.npz"], 1, "no 'measurement' array"),
    (["--measurement=odd.npz"], 1, "--crop"),
    (["--measurement=notes.txt"], 1, "Unknown measurement file type"),
    (["--measurement=m.npz", "--prior=not_a_model"], 1, "not a SavedModel"),
    (["--measurement=m.npz", "--max_iterations=many"], 2, "invalid literal"),
  ],
)
def test_reconstruct_bad_input_table(bad_files, args, code, message, run_tool):
  done = run_tool("mtd_tf.reconstruct", "--image_size=28", *args, cwd=bad_files)
  assert done.returncode == code, done.stderr
  assert "Traceback" not in done.stderr
  # One line says it all (TensorFlow's own start-up lines may precede it).
  assert message in done.stderr.strip().splitlines()[-1]


def test_prior_of_another_image_size(bad_files, run_tool):
  done = run_tool(
    "mtd_tf.reconstruct",
    "--image_size=28",
    "--measurement=m.npz",
    "--prior=gaussian_fc",
    cwd=bad_files,
  )
  assert done.returncode == 1
  assert "L is 28" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_crop_flag_instead_of_error(bad_files):
  done = tool_process.run(
    "mtd_tf.reconstruct",
    "--image_size=28",
    "--measurement=odd.npz",
    "--crop",
    "--max_iterations=2",
    "--out=cropped.npz",
    cwd=bad_files,
  )
  assert done.returncode == 0, done.stderr
  assert (bad_files / "cropped.npz").exists()


@pytest.fixture
def small(tmp_path):
  """A 5 x 5 problem in a 20 x 20 measurement, saved as small.npz."""
  from mtd_tf.model import io  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  sim = simulation.simulate_measurement(
    rng.uniform(0, 1, (5, 5)), snr=2, seed=4, size_factor=4
  )
  io.save_measurement(tmp_path / "small.npz", sim)
  return tmp_path


def _one_line_error(done, code, message):
  assert done.returncode == code, done.stderr
  assert "Traceback" not in done.stderr and "in user code" not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert message in last, last
  return last


@pytest.mark.parametrize(
  "args,message",
  [
    (["--sigma=1e-5"], "float32"),
    (["--method=paper", "--sigma=1e-5"], "float32"),
    (["--m_step=gradient", "--learning_rate=1e30"], "smaller learning_rate"),
  ],
)
def test_diverged_em_fails_in_one_line_and_writes_nothing(
  small, run_tool, args, message
):
  done = run_tool(
    "mtd_tf.reconstruct",
    "--measurement=small.npz",
    "--image_size=5",
    "--max_iterations=20",
    "--out=e.npz",
    *args,
    cwd=small,
  )
  _one_line_error(done, 1, message)
  assert sorted(os.listdir(small)) == ["small.npz"]


@pytest.mark.slow
def test_nan_prior_is_named_as_the_cause(small, run_tool, monkeypatch):
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top

  nan_prior = priors.ScorePrior(lambda x, t: x * np.nan, 5)
  monkeypatch.setattr(
    priors, "load_prior", lambda spec, image_size=None: nan_prior
  )
  done = run_tool(
    "mtd_tf.reconstruct",
    "--measurement=small.npz",
    "--image_size=5",
    "--max_iterations=5",
    "--out=e.npz",
    "--prior=nan",
    "--gamma=constant:1",
    cwd=small,
  )
  last = _one_line_error(done, 1, "the prior returned NaN")
  assert "clean it first" not in last
  assert sorted(os.listdir(small)) == ["small.npz"]


def test_bad_inputs_of_issue_12(small, run_tool):
  """Each of these exited 0 with a wrong answer, or crashed, before."""
  import mrcfile  # pylint: disable=g-import-not-at-top

  with mrcfile.new(small / "c.mrc") as mrc:
    mrc.set_data(np.full((20, 20), 1 + 1j, np.complex64))
  np.save(small / "cinit.npy", np.full((5, 5), 1 + 1j))
  np.savez(
    small / "vs.npz",
    measurement=np.zeros((20, 20), np.float32),
    sigma=np.ones(3),
  )
  (small / "text.npy").write_text("hello\n")
  cases = [
    (["--measurement=c.mrc", "--sigma=1"], 1, "complex values"),
    (
      ["--measurement=small.npz", "--init=cinit.npy"],
      1,
      "must hold real numbers",
    ),
    (["--measurement=vs.npz"], 1, "'sigma' must be one real number"),
    (["--measurement=text.npy", "--sigma=1"], 1, "not a NumPy .npy file"),
    (["--measurement=small.npz", "--t_prior=0"], 2, "t_prior must be positive"),
    (["--measurement=small.npz", "--out=./small.npz"], 2, "also an input"),
    (["--measurement=small.npz", "--out=."], 2, "is a folder"),
  ]
  for args, code, message in cases:
    done = run_tool(
      "mtd_tf.reconstruct",
      "--image_size=5",
      "--max_iterations=2",
      *args,
      cwd=small,
    )
    last = _one_line_error(done, code, message)
    assert "allow_pickle" not in last and ".tmp-" not in last
  assert not (small / "estimate.npz").exists()


def test_one_file_under_two_spellings_is_read_once_and_brackets_open(
  small, run_tool
):
  os.rename(small / "small.npz", small / "m[1].npz")
  done = run_tool(
    "mtd_tf.reconstruct",
    "--measurement=m[1].npz,./m[1].npz",
    "--image_size=5",
    "--max_iterations=2",
    "--out=e.npz",
    cwd=small,
  )
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.strip().splitlines()[-1])["measurements"] == 1


def test_bad_recorded_copies_do_not_crash_the_report(small, run_tool):
  with np.load(small / "small.npz") as good:
    fields = dict(good)
  for name, corners, rotations in (
    ("float.npz", np.array([[1.5, 2.0]]), np.array([0])),
    ("text.npz", np.array([[1, 2]]), np.array(["a"])),
    ("ragged.npz", np.array([1, 2, 3]), np.array([0, 1])),
  ):
    np.savez(
      small / name, **{**fields, "corners": corners, "rotations": rotations}
    )
    done = run_tool(
      "mtd_tf.reconstruct",
      f"--measurement={name}",
      "--image_size=5",
      "--max_iterations=2",
      f"--out=e_{name}",
      cwd=small,
    )
    assert done.returncode == 0, done.stderr
    assert "oracle-alignment floor is not reported" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" in summary and "oracle_alignment_error" not in summary
    assert (small / f"e_{name}").exists()


def test_bad_inputs_of_issue_26(small, run_tool):
  """Each crashed, hung, misled or gave a wrong answer with exit 0 before."""
  from mtd_tf.model import io  # pylint: disable=g-import-not-at-top

  with np.load(small / "small.npz") as good:
    m = good["measurement"]
  (small / "folder").mkdir()
  os.mkfifo(small / "fifo.npz")
  (small / "loop.npz").symlink_to(small / "loop.npz")
  np.save(small / "one.npy", m[:5, :5])
  np.save(small / "const.npy", np.full((20, 20), 5.0, np.float32))
  np.save(small / "a.npy", m)
  np.save(small / "b.npy", 100 * m)
  io.save_measurement(small / "c.mrc", io.Measurement(m))
  data = (small / "c.mrc").read_bytes()
  (small / "cut.mrc").write_bytes(data[: len(data) - 200])
  before = sorted(os.listdir(small))
  cases = [
    (["--measurement=folder"], 1, "is a folder"),
    (["--measurement=fifo.npz"], 1, "is a FIFO (named pipe), not a regular"),
    (["--measurement=loop.npz"], 1, "is a symlink loop"),
    (["--measurement=small.npz,"], 2, "entry 2 of 2 is an empty file name"),
    (
      ["--measurement=small.npz", "--gamma=constant:1"],
      2,
      "given without a prior",
    ),
    (["--measurement=small.npz", "--t_prior=0.1"], 2, "given without a prior"),
    (["--measurement=one.npy"], 1, "holds 1 x 1 patches"),
    (["--measurement=one.npy", "--sigma=1"], 1, "at least 2 x 2"),
    (["--measurement=const.npy"], 1, "is constant (every pixel is 5)"),
    (["--measurement=a.npy,b.npy"], 1, "different scales: b.npy (sigma"),
    (
      ["--measurement=c.mrc,small.npz,cut.mrc", "--stream=always"],
      1,
      "cut.mrc: its header (mode 2, float32, 20 x 20 x 1) needs",
    ),
  ]
  if os.path.exists("/dev/zero"):
    cases.append((["--measurement=/dev/zero"], 1, "is a character device"))
  for args, code, message in cases:
    done = run_tool(
      "mtd_tf.reconstruct",
      "--image_size=5",
      "--max_iterations=2",
      "--out=e.npz",
      *args,
      cwd=small,
    )
    _one_line_error(done, code, message)
    assert "does not exist" not in done.stderr
    assert "EM iteration" not in done.stderr
    assert sorted(os.listdir(small)) == before, args


def test_continuous_rotations_default_k_and_error_over_360_angles(
  tmp_path, run_tool
):
  from mtd_tf.model import io  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top
  from mtd_tf.model import simulation  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(3).uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(
    image, snr=2, seed=4, size_factor=4, continuous_rotations=True
  )
  io.save_measurement(tmp_path / "c.npz", sim)
  common = [
    "--measurement=c.npz",
    "--image_size=5",
    "--rotations=continuous",
    "--method=paper",
    "--max_iterations=2",
    "--out=e.npz",
  ]
  done = run_tool("mtd_tf.reconstruct", *common, cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "K=16" in done.stderr  # the continuous default
  # Angles are not indices on EM's grid: no oracle floor, and no warning.
  assert "oracle" not in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert "oracle_alignment_error" not in summary
  with np.load(tmp_path / "e.npz") as data:
    estimate = data["estimate"]
  angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
  assert summary["error"] == pytest.approx(
    metrics.relative_error(image, estimate, 16, angles=angles), rel=1e-5
  )
  done = run_tool(
    "mtd_tf.reconstruct", *common, "--num_rotations=8", cwd=tmp_path
  )
  assert done.returncode == 0, done.stderr
  assert "K=8" in done.stderr  # given, it wins
