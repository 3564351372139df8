"""The measurement model and its data (section II, eq. 1-2 and 9).

Patches and their spectra, rotations R_k and their adjoints (eq. 11), the
simulator with ground truth, the noise level from the data alone, the
paper's error, measurement files and the digit data sets. Imports only
`mtd_tf.base`.
"""
