"""`mtd-serving`: adds TF Serving warm-up requests to exported priors.

Writes <export>/assets.extra/tf_serving_warmup_requests (one PredictRequest
for serving_default per batch size) into each SavedModel version folder, so
that TF Serving replays them when it loads the model. The serving contract
itself (REST bodies, the warm-up file format) is `mtd_tf.priors.serving_requests`.

Example:
  mtd-serving --add_warmup=saved_models/gaussian_fc/1 --batch_sizes=1,8,32
"""

import os

from absl import flags

from mtd_tf import cli


def define_flags(fv):
  flags.DEFINE_multi_string(
    "add_warmup",
    [],
    "SavedModel version folder(s) to add TF Serving "
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


def main(fv):
  paths = [p for value in fv.add_warmup for p in value.split(",") if p]
  if not paths:
    raise cli.UsageError(
      "Pass --add_warmup=<export dir>, e.g. saved_models/gaussian_fc/1."
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
