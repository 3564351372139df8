"""The ground floor: Table I's constants, one-line input checks, whole-file
writes and environment records. Imports nothing of mtd_tf and no TensorFlow."""
