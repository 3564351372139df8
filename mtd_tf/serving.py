"""`mtd-serving`: adds TF Serving warm-up requests to a new SavedModel.

Writes <export>/assets.extra/tf_serving_warmup_requests (one PredictRequest
for serving_default per batch size) into each SavedModel version folder, so
that TF Serving replays them when it loads the model. The serving contract
itself (REST bodies, the warm-up file format) is
`mtd_tf.priors.serving_requests`.

A published version is never changed: a folder that already has warm-up
requests or the Keras model of `priors.export_prior` (a finished export,
which carries its own warm-up requests), or that lies under the shipped
priors' folder, is refused before anything is loaded or written. Use it on
a SavedModel of your own that has none yet, before you publish it.

Example:
  mtd-serving --add_warmup=my_priors/score_net/1 --batch_sizes=1,8,32
"""

import os

from absl import flags

from mtd_tf import cli


def define_flags(fv):
  flags.DEFINE_multi_string(
    "add_warmup",
    [],
    "SavedModel version folder(s), not yet published, to add TF Serving "
    "warm-up requests to (assets.extra/tf_serving_warmup_requests); "
    "repeat the flag or separate with commas.",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "batch_sizes",
    None,
    "Batch sizes of the warm-up requests; default "
    "serving_requests.DEFAULT_WARMUP_BATCH_SIZES (1,8,32).",
    flag_values=fv,
  )


def refuse_published(path, shipped_root, keras_file):
  """Raises ServingError unless `path` is a version folder still unpublished.

  Args:
    path: the --add_warmup folder.
    shipped_root: the shipped priors' folder (`priors.shipped_root`).
    keras_file: the Keras model's path inside an export (`priors.KERAS_FILE`).
  """
  # Deferred: serving_requests loads TensorFlow (see `main`).
  from mtd_tf.priors import serving_requests  # pylint: disable=g-import-not-at-top

  real = os.path.realpath(path)
  root = os.path.realpath(shipped_root)
  if os.path.commonpath([real, root]) == root:
    raise serving_requests.ServingError(
      f"{path} is a shipped prior and published versions never change: "
      "export a new version of your own (priors.export_prior writes the "
      "warm-up requests)."
    )
  for name in (serving_requests.warmup_path(""), keras_file):
    if os.path.exists(os.path.join(path, name)):
      raise serving_requests.ServingError(
        f"{path} is a finished export (it has {name}) and published "
        "versions never change: export a new version (priors.export_prior "
        "writes the warm-up requests into it)."
      )


def main(fv):
  paths = [p for value in fv.add_warmup for p in value.split(",") if p]
  if not paths:
    raise cli.UsageError(
      "Pass --add_warmup=<SavedModel folder without warm-up requests>, "
      "e.g. my_priors/score_net/1."
    )
  # Deferred: priors load TensorFlow, which --help and usage errors need
  # not wait for.
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top
  from mtd_tf.priors import serving_requests  # pylint: disable=g-import-not-at-top

  try:
    batch_sizes = serving_requests.check_batch_sizes(
      serving_requests.DEFAULT_WARMUP_BATCH_SIZES
      if fv.batch_sizes is None
      else fv.batch_sizes
    )
  except serving_requests.ServingError as err:
    raise cli.UsageError(f"--batch_sizes: {err}") from None
  # Every folder is checked before any is written.
  for path in paths:
    refuse_published(path, priors.shipped_root(), priors.KERAS_FILE)
  for path in paths:
    # The warm-up requests take L from prior.json: check it against the
    # signature, and probe the prior, before writing anything.
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
      priors.load_prior(path)
  for path in paths:
    target = serving_requests.write_warmup_requests(
      path, batch_sizes=batch_sizes
    )
    print(
      f"wrote {target} ({len(batch_sizes)} requests, batch sizes "
      f"{','.join(map(str, batch_sizes))})"
    )


def run(argv=None):
  cli.run(main, define_flags, __doc__, argv)


if __name__ == "__main__":
  run()
