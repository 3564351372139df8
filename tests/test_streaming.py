"""Streamed statistics equal the in-memory ones; the cache keeps its budget."""

import dataclasses

import mrcfile
import numpy as np
import pytest
import tensorflow as tf

from mtd_tf import em
from mtd_tf.em import estep
from mtd_tf.em import micrograph_spectra
from mtd_tf.em import spectra_store
from mtd_tf.em import spill_files
from mtd_tf.em import streaming
from mtd_tf.model import patches
from mtd_tf.model import rotations
from mtd_tf.model import simulation
from mtd_tf.pipelines import reconstruction

SIZE = 5


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory):
  """Three small micrographs of one image: two .mrc, one .npy."""
  folder = tmp_path_factory.mktemp("mics")
  rng = np.random.default_rng(11)
  image = rng.uniform(0, 1, (SIZE, SIZE))
  paths, arrays = [], []
  for i, shape in enumerate([(30, 25), (20, 35), (25, 25)]):
    sim = simulation.simulate_measurement(
      image, sigma=0.5, seed=i, measurement_shape=shape
    )
    arrays.append(sim.measurement)
    if i < 2:
      path = folder / f"mic{i}.mrc"
      with mrcfile.new(path) as mrc:
        mrc.set_data(sim.measurement.astype(np.float32))
    else:
      path = folder / f"mic{i}.npy"
      np.save(path, sim.measurement)
    paths.append(str(path))
  return paths, arrays, image


def _in_memory(arrays, images, sigma, rot, dtype):
  patch_set = np.concatenate([patches.extract_patches(a, SIZE) for a in arrays])
  data = patches.patch_spectra([patch_set] * len(images), 7, dtype)
  return estep.make_estep(rot)(
    tf.constant(images, dtype),
    data.spectra,
    data.squared_norms,
    data.mask,
    tf.constant(sigma, dtype),
  )


def _starts(image, batch):
  rng = np.random.default_rng(batch)
  return image[None] + 0.3 * rng.standard_normal((batch, SIZE, SIZE))


@pytest.mark.parametrize(
  "dtype,batch,tolerance",
  [
    (tf.float64, 1, dict(rtol=1e-10, atol=1e-10)),
    (tf.float64, 2, dict(rtol=1e-10, atol=1e-10)),
    (tf.float32, 1, dict(rtol=1e-5, atol=1e-5)),
  ],
)
def test_statistics_equal_in_memory(micrographs, dtype, batch, tolerance):
  paths, arrays, image = micrographs
  rot = rotations.rotation_set(SIZE, 4)
  images = _starts(image, batch)
  sigma = np.linspace(0.5, 0.7, batch)
  data = streaming.StreamingData(paths, SIZE, chunk_size=4, dtype=dtype)
  assert data.num_patches == sum(a.size // SIZE**2 for a in arrays)
  expected = _in_memory(arrays, images, sigma, rot, dtype)
  for _ in range(2):  # the first pass streams, the second reads the cache
    got = data.statistics(images, sigma, rot)
    for field in estep.Statistics._fields:
      want = getattr(expected, field).numpy()
      np.testing.assert_allclose(
        getattr(got, field).numpy(), want, err_msg=field, **tolerance
      )
  assert data.cached_bytes > 0


def test_zero_budget_caches_nothing_and_agrees(micrographs):
  paths, arrays, image = micrographs
  rot = rotations.rotation_set(SIZE, 4)
  images = _starts(image, 1)
  sigma = [0.6]
  cached = streaming.StreamingData(paths, SIZE, chunk_size=4, dtype=tf.float64)
  uncached = streaming.StreamingData(
    paths, SIZE, chunk_size=4, dtype=tf.float64, memory_budget_bytes=0
  )
  for _ in range(2):
    a = cached.statistics(images, sigma, rot)
    b = uncached.statistics(images, sigma, rot)
    assert uncached.cached_bytes == 0
    for field in estep.Statistics._fields:
      np.testing.assert_allclose(
        getattr(a, field).numpy(),
        getattr(b, field).numpy(),
        rtol=1e-12,
        atol=1e-12,
      )


def test_cache_stays_within_budget_and_spills_the_rest(micrographs, tmp_path):
  paths, _, image = micrographs
  rot = rotations.rotation_set(SIZE, 4)
  full = streaming.StreamingData(paths, SIZE, chunk_size=4, dtype=tf.float64)
  expected = full.statistics(_starts(image, 1), [0.6], rot)
  total = full.cached_bytes  # everything fits the default budget
  # Room for part of it beside what a pass holds (`_cache_room`).
  budget = total
  partial = streaming.StreamingData(
    paths,
    SIZE,
    chunk_size=4,
    dtype=tf.float64,
    memory_budget_bytes=budget,
    spill_dir=str(tmp_path),
  )
  for _ in range(3):  # stream and spill, then read the spill files twice
    got = partial.statistics(_starts(image, 1), [0.6], rot)
    # What a pass holds besides comes out of the budget.
    assert 0 < partial.cached_bytes <= budget // 2
    assert partial.spilled_bytes > 0
    assert partial.spilled_bytes + partial.cached_bytes >= total
    for field in estep.Statistics._fields:
      np.testing.assert_allclose(
        getattr(got, field).numpy(),
        getattr(expected, field).numpy(),
        rtol=1e-12,
        atol=1e-12,
      )
  assert len(list(tmp_path.iterdir())) == 1
  partial.close()
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_load_spectra_matches_patch_spectra(micrographs, dtype):
  """A micrograph read from its file: the in-memory spectra, chunked."""
  paths, arrays, _ = micrographs
  assert micrograph_spectra.count_patches(paths[1], SIZE) == 4 * 7
  spectra, squared_norms, mask = micrograph_spectra.load_spectra(
    paths[1], SIZE, 5, dtype
  )
  want = patches.patch_spectra(
    [patches.extract_patches(arrays[1], SIZE)], 5, dtype
  )
  assert spectra.shape == (6, 5, 2 * SIZE, SIZE + 1)
  assert spectra.ctypes.data % 64 == 0  # shared, not copied, by TensorFlow
  tolerance = 1e-12 if dtype == tf.float64 else 1e-4
  np.testing.assert_allclose(
    spectra, want.spectra[0].numpy(), rtol=tolerance, atol=tolerance
  )
  np.testing.assert_allclose(
    squared_norms, want.squared_norms[0].numpy(), rtol=tolerance
  )
  np.testing.assert_array_equal(mask, want.mask[0].numpy())


def test_spill_files_read_back_in_blocks(micrographs, tmp_path, monkeypatch):
  """Blocks of a few chunks into one buffer give back the written spectra."""
  paths, _, _ = micrographs
  item = micrograph_spectra.load_spectra(paths[0], SIZE, 4, tf.float64)
  spilled = spill_files.SpillFiles(tf.float64, str(tmp_path))
  spilled.write(0, item)
  assert 0 in spilled and spilled.holds_all([0])
  assert spilled.nbytes == item[0].nbytes
  chunk_bytes = item[0][0].nbytes
  monkeypatch.setattr(spill_files, "BLOCK_BYTES", 3 * chunk_bytes)
  blocks = spilled.blocks([0])
  assert blocks.tolist() == [[0, 0, 3], [0, 3, 6], [0, 6, 8]]
  seen = spilled.fold(lambda total, part: total + [np.copy(part[0])], [], [0])
  np.testing.assert_array_equal(np.concatenate(seen), item[0])
  spilled.close()
  assert not list(tmp_path.iterdir())


def test_spilled_blocks_give_the_same_statistics(
  micrographs, tmp_path, monkeypatch
):
  """Several blocks per micrograph: the statistics of whole micrographs."""
  paths, _, image = micrographs
  rot = rotations.rotation_set(SIZE, 4)
  kwargs = dict(chunk_size=4, dtype=tf.float64, memory_budget_bytes=0)
  expected = streaming.StreamingData(paths, SIZE, **kwargs).statistics(
    _starts(image, 1), [0.6], rot
  )
  monkeypatch.setattr(spill_files, "BLOCK_BYTES", 1)  # one chunk a block
  data = streaming.StreamingData(paths, SIZE, spill_dir=str(tmp_path), **kwargs)
  for _ in range(2):  # stream and spill, then read one chunk at a time
    got = data.statistics(_starts(image, 1), [0.6], rot)
    for field in estep.Statistics._fields:
      np.testing.assert_allclose(
        getattr(got, field).numpy(),
        getattr(expected, field).numpy(),
        rtol=1e-12,
        atol=1e-12,
      )
  data.close()


def test_store_folds_every_patch_once_per_pass(micrographs):
  paths, arrays, _ = micrographs
  budget = spectra_store.IN_FLIGHT * streaming.spectra_bytes(
    max(a.size // SIZE**2 for a in arrays), SIZE, tf.float64
  )
  store = spectra_store.SpectraStore(
    paths, SIZE, chunk_size=4, dtype=tf.float64, memory_budget_bytes=budget
  )
  for _ in range(2):
    count = store.fold(lambda total, item: total + float(np.sum(item[2])), 0.0)
    assert count == store.num_patches == sum(a.size // SIZE**2 for a in arrays)
  store.close()


def test_spectra_bytes_counts_complex_spectra():
  assert streaming.spectra_bytes(3, 28) == 3 * 56 * 29 * 8
  assert streaming.spectra_bytes(3, 28, tf.float64) == 3 * 56 * 29 * 16


def test_shard_is_round_robin_and_covers_all(micrographs, tmp_path):
  paths, _, _ = micrographs
  shares = [streaming.shard(paths, 2, i) for i in range(2)]
  assert shares == [[paths[0], paths[2]], [paths[1]]]
  folder = str(tmp_path)
  for name in ("b.npy", "a.npy", "c.npy"):
    np.save(tmp_path / name, np.zeros((5, 5)))
  assert streaming.shard(folder + "/*.npy", 3, 1) == [folder + "/b.npy"]
  with pytest.raises(ValueError, match="worker_index"):
    streaming.shard(paths, 2, 2)
  with pytest.raises(ValueError, match="cannot feed"):
    streaming.shard(paths, 4, 0)


def test_rejects_sides_not_multiple_of_l(micrographs):
  paths, _, _ = micrographs
  with pytest.raises(ValueError, match="multiple of L"):
    streaming.StreamingData(paths, 7)
  data = streaming.StreamingData(paths, 7, crop=True)
  assert data.num_patches == 4 * 3 + 2 * 5 + 3 * 3


def test_em_on_streamed_files_equals_in_memory(micrographs):
  """approximate_em on StreamingData: the in-memory result, every iteration."""
  paths, arrays, image = micrographs
  init = _starts(image, 1)[0]
  options = em.EMOptions(
    max_iterations=8, tolerance=0.0, dtype="float64", chunk_size=4
  )
  expected = em.approximate_em(arrays, SIZE, 0.5, init=init, options=options)
  data = streaming.StreamingData(
    paths, SIZE, chunk_size=4, dtype=tf.float64, memory_budget_bytes=0
  )
  got = em.approximate_em(data, SIZE, 0.5, init=init, options=options)
  assert got.iterations == expected.iterations == 8
  np.testing.assert_allclose(
    got.estimate, expected.estimate, rtol=1e-10, atol=1e-10
  )
  np.testing.assert_allclose(
    got.log_likelihood, expected.log_likelihood, rtol=1e-12
  )
  for method in ("squarem", "secant"):
    fast = dataclasses.replace(options, acceleration=method)
    accelerated = em.approximate_em(data, SIZE, 0.5, init=init, options=fast)
    assert accelerated.log_likelihood[-1] >= expected.log_likelihood[-1]
    # The accelerators see the same statistics streamed or in memory.
    held = em.approximate_em(arrays, SIZE, 0.5, init=init, options=fast)
    np.testing.assert_allclose(
      accelerated.estimate, held.estimate, rtol=1e-9, atol=1e-9
    )


def test_reconstruct_streams_when_over_budget(micrographs, tmp_path):
  """Same estimate streamed (budget exceeded) and in memory."""
  paths, _, _ = micrographs
  mrcs = [p for p in paths if p.endswith(".mrc")]
  common = dict(
    measurements=tuple(mrcs),
    image_size=SIZE,
    sigma=0.5,
    init="uniform",
    method="paper",
    em=dict(
      max_iterations=6,
      tolerance=0.0,
      dtype="float64",
      chunk_size=4,
      progress_every=0,
      acceleration="none",
    ),
  )
  in_memory = reconstruction.ReconstructionConfig(
    out=str(tmp_path / "a.npz"), **common
  )
  streamed = reconstruction.ReconstructionConfig(
    out=str(tmp_path / "b.npz"), memory_budget_mb=0.0, **common
  )
  assert not reconstruction.uses_streaming(in_memory, mrcs)
  assert reconstruction.uses_streaming(streamed, mrcs)
  a = reconstruction.reconstruct(in_memory)
  b = reconstruction.reconstruct(streamed)
  assert not a["streamed"] and b["streamed"]
  np.testing.assert_allclose(
    np.load(tmp_path / "b.npz")["estimate"],
    np.load(tmp_path / "a.npz")["estimate"],
    rtol=1e-6,
    atol=1e-6,
  )  # saved as float32
  assert np.isclose(
    a["final_log_likelihood"], b["final_log_likelihood"], rtol=1e-12
  )


@pytest.mark.parametrize(
  "fields",
  [
    dict(estimate_shift_prior="occupancy"),
    dict(estimate_shift_prior="free"),
    dict(estimate_sigma=True),
    dict(estimate_shift_prior="occupancy", estimate_sigma=True),
  ],
)
def test_shift_prior_and_sigma_by_em_on_streamed_files_equal_in_memory(
  micrographs, fields
):
  """rho(l) and sigma by EM: the streamed run is the in-memory one."""
  paths, arrays, image = micrographs
  init = _starts(image, 1)[0]
  options = em.EMOptions(
    max_iterations=6, tolerance=0.0, dtype="float64", chunk_size=4, **fields
  )
  expected = em.approximate_em(arrays, SIZE, 0.7, init=init, options=options)
  data = streaming.StreamingData(
    paths, SIZE, chunk_size=4, dtype=tf.float64, memory_budget_bytes=0
  )
  got = em.approximate_em(data, SIZE, 0.7, init=init, options=options)
  # sum ||M||^2 is added in another order: sigma's M-step rounds apart.
  close = dict(rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(got.estimate, expected.estimate, **close)
  np.testing.assert_allclose(
    got.log_likelihood, expected.log_likelihood, **close
  )
  np.testing.assert_allclose(got.sigma, expected.sigma, **close)
  if fields.get("estimate_sigma"):
    assert abs(got.sigma - 0.7) > 0.05  # EM moved it towards the true 0.5
  # The patch energy is the brute-force sum of every patch's ||M||^2.
  energy = sum(np.sum(a**2) for a in arrays)
  assert data.patch_energy() == pytest.approx(energy, rel=1e-12)
  # And the patch sum (the spectra's zero frequency) the pixels' sum.
  total = sum(np.sum(a) for a in arrays)
  assert data.patch_sum() == pytest.approx(total, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("per_axis", [2, SIZE])
def test_offset_grid_spectra_equal_the_in_memory_patches(micrographs, per_axis):
  """A micrograph on per_axis^2 grids: `offset_grid_patches`, transformed."""
  paths, arrays, _ = micrographs
  for path, array in zip(paths, arrays):
    expected = patches.offset_grid_patches(array, SIZE, per_axis)  # [D, L, L]
    count = micrograph_spectra.count_patches(path, SIZE, False, per_axis)
    assert count == len(expected)
    spectra, norms, mask = micrograph_spectra.load_spectra(
      path, SIZE, 7, tf.float64, grids_per_axis=per_axis
    )
    reference = patches.patch_spectra([expected], 7, tf.float64)
    d = len(expected)
    np.testing.assert_allclose(
      spectra.reshape(-1, 2 * SIZE, SIZE + 1)[:d],
      np.asarray(reference.spectra).reshape(-1, 2 * SIZE, SIZE + 1)[:d],
      rtol=1e-5,
      atol=1e-5,
    )
    np.testing.assert_allclose(
      norms.reshape(-1)[:d], np.sum(expected**2, axis=(1, 2)), rtol=1e-6
    )
    assert mask.sum() == d
  data = streaming.StreamingData(paths, SIZE, chunk_size=4, dtype=tf.float64)
  regridded = data.regrid(per_axis)
  assert regridded.grids_per_axis == per_axis
  assert regridded.num_patches == sum(
    len(patches.offset_grid_patches(a, SIZE, per_axis)) for a in arrays
  )
  np.testing.assert_allclose(data.first_micrograph(), arrays[0], atol=1e-6)
