"""Configuration of the trainers: frozen dataclasses checked on construction.

Each field is declared once, by `mtd_tf.base.fields.option`: its default
and its help, which documents the field here and is the help of the flag
`mtd_tf.cli.define_config_flags` generates from it. Every check that can
fail on the settings alone runs on construction, before any work; the
training data are checked by `check_images` once read, before any step.

TensorFlow-free, so the tools' --help and --version stay fast.
"""

import dataclasses
import math
import os
import tempfile

import numpy as np

from mtd_tf.base import memory
from mtd_tf.base.fields import option

ACTIVATIONS = ("swish", "logsigmoid", "softplus")

# `mtd_tf.priors.sde.DEFAULT_EPS`, written out because importing
# mtd_tf.priors loads TensorFlow; tests/test_trainers.py checks they agree.
DEFAULT_EPS = 1e-5


class TrainingError(ValueError):
  """A training request that cannot be honoured, with what to do instead."""


def require(condition, message):
  """Raises TrainingError(message) unless condition holds."""
  if not condition:
    raise TrainingError(message)


def check_images(images, source, low=0.0, high=1.0):
  """Refuses training data with NaN, Inf or pixels outside [low, high].

  Such pixels otherwise surface steps later as a NaN loss, whose message
  blames the learning rate.

  Args:
    images: float array [N, L, L], the training examples.
    source: where they came from, for the message (a file name).
    low, high: the data kind's pixel range (`mtd_tf.priors.kinds`: MNIST
      digits scaled to [0, 1]).

  Returns:
    images.

  Raises:
    TrainingError: naming the first bad image and what is wrong with it.
  """
  images = np.asarray(images)
  require(
    images.ndim == 3 and images.shape[1] == images.shape[2] and len(images),
    f"{source}: training images must be an array [N, L, L], got shape "
    f"{images.shape}.",
  )
  flat = images.reshape(len(images), -1)
  finite = np.isfinite(flat).all(axis=1)  # [N]
  if not finite.all():
    first = int(np.flatnonzero(~finite)[0])
    raise TrainingError(
      f"{source}: {int((~finite).sum())} of {len(flat)} training images "
      f"have NaN or Inf pixels (the first: image {first}): clean the file."
    )
  outside = ((flat < low) | (flat > high)).any(axis=1)  # [N]
  if outside.any():
    first = int(np.flatnonzero(outside)[0])
    raise TrainingError(
      f"{source}: {int(outside.sum())} of {len(flat)} training images have "
      f"pixels outside [{low:g}, {high:g}] once scaled (image {first} spans "
      f"{float(flat[first].min()):.3g}..{float(flat[first].max()):.3g}): "
      "the file must hold 0-255 grey levels."
    )
  return images


def check_export_dir(export_dir: str):
  """Refuses (TrainingError), before any work, a folder no export can go in.

  The model folder must be a folder where it exists; else its nearest
  existing parent must be a folder this process can create files in
  (tried: a temporary file is created and removed there, which catches
  read-only file systems and permissions alike).
  """
  path = os.path.abspath(os.fspath(export_dir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise TrainingError(
      f"--export_dir={export_dir} exists and is not a folder: give a "
      "model folder (it holds one folder per version)."
    )
  nearest = path
  while not os.path.exists(nearest):
    nearest = os.path.dirname(nearest)
  if not os.path.isdir(nearest):
    raise TrainingError(
      f"--export_dir={export_dir}: {nearest} is a file, so no folder can "
      "be made under it: choose another --export_dir."
    )
  try:
    handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=nearest)
    os.close(handle)
    os.remove(probe)
  except OSError as err:
    raise TrainingError(
      f"--export_dir={export_dir}: cannot write in {nearest} "
      f"({err.strerror or err}): choose another --export_dir."
    ) from None


def _positive_finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _none_means_no_export(value):
  # The command line says "none"; the library says ''.
  return "" if value == "none" else value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Options shared by the score-prior trainers (checked on construction).

  Each field's help (`option`) says what it is. Library callers leave
  ``checkpoint_dir`` empty for `runs.default_checkpoint_root()` and
  ``export_dir`` empty to skip the export.
  """

  name: str = option(
    dataclasses.MISSING, "Prior name: the model folder's name."
  )
  # The cosine decay of the learning rate is laid out over this count.
  steps: int = option(
    1000,
    "Total optimisation steps (a resumed run continues up to this count).",
  )
  batch_size: int = option(64, "Examples per step.")
  learning_rate: float = option(1e-3, "Peak Adam learning rate.")
  warmup_steps: int = option(100, "Linear warm-up steps.")
  final_lr_fraction: float = option(
    0.1, "Cosine decay ends at this fraction of the peak rate."
  )
  grad_clip: float = option(1.0, "Global-norm gradient clip (0: none).")
  weight_decay: float = option(0.0, "Decoupled weight decay (AdamW) when > 0.")
  ema_decay: float = option(0.999, "EMA decay of exported weights.")
  seed: int = option(0, "Seed of data order, noise and init.")
  checkpoint_dir: str = option(
    "",
    "Folder of the training runs (default ~/.cache/mtd_tf/checkpoints). A "
    "run resumes from its folder there.",
  )
  run_name: str = option(
    "",
    "The run's folder name (default <name>-<hash of the settings that shape "
    "the weights>). A run name with other stored settings is refused.",
  )
  checkpoint_every_secs: float = option(
    180.0, "Seconds between checkpoints (one more on Ctrl-C)."
  )
  log_every_steps: int = option(100, "Steps between log lines.")
  heldout_every_steps: int = option(500, "Steps between held-out evaluations.")
  export_dir: str = option(
    "",
    'Model folder the SavedModel version is written into ("none": no export).',
    from_flag=_none_means_no_export,
  )
  version: int | None = option(
    None,
    "Version number to export (default: the next free one). Published "
    "versions never change: an existing one is refused unless --overwrite.",
    flag="export_version",
  )
  overwrite: bool = option(False, "Replace an existing --export_version.")
  export_only: bool = option(
    False, "Export the run's latest checkpoint without training."
  )

  def __post_init__(self):
    for label, value in (("name", self.name), ("run_name", self.run_name)):
      require(
        isinstance(value, str)
        and os.sep not in value
        and value not in (".", ".."),
        f"{label}={value!r}: use a plain folder name without '/'.",
      )
    require(self.name, "name is empty: give the prior a name, e.g. mnist_unet.")
    require(
      isinstance(self.steps, int) and self.steps > 0,
      f"steps={self.steps}: the number of steps must be positive.",
    )
    require(
      isinstance(self.batch_size, int) and self.batch_size > 0,
      f"batch_size={self.batch_size}: the batch size must be positive.",
    )
    require(
      _positive_finite(self.learning_rate) and self.learning_rate < 1,
      f"learning_rate={self.learning_rate}: use a positive rate below "
      "1 (e.g. 1e-3).",
    )
    require(
      self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0."
    )
    require(
      0.0 <= self.final_lr_fraction <= 1.0,
      f"final_lr_fraction={self.final_lr_fraction} must be in [0, 1].",
    )
    require(
      self.grad_clip >= 0,
      f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping).",
    )
    require(
      self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0."
    )
    require(
      0.0 <= self.ema_decay < 1.0,
      f"ema_decay={self.ema_decay} must be in [0, 1).",
    )
    require(
      _positive_finite(self.checkpoint_every_secs),
      f"checkpoint_every_secs={self.checkpoint_every_secs} must be positive.",
    )
    require(
      self.log_every_steps > 0 and self.heldout_every_steps > 0,
      "log_every_steps and heldout_every_steps must be positive.",
    )
    require(
      self.version is None
      or (isinstance(self.version, int) and self.version > 0),
      f"version={self.version}: versions are positive integers.",
    )
    require(
      not (self.export_only and not self.export_dir),
      "export_only without an export folder does nothing: give export_dir.",
    )


@dataclasses.dataclass(frozen=True)
class GaussianDataConfig:
  """The Gaussian prior's data: N(mu, I), mu in {0..4}^(L*L).

  Each field's help (`option`) says what it is; L is 5 and the sample count
  10,000 in the paper (docs/conventions.md).
  """

  image_size: int = option(5, "L of the Gaussian images.")
  num_samples: int = option(10000, "Training samples of N(mu, I).")
  # mu is one draw from {0, ..., 4}^(L*L).
  mu_seed: int = option(2024, "Seed of the one draw of mu.")
  data_seed: int = option(1, "Seed of the training samples.")
  hidden: int = option(256, "Hidden width of the MLP.")

  def __post_init__(self):
    require(
      isinstance(self.image_size, int) and 1 <= self.image_size <= 64,
      f"image_size={self.image_size}: use an L in 1..64 (the exact "
      "Jacobian trace costs L^4 per sample).",
    )
    require(
      self.num_samples > 0, f"num_samples={self.num_samples} must be positive."
    )
    require(self.hidden > 0, f"hidden={self.hidden} must be positive.")
    # The samples are drawn as float64 noise, added to mu (float64) and
    # kept as float32: 20 bytes per pixel at once.
    needed = 20 * self.num_samples * self.image_size**2
    budget = memory.memory_budget()
    require(
      budget is None or needed <= budget,
      f"num_samples={self.num_samples}: the samples need about "
      f"{memory.format_bytes(needed)} but this machine can give them "
      f"{memory.format_bytes(budget or 0)} "
      f"({memory.budget_source()}): use at most "
      f"{(budget or 0) // (20 * self.image_size**2)}.",
    )


@dataclasses.dataclass(frozen=True)
class MnistDataConfig:
  """The MNIST prior's data and network.

  Each field's help (`option`) says what it is. Library callers may pass
  ``channels`` as any sequence of integers; it is stored as a tuple.
  """

  mnist_npz: str = option(
    "",
    "MNIST npz in keras.datasets.mnist layout (only x_train is read). "
    "Empty: download with keras.datasets.mnist.load_data().",
  )
  heldout: int = option(1024, "Train-split images held out at the end.")
  channels: tuple[int, ...] = option(
    (32, 64, 128), "U-Net channels per resolution level."
  )
  embed_dim: int = option(128, "Time-embedding width.")
  activation: str = option(
    "swish", "Activation ('logsigmoid' is the paper's).", choices=ACTIVATIONS
  )
  # The eps of eq. (7): t ~ U[eps, 1].
  eps: float = option(DEFAULT_EPS, "Smallest diffusion time of the loss.")

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    require(self.heldout > 0, f"heldout={self.heldout} must be positive.")
    require(
      self.channels and min(self.channels) > 0,
      f"channels={list(self.channels)}: give positive counts.",
    )
    require(
      self.embed_dim > 0 and self.embed_dim % 2 == 0,
      f"embed_dim={self.embed_dim}: use a positive even width.",
    )
    require(
      self.activation in ACTIVATIONS,
      f"activation={self.activation!r}: use one of {ACTIVATIONS}.",
    )
    require(0.0 < self.eps < 1.0, f"eps={self.eps} must be in (0, 1).")


@dataclasses.dataclass(frozen=True)
class OrientationExportConfig:
  """Which prior `train-orientation` extends, from which digits, and where to.

  Each field's help (`option`) says what it is; the classifier's own options
  are `mtd_tf.priors.orientation.OrientationConfig`.
  """

  source: str = option(
    "mnist_unet/2",
    "Prior to extend: a shipped name or a version folder exported with its "
    "Keras model.",
  )
  export_dir: str = option(
    os.path.join("mtd_priors", "mnist_unet"),
    "Model folder the new version is written into.",
  )
  version: int | None = option(
    None,
    "Version number to write (default: the next free one; an existing one "
    "is refused).",
    flag="export_version",
  )
  mnist_npz: str = option(
    "",
    "MNIST npz in keras.datasets.mnist layout (only x_train is read). "
    "Empty: download with keras.datasets.mnist.load_data().",
  )
