"""Error against the amount of data: section IV's experiment at several N.

A measurement of N = F L pixels a side at density p L^2 / N^2 holds
p = density F^2 copies (Table I: F = 11, about 12 copies). The error floor
of a method that recovers the image from its copies falls as
sqrt(1 / (p SNR)) once it aligns them well; the prior's worth is the data
it saves, read off the error-against-data curves of `recommended` and
`recommended_no_prior`. `run_data_scaling` runs one experiment per size
factor (`experiments.run_to_folder`, each in OUT_DIR/size_<F>, resumable as
it is) and writes error_vs_data.json and error_vs_data.png beside them.
"""

import dataclasses
import json
import os

from mtd_tf.base import atomic
from mtd_tf.model import simulation
from mtd_tf.pipelines import experiments
from mtd_tf.pipelines import figures

__all__ = ["copies", "run_data_scaling", "scaling_rows", "subfolder"]


def copies(size_factor, density):
  """Copies in an N x N measurement, N = size_factor L (int)."""
  # The simulator's count does not depend on L: use L = 1.
  size = int(size_factor)
  return simulation.requested_copies((size, size), 1, density)


def subfolder(out_dir, size_factor):
  """Where the experiment at one size factor is written."""
  return os.path.join(os.fspath(out_dir), f"size_{int(size_factor)}")


def _check_factors(size_factors):
  factors = [int(f) for f in size_factors]
  if not factors:
    raise experiments.ExperimentError("Give at least one size factor.")
  if min(factors) < 2:
    raise experiments.ExperimentError(
      f"Size factors must be >= 2, got {min(factors)}."
    )
  if len(set(factors)) != len(factors):
    raise experiments.ExperimentError(
      f"Size factors repeat: {','.join(map(str, factors))}."
    )
  return sorted(factors)


def scaling_rows(results_by_factor):
  """The summary rows of each experiment with its size and copy count.

  Args:
    results_by_factor: {size factor: results dict of `run_to_folder`}.

  Returns:
    list of dicts (size_factor, copies, method, snr, mean_error, std_error,
    mean_error_shift_aligned, std_error_shift_aligned), by size factor.
  """
  rows = []
  for factor in sorted(results_by_factor):
    results = results_by_factor[factor]
    count = copies(factor, results["parameters"]["density"])
    for row in results["summary"]:
      rows.append(
        {
          "size_factor": int(factor),
          "copies": count,
          "method": row["method"],
          "snr": float(row["snr"]),
          **{
            key: float(row[key])
            for key in (
              "mean_error",
              "std_error",
              "mean_error_shift_aligned",
              "std_error_shift_aligned",
            )
          },
        }
      )
  return rows


def run_data_scaling(
  config, size_factors, out_dir, *, block_size=None, resume=False
):
  """Runs `config` at every size factor and draws the error against data.

  Args:
    config: an `experiments.ExperimentConfig` (its size_factor is replaced
      by each of size_factors).
    size_factors: ints >= 2, N / L of each experiment.
    out_dir: the folder of the experiments (size_<F>/) and of
      error_vs_data.json and error_vs_data.png.
    block_size: see `experiments.run_to_folder`.
    resume: continue each experiment from its finished blocks; one that
      finished with the same settings is read back, not run again.

  Returns:
    (rows of `scaling_rows`, {file name: path} of the two files).

  Raises:
    experiments.ExperimentError: bad size factors (before any work), or
      those of `run_to_folder`.
  """
  factors = _check_factors(size_factors)
  configs = {f: dataclasses.replace(config, size_factor=f) for f in factors}
  for each in configs.values():
    experiments.check_config(each)  # every size, before the first runs
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for factor, each in configs.items():
    folder = subfolder(out_dir, factor)
    done = _finished(folder, each) if resume else None
    results[factor] = (
      done
      or experiments.run_to_folder(
        each, folder, block_size=block_size, resume=resume
      )[0]
    )
  rows = scaling_rows(results)
  paths = {
    name: os.path.join(out_dir, name)
    for name in ("error_vs_data.png", "error_vs_data.json")
  }
  with atomic.atomic_files(list(paths.values())) as (png, record):
    figures.error_vs_data(rows, png, title=config.dataset)
    with open(record, "w") as f:
      json.dump(
        {
          "dataset": config.dataset,
          "size_factors": factors,
          "settings": experiments.settings(config),
          "rows": rows,
        },
        f,
        indent=1,
      )
  return rows, paths


def _finished(folder, config):
  """The results of a finished experiment of `config` in folder, or None."""
  path = os.path.join(folder, "results.json")
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  stored = results.get("settings")
  return results if stored == experiments.settings(config) else None
