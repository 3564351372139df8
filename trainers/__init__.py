"""Trainers of the score priors (section IV of the paper) and their tools.

Library, one idea per module:
  configs: the frozen config dataclasses, each field declared once.
  runs: run folders, run keys, checkpoints and resume.
  loop: the training loop (EMA, schedule, progress, Ctrl-C).
  training: `train`, the stages every score prior shares.
  export: prior.json metadata and the export call.
  gaussian_prior, mnist_prior: the two score priors of section IV.
  orientation_classifier: a prior's new version with a classifier.

Tools (thin mains: flags -> frozen configs -> one call): train_gaussian_prior,
train_mnist_prior, train_orientation; `mtd_tf.cli.define_config_flags`
generates their flags from the configs.
"""
