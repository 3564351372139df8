"""A background level is removed before EM: the result is the clean one's.

Issue 26, case 1-2: a measurement plus 1.0 everywhere reconstructed with
error 2.24 (the offset was absorbed into sigma). Each micrograph's
background (`noise.estimate_noise`, the level of the pixels no copy covers)
is now removed first; checked against simulator truth, with the same seed
with and without the offset.
"""

import dataclasses

import numpy as np
import pytest

from mtd_tf.em import micrograph_spectra
from mtd_tf.em import spectra_store
from mtd_tf.model import datasets
from mtd_tf.model import io
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction


def _save(folder, name, sim, offset):
  """The measurement plus `offset`, without its sigma (estimated)."""
  path = folder / name
  io.save_measurement(
    path,
    dataclasses.replace(sim, measurement=sim.measurement + offset, sigma=None),
  )
  return path


def _run(path, **fields):
  config = reconstruction.ReconstructionConfig(
    measurements=(str(path),),
    out=str(path.parent / f"e_{path.stem}.npz"),
    **fields,
  )
  return reconstruction.reconstruct(config)


def test_an_offset_measurement_reconstructs_as_the_clean_one(tmp_path):
  image = np.random.default_rng(8).uniform(0, 1, (5, 5))
  sim = simulation.simulate_measurement(image, snr=5.0, seed=3)
  common = dict(image_size=5, em=dict(progress_every=0))
  clean = _run(_save(tmp_path, "clean.npz", sim, 0.0), **common)
  assert clean["error"] < 0.25
  for offset in (1.0, -40.0):
    shifted = _run(_save(tmp_path, f"off{offset:g}.npz", sim, offset), **common)
    assert shifted["error"] == pytest.approx(clean["error"], abs=0.01)
    assert shifted["sigma"] == pytest.approx(clean["sigma"], rel=1e-3)
    assert shifted["background"][0] == pytest.approx(
      clean["background"][0] + offset, abs=1e-3
    )
  # Left in, the offset is absorbed into sigma: what happened before.
  kept = _run(tmp_path / "off1.npz", background="none", **common)
  assert kept["error"] > 3 * clean["error"]
  assert kept["sigma_from_data"] > 3 * clean["sigma_from_data"]


@pytest.mark.slow
def test_an_offset_digit_reconstructs_as_the_clean_one_with_the_prior(
  tmp_path,
):
  digit = datasets.shipped_digits()["targets"][3]
  sim = simulation.simulate_measurement(digit, snr=1.0, seed=1)
  common = dict(image_size=28, prior="mnist_unet", em=dict(progress_every=0))
  clean = _run(_save(tmp_path, "clean.npz", sim, 0.0), **common)
  shifted = _run(_save(tmp_path, "offset.npz", sim, 1.0), **common)
  assert clean["error"] < 0.2
  assert shifted["error"] == pytest.approx(clean["error"], abs=0.01)
  assert shifted["background"][0] == pytest.approx(1.0, abs=0.01)


def test_streamed_spectra_subtract_each_micrograph_background(tmp_path):
  rng = np.random.default_rng(2)
  arrays = [rng.standard_normal((10, 15)).astype(np.float32) for _ in range(2)]
  paths = []
  for i, array in enumerate(arrays):
    np.save(tmp_path / f"m{i}.npy", array + 10 * (i + 1))
    np.save(tmp_path / f"z{i}.npy", array)
    paths.append(str(tmp_path / f"m{i}.npy"))
  store = spectra_store.SpectraStore(paths, 5, chunk_size=4)
  with pytest.raises(ValueError, match="2 micrographs"):
    store.set_backgrounds([1.0])
  store.set_backgrounds([10.0, 20.0])
  for i in range(2):
    got = store._load(i)  # pylint: disable=protected-access
    want = micrograph_spectra.load_spectra(
      str(tmp_path / f"z{i}.npy"), 5, store.chunk_size(i)
    )
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5)
  store.fold(lambda total, item: total, None)  # caches them
  with pytest.raises(ValueError, match="before the first pass"):
    store.set_backgrounds([0.0, 0.0])
  store.close()
