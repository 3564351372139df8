"""Tests of trainers/: tiny runs, checkpoints, resume, export, the absl main."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import priors
from trainers import training

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = training.MnistDataConfig(heldout=16, channels=(8, 16, 16), embed_dim=16)


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
  return training.TrainConfig(
      name='tiny', steps=steps, batch_size=8, warmup_steps=2,
      checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every_secs=1e9,
      log_every_steps=2, heldout_every_steps=3, **kwargs)


def test_learning_rate_schedule():
  config = training.TrainConfig(name='x', steps=1000, learning_rate=1e-3,
                                warmup_steps=100, final_lr_fraction=0.1)
  assert training.learning_rate_at(config, 0) == pytest.approx(1e-5)
  assert training.learning_rate_at(config, 99) == pytest.approx(1e-3)
  assert training.learning_rate_at(config, 1000) == pytest.approx(1e-4)
  lrs = [training.learning_rate_at(config, s) for s in range(100, 1001, 50)]
  assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_gaussian_data_is_seeded():
  data = training.GaussianDataConfig(num_samples=50)
  mu = training.gaussian_mean(data)
  assert mu.shape == (5, 5) and set(np.unique(mu)) <= {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(mu, training.gaussian_mean(data))
  np.testing.assert_array_equal(training.gaussian_samples(data),
                                training.gaussian_samples(data))


def test_tiny_mnist_run_checkpoints_resumes_and_exports(tmp_path):
  images = _digits()
  first = training.train_mnist_prior(_config(tmp_path, 4), TINY, images)
  assert (first.start_step, first.step) == (0, 4)
  assert np.isfinite(first.train_loss) and np.isfinite(first.heldout_loss)
  ckpt = tf.train.latest_checkpoint(str(tmp_path / 'ckpt'))
  assert ckpt and ckpt.endswith('ckpt-4')
  # TensorBoard event files were written.
  assert list((tmp_path / 'ckpt' / 'tb').glob('events.out.tfevents.*'))

  # "Interrupted" after 4 steps; asked again for 7 it resumes at step 4.
  export_dir = tmp_path / 'saved_models' / 'tiny' / '1'
  second = training.train_mnist_prior(
      _config(tmp_path, 7, export_dir=str(export_dir)), TINY, images)
  assert (second.start_step, second.step) == (4, 7)
  assert tf.train.latest_checkpoint(str(tmp_path / 'ckpt')).endswith('ckpt-7')
  assert second.train_seconds >= first.train_seconds

  prior = priors.load_prior(str(export_dir))
  meta = prior.metadata
  assert meta['kind'] == 'mnist' and meta['image_size'] == 28
  assert meta['steps'] == 7
  assert meta['channels'] == [8, 16, 16]
  assert meta['mtd_tf_version']
  out = prior(images[:3], 0.01)
  assert out.shape == (3, 28, 28) and np.all(np.isfinite(out))

  # Export only: no training, same step, the exported EMA weights agree.
  again = training.train_mnist_prior(
      _config(tmp_path, 100, export_only=True,
              export_dir=str(tmp_path / 'again' / '1')), TINY, images)
  assert again.step == 7
  reloaded = priors.load_prior(str(tmp_path / 'again' / '1'))
  np.testing.assert_allclose(reloaded(images[:3], 0.01), out, rtol=1e-5,
                             atol=1e-5)


def test_export_only_without_checkpoint_fails(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    training.train_mnist_prior(_config(tmp_path, 5, export_only=True), TINY,
                               _digits(40))


def test_gaussian_main_subprocess(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH',
                                                                ''))
  args = [sys.executable, '-m', 'trainers.train_gaussian_prior', '--steps=6',
          '--batch_size=32', '--num_samples=200', '--hidden=16',
          '--log_every_steps=3', '--heldout_every_steps=3',
          f'--checkpoint_dir={tmp_path / "ckpt"}',
          f'--export_dir={tmp_path / "gaussian" / "1"}']
  res = subprocess.run(args, capture_output=True, text=True, timeout=180,
                       env=env, cwd=tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'step 6 ' in res.stdout
  assert 'step 6/6' in res.stderr  # the progress line with rate and ETA
  assert 'ETA' in res.stderr
  meta = json.loads((tmp_path / 'gaussian' / '1' / 'assets' /
                     'prior.json').read_text())
  assert meta['kind'] == 'gaussian' and len(meta['mu']) == 25
  assert meta['mu_seed'] == 2024
  assert (tmp_path / 'ckpt' / 'config.json').exists()
