"""Draws docs/figures/tensorboard.png from a real run's event files.

The run (README, "Watching EM in TensorBoard"):

  mtd-simulate --digit=3 --snr=1 --seed=1 --out=m.npz
  mtd-reconstruct --measurement=m.npz --image_size=28 --prior=mnist_unet \\
    --out=estimate.npz --logdir=runs/
  python docs/tensorboard_figure.py runs/ docs/figures/tensorboard.png

The event files are read back without the tensorboard package
(`em.summaries.read_events`) and drawn as the dashboard shows them
(`pipelines.figures.tensorboard_run`).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mtd_tf.em import summaries  # noqa: E402 (after the log level)
from mtd_tf.pipelines import figures  # noqa: E402


def main(argv):
  if len(argv) not in (2, 3):
    sys.exit(f"usage: {argv[0]} RUN_FOLDER [OUT.png]")
  out = argv[2] if len(argv) == 3 else "docs/figures/tensorboard.png"
  events = summaries.read_events(argv[1])
  if not events:
    sys.exit(f"{argv[1]} holds no event files (a run folder of --logdir).")
  figures.tensorboard_run(
    events,
    out,
    title="mtd-reconstruct --prior=mnist_unet --logdir=runs/ (digit 3, SNR 1,"
    " recommended method): the TensorBoard run, read back",
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv)
