"""Plots: PNGs written atomically, sized as asked, without touching pyplot."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from mtd_tf.pipelines import figures

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG
  return struct.unpack(">II", head[16:24])  # (width, height)


def test_image_grid_is_a_square_grid_at_80_dpi(tmp_path, rng):
  path = tmp_path / "grid.png"
  assert figures.image_grid(rng.uniform(0, 1, (7, 5, 5)), path) == path
  # 7 images: 3 columns, 3 rows, one inch each at 80 dpi.
  assert _png_size(path) == (240, 240)
  assert os.listdir(tmp_path) == ["grid.png"]


def test_image_grid_title_and_no_clip(tmp_path, rng):
  path = tmp_path / "grid.png"
  figures.image_grid(
    3 * rng.standard_normal((4, 6, 6)), path, clip=None, title="samples"
  )
  width, height = _png_size(path)
  assert (width, height) == (160, 192)  # 2 x 2 inches plus 0.4 for the title.


def test_no_pyplot_so_no_backend_switch(tmp_path):
  script = (
    "import sys, numpy as np\n"
    "from mtd_tf.pipelines import figures\n"
    f"figures.image_grid(np.ones((1, 4, 4)), {str(tmp_path / 'a.png')!r})\n"
    "assert 'matplotlib.pyplot' not in sys.modules\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 0, done.stderr
  assert os.listdir(tmp_path) == ["a.png"]


def _results():
  runs, summary = [], []
  for snr in (0.5, 1.0):
    for method in ("no_prior", "prior"):
      for trial in range(2):
        runs.append(
          {
            "snr": snr,
            "trial": trial,
            "method": method,
            "error": 0.1 * (trial + 1),
          }
        )
      summary.append(
        {
          "snr": snr,
          "method": method,
          "mean_error": 0.15,
          "std_error": 0.05,
          "mean_error_shift_aligned": 0.1,
          "std_error_shift_aligned": 0.02,
          "count": 2,
        }
      )
  return {
    "dataset": "gaussian",
    "trials": 2,
    "snrs": [0.5, 1.0],
    "runs": runs,
    "summary": summary,
  }


@pytest.mark.parametrize(
  "name", ["error_vs_snr", "reconstructions", "measurements"]
)
def test_experiment_figures(tmp_path, rng, name):
  arrays = {
    "targets": rng.uniform(0, 1, (2, 5, 5)),
    "estimates": rng.uniform(0, 1, (8, 5, 5)),
    "measurements": rng.standard_normal((2, 55, 55)),
  }
  path = tmp_path / f"{name}.png"
  draw = getattr(figures, name)
  if name == "error_vs_snr":
    draw(_results(), path)
  else:
    draw(_results(), arrays, path)
  width, height = _png_size(path)
  assert width > 100 and height > 100
  assert os.listdir(tmp_path) == [f"{name}.png"]


def test_failed_plot_leaves_no_file(tmp_path):
  with pytest.raises(TypeError):
    figures.image_grid(np.zeros((2, 3)), tmp_path / "bad.png")
  assert os.listdir(tmp_path) == []
