"""Tests of trainers/: configs, runs, checkpoints, resume, export, the tools."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import cli
from mtd_tf import priors
from mtd_tf.base import fields
from mtd_tf.priors import orientation
from mtd_tf.priors import sde
from trainers import configs
from trainers import gaussian_prior
from trainers import loop
from trainers import mnist_prior
from trainers import runs
from trainers import train_gaussian_prior
from trainers import train_mnist_prior
from trainers import train_orientation

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = configs.MnistDataConfig(heldout=16, channels=(8, 16, 16), embed_dim=16)
ENV = dict(
  os.environ,
  TF_CPP_MIN_LOG_LEVEL="3",
  PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
)


def _tool_command(module, *flags):
  return [sys.executable, "-m", module, *flags]


@pytest.fixture(autouse=True)
def _new_export_prior(monkeypatch):
  monkeypatch.setattr(priors, "export_prior", priors.export_prior)


def _digits(n=96, size=28, seed=0):
  """Blob images in [0, 1], a stand-in for digits (no data file needed)."""
  rng = np.random.default_rng(seed)
  grid = np.arange(size)
  images = np.zeros((n, size, size), np.float32)
  for i in range(n):
    r, c = rng.uniform(8, 20, 2)
    images[i] = np.exp(-((grid[:, None] - r) ** 2 + (grid[None] - c) ** 2) / 18)
  return images


def _config(tmp_path, steps, **kwargs):
  kwargs.setdefault("run_name", "tiny-run")
  return configs.TrainConfig(
    name="tiny",
    steps=steps,
    batch_size=8,
    warmup_steps=2,
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every_secs=1e9,
    log_every_steps=2,
    heldout_every_steps=3,
    **kwargs,
  )


def _steps_in(folder):
  latest = tf.train.latest_checkpoint(str(folder))
  return int(latest.rsplit("-", 1)[1]) if latest else None


def test_learning_rate_schedule():
  config = configs.TrainConfig(
    name="x",
    steps=1000,
    learning_rate=1e-3,
    warmup_steps=100,
    final_lr_fraction=0.1,
  )
  assert loop.learning_rate_at(config, 0) == pytest.approx(1e-5)
  assert loop.learning_rate_at(config, 99) == pytest.approx(1e-3)
  assert loop.learning_rate_at(config, 1000) == pytest.approx(1e-4)
  lrs = [loop.learning_rate_at(config, s) for s in range(100, 1001, 50)]
  assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_gaussian_data_is_seeded():
  data = configs.GaussianDataConfig(num_samples=50)
  mu = gaussian_prior.gaussian_mean(data)
  assert mu.shape == (5, 5) and set(np.unique(mu)) <= {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(mu, gaussian_prior.gaussian_mean(data))
  np.testing.assert_array_equal(
    gaussian_prior.gaussian_samples(data), gaussian_prior.gaussian_samples(data)
  )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(steps=0), "steps=0"),
    (dict(steps=-3), "steps=-3"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(learning_rate=float("nan")), "learning_rate=nan"),
    (dict(learning_rate=3.0), "learning_rate=3.0"),
    (dict(ema_decay=1.0), "ema_decay=1.0"),
    (dict(version=0), "version=0"),
    (dict(run_name="a/b"), "run_name='a/b'"),
    (dict(export_only=True), "export_only"),
  ],
)
def test_train_config_refuses_bad_values(kwargs, message):
  with pytest.raises(configs.TrainingError, match=re.escape(message)) as err:
    configs.TrainConfig(name="x", **kwargs)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  "cls, kwargs, message",
  [
    (configs.GaussianDataConfig, dict(image_size=0), "image_size=0"),
    (configs.GaussianDataConfig, dict(num_samples=0), "num_samples=0"),
    (configs.MnistDataConfig, dict(channels=()), "channels=[]"),
    (configs.MnistDataConfig, dict(embed_dim=15), "embed_dim=15"),
    (configs.MnistDataConfig, dict(activation="relu"), "activation='relu'"),
    (configs.MnistDataConfig, dict(eps=0.0), "eps=0.0"),
  ],
)
def test_data_configs_refuse_bad_values(cls, kwargs, message):
  with pytest.raises(configs.TrainingError, match=re.escape(message)):
    cls(**kwargs)


def test_run_key_hashes_the_settings_that_shape_the_weights():
  base = configs.TrainConfig(name="p")
  shaped = runs.weights_config(base, {"data": 1})
  key = runs.run_key(base, shaped)
  assert re.fullmatch(r"p-[0-9a-f]{10}", key)
  # Steps, folders and logging do not change the key; the seed does.
  other = configs.TrainConfig(
    name="p", steps=5, log_every_steps=7, checkpoint_dir="/elsewhere"
  )
  assert runs.run_key(other, runs.weights_config(other, {"data": 1})) == key
  seeded = configs.TrainConfig(name="p", seed=1)
  assert runs.run_key(seeded, runs.weights_config(seeded, {"data": 1})) != key
  assert runs.run_key(base, runs.weights_config(base, {"data": 2})) != key


def test_mnist_eps_default_is_the_sde_default():
  # configs writes the value out to stay TensorFlow-free.
  assert configs.DEFAULT_EPS == sde.DEFAULT_EPS
  assert configs.MnistDataConfig().eps == sde.DEFAULT_EPS


def _parsed(tool, *argv):
  fv = flags.FlagValues()
  tool.define_flags(fv)
  fv([tool.__name__, *argv])
  return fv


def test_every_config_field_is_a_flag_with_its_help_and_default():
  fv = _parsed(train_mnist_prior)
  for cls in (configs.TrainConfig, configs.MnistDataConfig):
    for field in dataclasses.fields(cls):
      flag = fv[fields.flag_name(field)]
      assert flag.help.endswith(field.metadata["help"])  # enums: <a|b>: ...
  assert fv["export_version"].default is None
  assert fv["channels"].default == ["32", "64", "128"]
  assert fv["activation"].parser.enum_values == list(configs.ACTIVATIONS)
  # The tool's own defaults; the others are the dataclass's.
  assert cli.config_from_flags(fv, configs.TrainConfig) == configs.TrainConfig(
    name="mnist_unet",
    steps=20000,
    warmup_steps=200,
    export_dir=os.path.join("mtd_priors", "mnist_unet"),
  )
  assert (
    cli.config_from_flags(fv, configs.MnistDataConfig)
    == configs.MnistDataConfig()
  )
  fv = _parsed(
    train_gaussian_prior,
    "--export_dir=none",
    "--export_version=3",
    "--hidden=16",
  )
  config = cli.config_from_flags(fv, configs.TrainConfig)
  assert (config.name, config.steps, config.batch_size) == (
    "gaussian_fc",
    6000,
    256,
  )
  assert (config.export_dir, config.version) == ("", 3)
  data = cli.config_from_flags(fv, configs.GaussianDataConfig)
  assert data == configs.GaussianDataConfig(hidden=16)


def test_orientation_flags_take_the_config_docstring_table():
  # OrientationConfig declares no `option`s: its docstring documents them.
  docs = fields.attribute_docs(orientation.OrientationConfig)
  names = [f.name for f in dataclasses.fields(orientation.OrientationConfig)]
  assert sorted(docs) == sorted(names)
  fv = _parsed(train_orientation, "--epochs=2", "--export_version=4")
  assert fv["epochs"].help == docs["epochs"]
  config = cli.config_from_flags(fv, orientation.OrientationConfig)
  assert config == orientation.OrientationConfig(epochs=2)
  target = cli.config_from_flags(fv, configs.OrientationExportConfig)
  assert (target.source, target.version) == ("mnist_unet/2", 4)


@pytest.mark.parametrize(
  "module", ["train_gaussian_prior", "train_mnist_prior"]
)
def test_tools_define_their_flags_without_tensorflow(module):
  code = (
    f"import sys; from trainers import {module} as t; from absl import flags; "
    "t.define_flags(flags.FlagValues()); "
    "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'"
  )
  res = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=60,
    env=ENV,
  )
  assert res.returncode == 0, res.stderr[-2000:]


def test_help_lists_the_generated_flags(capsys):
  code, out, _ = _run_tool(
    train_gaussian_prior, ["train-gaussian-prior", "--help"], capsys
  )
  assert code == 0 and out.startswith("`train-gaussian-prior`")
  assert "--export_version: Version number to export" in out
  assert "--steps: Total optimisation steps" in out and "'6000'" in out


@pytest.mark.slow
def test_tiny_mnist_run_checkpoints_resumes_and_exports(tmp_path):
  images = _digits()
  first = mnist_prior.train_mnist_prior(_config(tmp_path, 4), TINY, images)
  run_dir = tmp_path / "ckpt" / "tiny-run"
  assert first.run_dir == str(run_dir)
  assert (first.start_step, first.step) == (0, 4)
  assert np.isfinite(first.train_loss) and np.isfinite(first.heldout_loss)
  assert _steps_in(run_dir) == 4
  assert list((run_dir / "tb").glob("events.out.tfevents.*"))
  stored = json.loads((run_dir / "run.json").read_text())
  assert stored["weights_config"]["batch_size"] == 8

  # "Interrupted" after 4 steps; asked again for 7 it resumes at step 4.
  model_dir = tmp_path / "mtd_priors" / "tiny"
  second = mnist_prior.train_mnist_prior(
    _config(tmp_path, 7, export_dir=str(model_dir)), TINY, images
  )
  assert (second.start_step, second.step) == (4, 7)
  assert _steps_in(run_dir) == 7
  assert second.train_seconds >= first.train_seconds
  assert second.export_dir == str(model_dir / "1")  # the next free version

  prior = priors.load_prior(second.export_dir)
  meta = prior.metadata
  assert meta["kind"] == "mnist" and meta["image_size"] == 28
  assert meta["steps"] == 7 and meta["run"] == "tiny-run"
  assert meta["channels"] == [8, 16, 16]
  assert meta["network"]["kwargs"]["channels"] == [8, 16, 16]
  assert meta["training_config"] == stored["weights_config"]
  assert meta["mtd_tf_version"]
  out = prior(images[:3], 0.01)
  assert out.shape == (3, 28, 28) and np.all(np.isfinite(out))

  # A checkpoint past --steps is exported as it is: its own step count and
  # settings, no training; the next free version.
  again = mnist_prior.train_mnist_prior(
    _config(tmp_path, 2, export_dir=str(model_dir)), TINY, images
  )
  assert (again.start_step, again.step) == (7, 7)
  assert again.export_dir == str(model_dir / "2")
  reloaded = priors.load_prior(again.export_dir)
  assert reloaded.metadata["steps"] == 7
  np.testing.assert_allclose(
    reloaded(images[:3], 0.01), out, rtol=1e-5, atol=1e-5
  )

  # Published versions never change: refused before any training.
  with pytest.raises(configs.TrainingError, match="exists and published"):
    mnist_prior.train_mnist_prior(
      _config(tmp_path, 9, export_dir=str(model_dir), version=1), TINY, images
    )
  assert _steps_in(run_dir) == 7
  # The same run name with other settings is refused.
  wider = configs.MnistDataConfig(
    heldout=16, channels=(8, 16, 32), embed_dim=16
  )
  with pytest.raises(
    configs.TrainingError, match="Run tiny-run was trained with data="
  ):
    mnist_prior.train_mnist_prior(_config(tmp_path, 9), wider, images)
  seeded = _config(tmp_path, 9, seed=3)
  with pytest.raises(configs.TrainingError, match="seed=0.*not 3"):
    mnist_prior.train_mnist_prior(seeded, TINY, images)
  # Without a run name the settings key the run: a fresh folder.
  keyed = mnist_prior.train_mnist_prior(
    _config(tmp_path, 2, seed=3, run_name=""), TINY, images
  )
  assert keyed.start_step == 0
  assert re.fullmatch(r"tiny-[0-9a-f]{10}", os.path.basename(keyed.run_dir))


@pytest.mark.slow
def test_export_only_and_refusals_before_work(tmp_path):
  images = _digits(40)
  with pytest.raises(configs.TrainingError, match="no checkpoint"):
    mnist_prior.train_mnist_prior(
      _config(tmp_path, 5, export_only=True, export_dir=str(tmp_path / "m")),
      TINY,
      images,
    )
  assert not (tmp_path / "m").exists()
  with pytest.raises(configs.TrainingError, match="batch_size=64"):
    mnist_prior.train_mnist_prior(
      configs.TrainConfig(
        name="t", steps=1, batch_size=64, checkpoint_dir=str(tmp_path / "ckpt")
      ),
      TINY,
      images,
    )
  with pytest.raises(ValueError, match="not divisible"):
    mnist_prior.train_mnist_prior(_config(tmp_path, 1), TINY, _digits(40, 30))
  assert not (tmp_path / "ckpt").exists()


def _run_tool(tool, argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tool.run(argv)
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--steps=0", "steps=0"),
    ("--batch_size=-1", "batch_size=-1"),
    ("--learning_rate=0", "learning_rate=0"),
    ("--image_size=0", "image_size=0"),
    ("--export_version=0", "version=0"),
  ],
)
def test_gaussian_tool_refuses_bad_flags(tmp_path, capsys, flag, message):
  code, out, err = _run_tool(
    train_gaussian_prior,
    ["train-gaussian-prior", flag, f"--checkpoint_dir={tmp_path}"],
    capsys,
  )
  assert code == 2 and out == ""
  assert err.count("\n") == 1 and message in err, err
  assert not list(tmp_path.iterdir())


def test_mnist_tool_refuses_missing_or_wrong_files(tmp_path, capsys):
  ckpt = f"--checkpoint_dir={tmp_path / 'ckpt'}"
  code, _, err = _run_tool(
    train_mnist_prior,
    ["train-mnist-prior", f"--mnist_npz={tmp_path / 'no.npz'}", ckpt],
    capsys,
  )
  assert code == 1 and err.count("\n") == 1 and "does not exist" in err
  text = tmp_path / "mnist.npz"
  text.write_text("not an archive")
  code, _, err = _run_tool(
    train_mnist_prior,
    ["train-mnist-prior", f"--mnist_npz={text}", ckpt],
    capsys,
  )
  assert (
    code == 1 and err.count("\n") == 1 and "not an .npz file of arrays" in err
  )
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, images=np.zeros((3, 28, 28)))
  code, _, err = _run_tool(
    train_mnist_prior,
    ["train-mnist-prior", f"--mnist_npz={wrong}", ckpt],
    capsys,
  )
  assert code == 1 and "lacks the keys ['x_train']" in err
  code, _, err = _run_tool(
    train_mnist_prior, ["train-mnist-prior", "--channels=8,x", ckpt], capsys
  )
  assert code == 2 and "--channels=8,x" in err
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
  "flag, code, message",
  [
    ("--epochs=0", 2, "epochs=0"),
    ("--max_noise=-0.1", 2, "max_noise=-0.1"),
    ("--mnist_npz=/nonexistent/mnist.npz", 1, "does not exist"),
    ("--source=no_such_prior", 1, "no_such_prior"),
    ("--export_version=1", 1, "published versions never change"),
  ],
)
def test_orientation_tool_refuses_in_one_line_before_work(
  tmp_path, capsys, flag, code, message
):
  (tmp_path / "m" / "1").mkdir(parents=True)
  status, out, err = _run_tool(
    train_orientation,
    ["train-orientation", f"--export_dir={tmp_path / 'm'}", flag],
    capsys,
  )
  assert status == code and out == "" and message in err, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert sorted(os.listdir(tmp_path / "m")) == ["1"]


def test_mnist_tool_without_internet_says_pass_mnist_npz(
  tmp_path, capsys, monkeypatch
):
  def offline():
    raise Exception("URL fetch failure: no route to host")

  monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
  code, _, err = _run_tool(
    train_mnist_prior,
    ["train-mnist-prior", f"--checkpoint_dir={tmp_path}"],
    capsys,
  )
  assert code == 1 and err.count("\n") == 1
  assert "--mnist_npz" in err and "no internet" in err


@pytest.mark.slow
def test_existing_export_version_refused_before_training(tmp_path, capsys):
  (tmp_path / "m" / "1").mkdir(parents=True)
  code, _, err = _run_tool(
    train_gaussian_prior,
    [
      "train-gaussian-prior",
      "--steps=3",
      f"--checkpoint_dir={tmp_path / 'c'}",
      f"--export_dir={tmp_path / 'm'}",
      "--export_version=1",
    ],
    capsys,
  )
  assert code == 1 and err.count("\n") == 1, err
  assert "exists and published versions never change" in err
  assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_gaussian_tool_subprocess(tmp_path):
  args = _tool_command(
    "trainers.train_gaussian_prior",
    "--steps=6",
    "--batch_size=32",
    "--num_samples=200",
    "--hidden=16",
    "--log_every_steps=3",
    "--heldout_every_steps=3",
    f"--checkpoint_dir={tmp_path / 'ckpt'}",
  )
  res = subprocess.run(
    args, capture_output=True, text=True, timeout=180, env=ENV, cwd=tmp_path
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.startswith("step 6 ")
  assert "step 6/6" in res.stderr and "ETA" in res.stderr
  # The default export folder is in the current folder, never saved_models/.
  meta = json.loads(
    (
      tmp_path / "mtd_priors" / "gaussian_fc" / "1" / "assets" / "prior.json"
    ).read_text()
  )
  assert meta["kind"] == "gaussian" and len(meta["mu"]) == 25
  assert meta["mu_seed"] == 2024 and meta["steps"] == 6
  assert meta["network"] == {
    "builder": "gaussian_score_mlp",
    "kwargs": {"dim": 25, "hidden": 16},
  }
  (run_dir,) = (tmp_path / "ckpt").iterdir()
  assert (run_dir / "run.json").exists()
  # --quiet: nothing but the summary.
  res = subprocess.run(
    args + ["--steps=7", "--quiet"],
    capture_output=True,
    text=True,
    timeout=180,
    env=ENV,
    cwd=tmp_path,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  # (TensorFlow's own C++ start-up lines are not ours to silence.)
  assert "train_gaussian_prior:" not in res.stderr, res.stderr
  assert res.stdout.startswith("step 7 ")
  assert (tmp_path / "mtd_priors" / "gaussian_fc" / "2").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize(
  "signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_interrupted_trainer_saves_a_checkpoint_and_exits(
  tmp_path, signum, status
):
  images = tmp_path / "small.npz"
  np.savez(images, x_train=(_digits(64) * 255).astype(np.uint8))
  ckpt = tmp_path / "ckpt"
  proc = subprocess.Popen(
    _tool_command(
      "trainers.train_mnist_prior",
      f"--mnist_npz={images}",
      "--steps=1000000",
      "--batch_size=8",
      "--channels=8,16,16",
      "--embed_dim=16",
      "--heldout=16",
      "--log_every_steps=2",
      "--heldout_every_steps=100000",
      "--checkpoint_every_secs=1e9",
      f"--checkpoint_dir={ckpt}",
      "--run_name=r",
      "--export_dir=none",
    ),
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    # Wait for the first progress line, then interrupt.
    deadline = time.time() + 180
    lines = []
    while time.time() < deadline:
      line = proc.stderr.readline()
      lines.append(line)
      if "step 2/" in line or not line:
        break
    assert any("step 2/" in line for line in lines), "".join(lines)
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == status, rest
  match = re.search(r"Interrupted at step (\d+): saved checkpoint", rest)
  assert match, rest
  assert _steps_in(ckpt / "r") == int(match.group(1)) >= 2


def test_step_interrupts_are_held_until_the_step_ends():
  """A signal mid-step is raised at the step boundary, a second at once."""
  before = signal.getsignal(signal.SIGINT)
  for signum, error in (
    (signal.SIGINT, KeyboardInterrupt),
    (signal.SIGTERM, cli.Terminated),
  ):
    with loop.StepInterrupts() as interrupts:
      os.kill(os.getpid(), signum)  # handled now: the step goes on
      assert interrupts.pending == signum
      with pytest.raises(error):
        interrupts.check()
      interrupts.check()  # raised once
      os.kill(os.getpid(), signum)
      with pytest.raises(error):
        os.kill(os.getpid(), signum)  # a second signal: at once
  assert signal.getsignal(signal.SIGINT) is before
