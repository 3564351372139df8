"""The shipped score priors, in TF Serving's layout saved_models/<name>/<version>/.

This folder is installed as the package data `mtd_tf.saved_models`; load a
prior by name with `mtd_tf.priors.load_prior("mnist_unet")`.
"""
