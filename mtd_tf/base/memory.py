"""How much memory a run may plan to use, and sizes said in words.

Every size a user can ask for (rotations, copies, trials, samples, training
examples) is compared with `memory_budget` before any work, and a refusal
says how much it would need (`format_bytes`).
"""

import os

__all__ = [
  "MEMORY_FRACTION",
  "available_memory",
  "memory_budget",
  "budget_source",
  "format_bytes",
]

# The share of the available memory (`available_memory`) a run may plan to
# use: the rest is left to the interpreter, TensorFlow's own buffers, the
# estimates' rounding and the machine's other processes.
MEMORY_FRACTION = 0.8


def available_memory():
  """Bytes a new allocation can get now, or None where the OS does not say.

  /proc/meminfo's MemAvailable (Linux: free memory plus what the kernel
  can reclaim), else physical pages times the page size.
  """
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _resident_memory():
  """Bytes this process holds in memory now (0 where the OS does not say)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError, AttributeError):
    return 0


def memory_budget(available_bytes=None, held=False):
  """The bytes a run may plan to use: `MEMORY_FRACTION` of what is available.

  Args:
    available_bytes: the budget itself, instead of the machine's (tests,
      callers that share the machine); None: `MEMORY_FRACTION` of
      `available_memory()`.
    held: also count what this process holds now (a check repeated during
      a run, whose earlier steps' freed buffers the process may keep and
      reuse, so that the second check does not refuse what the first
      allowed).

  Returns:
    int bytes, or None where the machine's memory is unknown (no check).
  """
  if available_bytes is not None:
    return int(available_bytes)
  available = available_memory()
  if available is None:
    return None
  if held:
    available += _resident_memory()
  return int(MEMORY_FRACTION * available)


def budget_source(available_bytes=None):
  """Where a `memory_budget` came from, for a refusal's message."""
  if available_bytes is None:
    return f"{MEMORY_FRACTION:.0%} of the memory available"
  return "the budget given"


def format_bytes(count):
  """A byte count for a message: '2.46 GiB', '310 MiB', '12 KiB'."""
  count = float(count)
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
    if count >= size:
      return f"{count / size:.3g} {unit}"
  return f"{count / 2**10:.3g} KiB"
