"""All plots: image grids and the figures of the section IV experiments.

Each function draws on its own `matplotlib.figure.Figure` (no pyplot, no
backend switch, so nothing changes in the calling process) and writes a PNG
atomically through `mtd_tf.base.atomic`.

* `image_grid`: images [n, L, L] as a square grid (prior samples).
* `error_vs_snr`: mean error against SNR per method (Figures 3-4).
* `reconstructions`: truth and each method's aligned estimate (Figure 5).
* `measurements`: one measurement per SNR (Figure 1).
"""

import numpy as np

from mtd_tf.base import atomic

__all__ = [
  "image_grid",
  "error_vs_snr",
  "reconstructions",
  "measurements",
  "METHOD_LABELS",
]

METHOD_LABELS = {
  "no_prior": "no prior (Table I gradient M-step)",
  "prior": "score prior (Algorithm 1, Table I)",
  "no_prior_closed_form": "no prior, exact M-step",
  "prior_preconditioned": "score prior, preconditioned M-step",
}


def _figure(**kwargs):
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  return figure.Figure(**kwargs)


def _save(fig, path, **kwargs):
  with atomic.atomic_file(path) as tmp:
    fig.savefig(tmp, format="png", **kwargs)
  return path


def image_grid(images, path, *, clip=(0.0, 1.0), title=""):
  """Writes images [n, L, L] as a square grid PNG.

  Args:
    images: array [n, L, L].
    path: output .png (its folder must exist).
    clip: (low, high) display range, values clipped to it; None: each
      image's own range.
    title: optional title above the grid.

  Returns:
    path.
  """
  images = np.asarray(images)
  n = len(images)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  fig = _figure(figsize=(cols, rows + (0.4 if title else 0)))
  axes = np.ravel(fig.subplots(rows, cols, squeeze=False))
  for ax in axes:
    ax.axis("off")
  for ax, image in zip(axes, images):
    shown = np.clip(image, *clip) if clip else image
    ax.imshow(
      shown,
      cmap="gray",
      vmin=clip[0] if clip else None,
      vmax=clip[1] if clip else None,
    )
  if title:
    fig.suptitle(title, fontsize=8)
  fig.subplots_adjust(
    wspace=0.05,
    hspace=0.05,
    left=0,
    right=1,
    bottom=0,
    top=0.93 if title else 1,
  )
  return _save(fig, path, dpi=80)


def _methods(results):
  return list(dict.fromkeys(r["method"] for r in results["summary"]))


def error_vs_snr(results, path):
  """Mean error +- std against SNR, rotation-aligned and shift-aligned."""
  fig = _figure(figsize=(11, 4))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, key, title in zip(
    axes,
    ("", "_shift_aligned"),
    (
      "error (rotations only, as in the paper)",
      "error aligned over rotations and shifts",
    ),
  ):
    for method in _methods(results):
      rows = [r for r in results["summary"] if r["method"] == method]
      ax.errorbar(
        [r["snr"] for r in rows],
        [r["mean_error" + key] for r in rows],
        yerr=[r["std_error" + key] for r in rows],
        marker="o",
        capsize=3,
        label=METHOD_LABELS.get(method, method),
      )
    ax.set_xscale("log")
    ax.set_xlabel("SNR")
    ax.set_title(
      f"{results['dataset']}, {results['trials']} targets: {title}", fontsize=9
    )
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("mean relative error")
  axes[0].legend(fontsize=8)
  return _save(fig, path, dpi=120, bbox_inches="tight")


def reconstructions(results, arrays, path, snr=None, num_rotations=4):
  """Truth (top row) and each method's estimate, aligned, at one SNR.

  Args:
    results: the results dict of `experiments.run_experiment`.
    arrays: its arrays dict ("targets" [T, L, L], "estimates" [runs, L, L]).
    path: output .png.
    snr: which SNR (default the largest).
    num_rotations: K, for the alignment.
  """
  # Deferred: metrics loads TensorFlow, which drawing alone does not need.
  from mtd_tf.model import metrics  # pylint: disable=g-import-not-at-top

  snr = max(results["snrs"]) if snr is None else snr
  targets = arrays["targets"]
  methods = _methods(results)
  fig = _figure(figsize=(1.3 * len(targets), 1.4 * (1 + len(methods))))
  axes = fig.subplots(1 + len(methods), len(targets), squeeze=False)
  for t, target in enumerate(targets):
    axes[0, t].imshow(target, cmap="gray")
    for m, method in enumerate(methods):
      index = next(
        i
        for i, r in enumerate(results["runs"])
        if r["snr"] == snr and r["trial"] == t and r["method"] == method
      )
      shown = metrics.align(target, arrays["estimates"][index], num_rotations)
      axes[m + 1, t].imshow(shown, cmap="gray")
      axes[m + 1, t].set_title(
        f"{results['runs'][index]['error']:.2f}", fontsize=7
      )
  axes[0, 0].set_ylabel("truth", fontsize=7)
  for m, method in enumerate(methods):
    axes[m + 1, 0].set_ylabel(method.replace("_", " "), fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Reconstructions at SNR {snr:g} (error above each)", fontsize=9)
  return _save(fig, path, dpi=120, bbox_inches="tight")


def measurements(results, arrays, path):
  """One measurement (of target 0) per SNR, side by side (Figure 1)."""
  snrs = results["snrs"]
  fig = _figure(figsize=(3.2 * len(snrs), 3.4))
  axes = fig.subplots(1, len(snrs), squeeze=False)
  for ax, snr, shown in zip(axes[0], snrs, arrays["measurements"]):
    ax.imshow(shown, cmap="gray")
    ax.set_title(f"SNR {snr:g}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  return _save(fig, path, dpi=120, bbox_inches="tight")
