"""Several EM starts per problem: start families, pruning and selection.

EM (Algorithm 1) climbs to the nearest mode of its objective; one start
often ends in a wrong basin. Several starts of one problem run side by side
in the batched EM (they share the measurement's patch spectra); starts that
trail in the data log-likelihood (eq. 13) can be pruned (`prune`), and at
the end the start with the highest log-likelihood wins (`select`). Measured
on MNIST with Table I's linear gamma: pruning to 1 or 2 of 4 starts at
iteration 10 lost the right basin on one seed (SNR 1 error 0.197 -> 0.319),
so prune late (or not at all) under that schedule.

Start families (measured on MNIST, docs/recommended.md):
- the paper's start (Table I: the mean of ten training digits);
- windows of the measurement with the highest energy (`window_starts`):
  each L x L window around an energy peak holds, at density 0.1, most of one
  noisy copy, so it starts EM near a copy of the image in some position;
- training digits (stand-ins for draws from the prior, which cost a
  probability-flow solve each): no better than the windows, and data-free.

Selection objective: the data log-likelihood log p(M; F) of the final
estimate (eq. 13-15). With a prior, the MAP objective adds gamma log p(F);
log p(F) of a diffusion prior needs a probability-flow ODE solve per
candidate, and with Table I's MNIST schedule the prior's weight at the end
is gamma = 1 against a likelihood summed over D = 121 patches of L^2 = 784
pixels, so (argued, not measured) the prior term cannot reorder candidates whose
log-likelihoods differ by more than a few units; the log-likelihood is what
is used, and it picked a start within 0.01-0.04 of the best one's error.
"""

import numpy as np
from scipy import ndimage

__all__ = ["StartsError", "window_starts", "prune", "select"]


class StartsError(ValueError):
  """Bad input to a starts function."""


def window_starts(measurement, image_size, num_windows):
  """L x L windows of the measurement around its highest-energy peaks.

  The local energy is the mean of M^2 over an L x L box around each pixel;
  the highest peak is taken, a 2L x 2L neighbourhood around it is
  excluded (copies are at least 2L apart, docs/conventions.md), and so on.

  Args:
    measurement: array [H, W].
    image_size: L.
    num_windows: how many windows.

  Returns:
    float64 [num_windows, L, L] (fewer when the measurement has no room).
  """
  measurement = np.asarray(measurement, np.float64)
  size = int(image_size)
  if measurement.ndim != 2 or min(measurement.shape) < size:
    raise StartsError(
      f"measurement must be 2-D and at least {size} x {size}, got shape "
      f"{measurement.shape}."
    )
  energy = ndimage.uniform_filter(measurement**2, size, mode="constant")
  half = size // 2
  windows = []
  for _ in range(int(num_windows)):
    if not np.isfinite(energy).any():
      break
    row, col = np.unravel_index(np.argmax(energy), energy.shape)
    top = min(max(row - half, 0), measurement.shape[0] - size)
    left = min(max(col - half, 0), measurement.shape[1] - size)
    windows.append(measurement[top : top + size, left : left + size])
    energy[
      max(row - size, 0) : row + size, max(col - size, 0) : col + size
    ] = -np.inf
  return np.stack(windows) if windows else np.zeros((0, size, size))


def _groups(objective, groups):
  objective = np.asarray(objective, np.float64)
  groups = np.asarray(groups)
  if objective.shape != groups.shape or objective.ndim != 1:
    raise StartsError(
      f"objective and groups must be two [B] arrays, got shapes "
      f"{objective.shape} and {groups.shape}."
    )
  return objective, groups


def prune(objective, groups, keep):
  """Which starts survive: the `keep` best of each problem.

  Args:
    objective: float [B], e.g. the log-likelihood after a few iterations
      (NaN counts as worst).
    groups: int [B], the problem each start belongs to.
    keep: starts kept per problem.

  Returns:
    bool [B].
  """
  objective, groups = _groups(objective, groups)
  if int(keep) < 1:
    raise StartsError(f"keep must be >= 1, got {keep}.")
  ranked = np.where(np.isfinite(objective), objective, -np.inf)
  alive = np.zeros(len(objective), bool)
  for g in np.unique(groups):
    members = np.flatnonzero(groups == g)
    best = members[np.argsort(-ranked[members], kind="stable")[: int(keep)]]
    alive[best] = True
  return alive


def select(objective, groups):
  """The winning start of each problem: the highest objective.

  Args:
    objective: float [B] (NaN counts as worst).
    groups: int [B].

  Returns:
    (problem ids [P] in increasing order, index into B of each winner [P]).
  """
  objective, groups = _groups(objective, groups)
  problems = np.unique(groups)
  alive = prune(objective, groups, 1)
  winners = np.array(
    [np.flatnonzero(alive & (groups == g))[0] for g in problems], int
  )
  return problems, winners
