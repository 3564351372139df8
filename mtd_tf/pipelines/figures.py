"""All plots: image grids and the figures of the section IV experiments.

Each function draws on its own `matplotlib.figure.Figure` (no pyplot, no
backend switch, so nothing changes in the calling process) and writes a PNG
atomically through `mtd_tf.base.atomic`.

* `image_grid`: images [n, L, L] as a square grid (prior samples).
* `error_vs_snr`: mean error against SNR per method (Figures 3-4).
* `error_vs_data`: mean error against the number of copies, per method
  and SNR (`pipelines.data_scaling`).
* `reconstructions`: truth and each method's aligned estimate (Figure 5).
* `measurements`: one measurement per SNR (Figure 1).
* `tensorboard_run`: one EM run's TensorBoard summaries, drawn as the
  dashboard shows them (`em.summaries`).
"""

import numpy as np

from mtd_tf.base import atomic

__all__ = [
  "image_grid",
  "error_vs_snr",
  "error_vs_data",
  "reconstructions",
  "measurements",
  "tensorboard_run",
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


def _error_panels(curves, x, titles):
  """Mean error +- std against rows[x], per curve, in two panels.

  Args:
    curves: [(label, rows)], rows dicts with x, mean_error, std_error and
      the shift-aligned pair, in the order drawn.
    x: the key of the horizontal axis (log scale).
    titles: the panels' titles (rotation-aligned, shift-aligned error).

  Returns:
    (figure, axes); the caller adds axis labels, ticks and the legend.
  """
  fig = _figure(figsize=(11, 4))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, key, title in zip(axes, ("", "_shift_aligned"), titles):
    for label, rows in curves:
      ax.errorbar(
        [r[x] for r in rows],
        [r["mean_error" + key] for r in rows],
        yerr=[r["std_error" + key] for r in rows],
        marker="o",
        capsize=3,
        label=label,
      )
    ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
  axes[0].set_ylabel("mean relative error")
  return fig, axes


def error_vs_snr(results, path):
  """Mean error +- std against SNR, rotation-aligned and shift-aligned."""
  head = f"{results['dataset']}, {results['trials']} targets"
  fig, axes = _error_panels(
    [
      (
        METHOD_LABELS.get(method, method),
        [r for r in results["summary"] if r["method"] == method],
      )
      for method in _methods(results)
    ],
    "snr",
    (
      f"{head}: error (rotations only, as in the paper)",
      f"{head}: error aligned over rotations and shifts",
    ),
  )
  for ax in axes:
    ax.set_xlabel("SNR")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return _save(fig, path, dpi=120, bbox_inches="tight")


def error_vs_data(rows, path, *, title=""):
  """Mean error +- std against copies per measurement, log-log.

  Args:
    rows: `data_scaling.scaling_rows` (copies, method, snr, mean_error,
      std_error, and the shift-aligned pair).
    path: output .png.
    title: the data set, for the titles.
  """
  curves = list(dict.fromkeys((r["method"], r["snr"]) for r in rows))
  counts = sorted({r["copies"] for r in rows})
  fig, axes = _error_panels(
    [
      (
        f"{METHOD_LABELS.get(method, method)}, SNR {snr:g}",
        sorted(
          (r for r in rows if r["method"] == method and r["snr"] == snr),
          key=lambda r: r["copies"],
        ),
      )
      for method, snr in curves
    ],
    "copies",
    (
      f"{title}: error (rotations only); dotted sqrt(1 / (p SNR))",
      f"{title}: error aligned over rotations and shifts; dotted "
      "sqrt(1 / (p SNR))",
    ),
  )
  for ax in axes:
    # The floor of averaging p perfectly aligned copies: sqrt(1 / (p SNR)).
    for snr in sorted({r["snr"] for r in rows}):
      ax.plot(
        counts,
        [np.sqrt(1.0 / (c * snr)) for c in counts],
        linestyle=":",
        color="gray",
      )
    ax.set_yscale("log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("copies per measurement")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7)
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


# TensorBoard's run colours, for the starts drawn in one panel.
_TENSORBOARD_COLOURS = (
  "#ff7043",
  "#0077bb",
  "#cc3311",
  "#33bbee",
  "#ee3377",
  "#009988",
  "#bbbbbb",
)
# The scalar panels of `tensorboard_run` after the starts', in order: tag,
# and whether its axis is logarithmic.
_TENSORBOARD_PANELS = (
  ("em/log_likelihood", False),
  ("em/relative_change", True),
  ("em/sigma", False),
  ("em/empty_probability", False),
  ("prior/weight", False),
  ("prior/diffusion_time", False),
  ("em/seconds_per_iteration", True),
)


def tensorboard_run(events, path, *, title="", max_images=6):
  """Draws one TensorBoard run of EM as its dashboard shows it.

  The scalars as cards (each start's log-likelihood in one card, so that
  pruned starts are curves that stop), then each start's estimates at the
  steps they were drawn (the images dashboard's step slider laid out).

  Args:
    events: {tag: [(step, value)]} of one run folder
      (`em.summaries.read_events`).
    path: output .png.
    title: optional title above the figure.
    max_images: most estimates shown per start (the first, the last and
      evenly spaced ones between).

  Returns:
    path.
  """
  starts = sorted(t for t in events if t.startswith("starts/"))
  panels = [(t, log) for t, log in _TENSORBOARD_PANELS if t in events]
  images = sorted(t for t in events if t.startswith("estimate/"))
  cards = 1 + len(panels) if starts else len(panels)
  columns = 4
  scalar_rows = -(-cards // columns)
  shown = {}
  for tag in images:
    points = events[tag]
    keep = np.unique(np.linspace(0, len(points) - 1, max_images).round())
    shown[tag] = [points[int(i)] for i in keep]
  image_columns = max((len(p) for p in shown.values()), default=0)
  width = 2.9 * columns
  fig = _figure(
    figsize=(width, 2.3 * scalar_rows + 1.4 * len(images) + 0.5),
    layout="constrained",
  )
  grid = fig.add_gridspec(
    2, 1, height_ratios=[2.3 * scalar_rows, 1.4 * max(len(images), 1)]
  )
  top = grid[0].subgridspec(scalar_rows, columns)
  axes = [fig.add_subplot(top[i // columns, i % columns]) for i in range(cards)]
  if starts:
    ax, axes = axes[0], axes[1:]
    for colour, tag in zip(_TENSORBOARD_COLOURS * len(starts), starts):
      steps, values = zip(*events[tag])
      ax.plot(steps, values, color=colour, lw=1.2, label=tag.split("/", 1)[1])
      ax.plot(steps[-1], values[-1], "o", color=colour, ms=3)
    ax.set_title("starts/ (log-likelihood of each start)", fontsize=8)
    ax.legend(fontsize=6, frameon=False)
  for ax, (tag, log) in zip(axes, panels):
    steps, values = zip(*events[tag])
    ax.plot(steps, values, color=_TENSORBOARD_COLOURS[0], lw=1.2)
    ax.set_title(tag, fontsize=8)
    if log and min(values) > 0:
      ax.set_yscale("log")
  for ax in fig.axes:
    ax.grid(True, color="#e0e0e0", lw=0.6)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("step (EM iteration)", fontsize=6)
  if images:
    # Image cards a little wider than tall: the strips stay together.
    slots = max(image_columns, 2 * columns - 1)
    bottom = grid[1].subgridspec(
      len(images), slots + 1, width_ratios=[1.6] + [1] * slots
    )
    for row, tag in enumerate(images):
      label = fig.add_subplot(bottom[row, 0])
      label.axis("off")
      label.text(1, 0.5, tag, ha="right", va="center", fontsize=7)
      for col, (step, image) in enumerate(shown[tag]):
        ax = fig.add_subplot(bottom[row, col + 1])
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"step {step}", fontsize=6, pad=2)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path, dpi=110)
