"""`mtd-bench`: speed and memory of one EM iteration, with baselines.

For each preset (a measurement size: paper-gaussian, paper-mnist,
micrograph, micrograph-k3) measures, in its own process, the compile time,
seconds per EM iteration, the FFT floor any FFT-based E-step must pay, a
baseline with the loop structure of the paper's published code (with the
paper's own figure beside it) and the peak memory; many-micrographs streams
--micrographs micrographs of 4088 x 4088 from MRC files, and accelerated
compares Anderson acceleration and SQUAREM with plain EM to plain EM's 100-iteration log-likelihood
(see `mtd_tf.pipelines.benchmarks`). Prints a table; --json also writes the records.

Example:
  mtd-bench --preset=paper-mnist --repeats=3 --json=bench.json
"""

import json

from absl import flags

from mtd_tf import cli
from mtd_tf.base import atomic

# The library defers TensorFlow until a preset runs: --help stays fast.
from mtd_tf.pipelines import benchmarks


def define_flags(fv):
  flags.DEFINE_multi_enum(
    "preset",
    None,
    list(benchmarks.PRESETS),
    "Presets to run (repeatable); default all.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "json", None, "Write the records to this JSON file.", flag_values=fv
  )
  flags.DEFINE_integer(
    "repeats", 5, "Timed repetitions per preset.", flag_values=fv
  )
  flags.DEFINE_integer(
    "num_streams", 0, "E-step streams (0: one per core).", flag_values=fv
  )
  flags.DEFINE_integer(
    "chunk_size", 64, "Patches per E-step chunk.", flag_values=fv
  )
  flags.DEFINE_integer(
    "micrographs",
    benchmarks.DEFAULT_MICROGRAPHS,
    "Micrographs of the many-micrographs preset.",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "memory_budget_mb",
    0,
    "Spectra held at once by the many-micrographs preset, "
    "in MiB (0: the library default).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "worker",
    False,
    "Internal: run one preset in this process and print its JSON record.",
    flag_values=fv,
  )


def main(fv):
  if fv.repeats < 1:
    raise cli.UsageError(f"--repeats must be >= 1, got {fv.repeats}.")
  if fv.num_streams < 0:
    raise cli.UsageError(f"--num_streams must be >= 0, got {fv.num_streams}.")
  if fv.chunk_size < 1:
    raise cli.UsageError(f"--chunk_size must be >= 1, got {fv.chunk_size}.")
  if fv.micrographs < 1:
    raise cli.UsageError(f"--micrographs must be >= 1, got {fv.micrographs}.")
  if not fv.memory_budget_mb >= 0:
    raise cli.UsageError(
      f"--memory_budget_mb must be >= 0, got {fv.memory_budget_mb}."
    )
  budget = int(fv.memory_budget_mb * 2**20) or None
  names = fv.preset or list(benchmarks.PRESETS)
  try:
    benchmarks.check_sizes(
      names, fv.chunk_size, fv.num_streams or None, fv.micrographs
    )
  except ValueError as err:
    raise cli.UsageError(str(err)) from None
  if fv.worker:
    record = benchmarks.run_preset(
      names[0],
      fv.repeats,
      fv.num_streams or None,
      fv.chunk_size,
      fv.micrographs,
      budget,
    )
    print(benchmarks.RECORD_PREFIX + json.dumps(record))
    return
  if fv.json:
    try:
      atomic.check_output_path(fv.json, (".json",))
    except (ValueError, OSError) as err:
      raise cli.UsageError(f"--json: {err}") from None
  records = benchmarks.run_isolated(
    names,
    fv.repeats,
    fv.num_streams or None,
    fv.chunk_size,
    fv.micrographs,
    budget,
  )
  print(benchmarks.table(records))
  if fv.json:
    with atomic.atomic_file(fv.json) as tmp, open(tmp, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {fv.json}")


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
