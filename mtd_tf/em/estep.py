"""The E-step of approximate EM: eq. (14)-(16) reduced to sufficient statistics.

For every patch m, shift l in {0..2L-1}^2 and rotation k the log-likelihood
of eq. (15), up to terms constant in (l, k), is

  (2 <M_m, C T_l Z R_k F> - ||C T_l Z R_k F||^2) / (2 sigma^2).

The cross term, over all shifts at once, is the circular cross-correlation
of Z M_m with Z R_k F on the 2L x 2L grid: irfft2(conj(rfft2(Z M_m)) *
rfft2(Z R_k F)). The norm term does not depend on the patch and is exactly
B^T (R_k F)^2 B with the 0/1 band matrix B of `patches.band_matrix`.
Normalising with log-sum-exp over (l, k) gives the posterior weights of
eq. (14) (uniform prior over shifts and rotations). The data then enter
Q(F | F_tau) of eq. (16) only through, per rotation k,

  S1[k] = sum_{m,l} w[m,l,k] (C T_l Z)^T M_m   (a circular convolution)
  V[k]  = sum_{m,l} w[m,l,k] vis_l = B (sum_m w[m,:,:,k]) B^T,

so the M-step never touches the patches. Patches stream through in chunks
inside one XLA-compiled loop, so memory does not grow with the measurement.
"""

import functools
import math
import typing

import tensorflow as tf

from mtd_tf.base import validation
from mtd_tf.em import chunk_streams
from mtd_tf.model import patches as patches_lib
from mtd_tf.model import rotations as rotations_lib

__all__ = [
  "Statistics",
  "PartialSums",
  "make_estep",
  "make_partial_sums",
  "add_partial_sums",
  "finish_statistics",
  "shift_posterior",
  "shift_rotation_logits",
  "posterior_weights",
]


class Statistics(typing.NamedTuple):
  """Sufficient statistics of one E-step, summed over patches.

  Attributes:
    s1: [B, K, L, L] sum_{m,l} w (C T_l Z)^T M_m per rotation.
    visibility: [B, K, L, L] V, the expected visibility count per pixel.
    log_likelihood: [B] log p(M_0..M_{D-1}; F) under the patch model with
      uniform shifts and rotations (eq. 13-15), including all constants
      (with a shift prior rho: rho(l) / K in place of 1 / ((2L)^2 K)).
  """

  s1: tf.Tensor
  visibility: tf.Tensor
  log_likelihood: tf.Tensor


def shift_rotation_logits(
  spectra, templates_hat, template_norms, inv_two_sigma_sq
):
  """Unnormalised log posterior of (l, k) for a chunk of patches, eq. (15).

  Args:
    spectra: complex [B, S, 2L, L+1] rfft2d of zero-padded patches.
    templates_hat: complex [B, K, 2L, L+1] rfft2d of Z R_k F.
    template_norms: float [B, K, 2L, 2L] ||C T_l Z R_k F||^2.
    inv_two_sigma_sq: float [B] 1 / (2 sigma^2).

  Returns:
    float [B, S, K, 2L, 2L] (2 <M, C T_l Z R_k F> - ||C T_l Z R_k F||^2)
    / (2 sigma^2).
  """
  size2 = tf.shape(template_norms)[-1]
  product = (
    tf.math.conj(spectra)[:, :, None] * templates_hat[:, None]
  )  # [B, S, K, 2L, L+1]
  cross = tf.signal.irfft2d(
    product, fft_length=[size2, size2]
  )  # [B, S, K, 2L, 2L]
  return (2.0 * cross - template_norms[:, None]) * inv_two_sigma_sq[
    :, None, None, None, None
  ]


class PartialSums(typing.NamedTuple):
  """Sums over a subset of the patches, before the final transforms.

  Attributes:
    s1_hat: complex [B, K, 2L, L+1], the spectrum of S1 (before cropping).
    weight_sum: float [B, K, 2L, 2L], sum_m w[m, l, k].
    log_norm_sum: float [B], sum_m (logsumexp_{l,k} logits - ||M_m||^2 /
      (2 sigma^2)).
    num_patches: float [B], the number of real patches summed.
  """

  s1_hat: tf.Tensor
  weight_sum: tf.Tensor
  log_norm_sum: tf.Tensor
  num_patches: tf.Tensor


def _templates(rotations, images):
  """The templates of eq. (15): spectra and norms under every shift.

  Returns:
    (complex [B, K, 2L, L+1] rfft2d of Z R_k F, float [B, K, 2L, 2L]
    ||C T_l Z R_k F||^2).
  """
  size = rotations.image_size
  band = patches_lib.band_matrix(size, images.dtype)  # [L, 2L]
  templates = rotations.rotate(images)  # [B, K, L, L]
  templates_hat = tf.signal.rfft2d(
    tf.pad(templates, [[0, 0], [0, 0], [0, size], [0, size]])
  )  # [B, K, 2L, L+1]
  template_norms = tf.einsum(
    "yl,bkyx,xm->bklm", band, templates**2, band
  )  # [B, K, 2L, 2L]
  return templates_hat, template_norms


@functools.cache
def make_partial_sums(rotations, jit_compile=True):
  """Builds the compiled streaming pass over the chunks of patches.

  Returns:
    A `tf.function` `partial_sums(images, spectra, squared_norms, mask,
    sigma, groups=None)` (arguments as in `make_estep`) returning
    `PartialSums`; log_rho: None (uniform shifts, eq. 14) or float
    [B, 2L, 2L], log rho(l) added to the logits. Sums
    from disjoint sets of patches (chunks, streams, devices, workers,
    micrographs) add up.
  """
  size = rotations.image_size
  num_rot = rotations.num_rotations

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def partial_sums(
    images, spectra, squared_norms, mask, sigma, groups=None, log_rho=None
  ):
    dtype = images.dtype
    if groups is not None:
      # Problem b reads measurement groups[b]: several starts share one
      # measurement's spectra, gathered a chunk at a time (no B-fold copy).
      mask = tf.gather(mask, groups)  # [B, C, S]
      squared_norms = tf.gather(squared_norms, groups)  # [B, C, S]
    templates_hat, template_norms = _templates(rotations, images)
    inv_two_sigma_sq = 0.5 / sigma**2  # [B]
    batch = tf.shape(images)[0]
    num_chunks = tf.shape(spectra)[1]

    def body(c, s1_hat, weight_sum, log_norm_sum):
      chunk_spectra = spectra[:, c]  # [G, S, 2L, L+1]
      if groups is not None:
        chunk_spectra = tf.gather(chunk_spectra, groups)  # [B, S, 2L, L+1]
      chunk_mask = mask[:, c]  # [B, S]
      logits = shift_rotation_logits(
        chunk_spectra, templates_hat, template_norms, inv_two_sigma_sq
      )
      if log_rho is not None:
        logits += log_rho[:, None, None]  # [B, S, K, 2L, 2L]
      # log-sum-exp by hand so that exp runs once per (m, l, k).
      peak = tf.stop_gradient(
        tf.reduce_max(logits, axis=[2, 3, 4], keepdims=True)
      )  # [B, S, 1, 1, 1]
      unnormalised = tf.exp(logits - peak)  # [B, S, K, 2L, 2L]
      total = tf.reduce_sum(unnormalised, axis=[2, 3, 4])  # [B, S]
      log_norm = peak[:, :, 0, 0, 0] + tf.math.log(total)  # [B, S]
      weights = (
        unnormalised * (chunk_mask / total)[..., None, None, None]
      )  # [B, S, K, 2L, 2L]
      weights_hat = tf.signal.rfft2d(weights)  # [B, S, K, 2L, L+1]
      s1_hat += tf.reduce_sum(weights_hat * chunk_spectra[:, :, None], axis=1)
      weight_sum += tf.reduce_sum(weights, axis=1)
      log_norm_sum += tf.reduce_sum(
        chunk_mask
        * (log_norm - squared_norms[:, c] * inv_two_sigma_sq[:, None]),
        axis=1,
      )
      return c + 1, s1_hat, weight_sum, log_norm_sum

    complex_dtype = tf.complex64 if dtype == tf.float32 else tf.complex128
    init = (
      tf.constant(0),
      tf.zeros([batch, num_rot, 2 * size, size + 1], complex_dtype),
      tf.zeros([batch, num_rot, 2 * size, 2 * size], dtype),
      tf.zeros([batch], dtype),
    )
    invariants = (
      tf.TensorShape([]),
      tf.TensorShape([None, num_rot, 2 * size, size + 1]),
      tf.TensorShape([None, num_rot, 2 * size, 2 * size]),
      tf.TensorShape([None]),
    )
    _, s1_hat, weight_sum, log_norm_sum = tf.while_loop(
      lambda c, *_: c < num_chunks, body, init, shape_invariants=invariants
    )
    return PartialSums(
      s1_hat, weight_sum, log_norm_sum, tf.reduce_sum(mask, axis=[1, 2])
    )

  return partial_sums


def add_partial_sums(parts):
  """Adds `PartialSums` from disjoint sets of patches."""
  return PartialSums(*[tf.add_n(list(fields)) for fields in zip(*parts)])


def finish_statistics(rotations, parts, sigma, log_rho=None):
  """Turns summed `PartialSums` into the `Statistics` of the M-step.

  Args:
    rotations: the `RotationSet`.
    parts: `PartialSums` over all patches.
    sigma: float [B].
    log_rho: None (uniform shifts) or the float [B, 2L, 2L] log shift prior
      the partial sums were computed with (then only the 1 / K of the
      rotations remains outside the logits).

  Returns:
    `Statistics`.
  """
  size = rotations.image_size
  dtype = parts.weight_sum.dtype
  band = patches_lib.band_matrix(size, dtype)  # [L, 2L]
  s1 = tf.signal.irfft2d(parts.s1_hat, fft_length=[2 * size, 2 * size])[
    ..., :size, :size
  ]  # [B, K, L, L]
  visibility = tf.einsum(
    "yl,bklm,xm->bkyx", band, parts.weight_sum, band
  )  # [B, K, L, L]
  log_cells = math.log(4 * size * size * rotations.num_rotations)
  if log_rho is not None:
    log_cells = math.log(rotations.num_rotations)
  loglik = parts.log_norm_sum - parts.num_patches * (
    log_cells
    + 0.5
    * size
    * size
    * tf.math.log(tf.constant(2 * math.pi, dtype) * sigma**2)
  )
  return Statistics(s1=s1, visibility=visibility, log_likelihood=loglik)


def shift_posterior(parts):
  """The M-step of the shift prior: rho_new(l) = (1 / D) sum_{m,k} w[m,l,k].

  Args:
    parts: `PartialSums` over all patches.

  Returns:
    float [B, 2L, 2L], summing to one per problem.
  """
  count = tf.maximum(parts.num_patches, 1.0)  # [B]
  return tf.reduce_sum(parts.weight_sum, axis=1) / count[:, None, None]


@functools.cache
def make_estep(rotations, jit_compile=True, num_streams=1):
  """Builds the E-step for a `rotations.RotationSet`.

  The chunks of patches are split into `num_streams` contiguous groups, each
  summed by its own XLA-compiled loop (`chunk_streams.stream_partial_sums`);
  the groups do not depend on one another, so TensorFlow runs them
  concurrently (XLA's CPU FFT uses one core per loop).

  Args:
    rotations: the `RotationSet` (L and K).
    jit_compile: compile with XLA (the default; False helps debugging).
    num_streams: concurrent chunk streams (1 or more).

  Returns:
    A `tf.function` `estep(images, spectra, squared_norms, mask, sigma,
    groups=None, log_rho=None, with_shift_posterior=False)`:
      images: float [B, L, L], the current estimates F_tau.
      spectra, squared_norms, mask: the fields of `patches.PatchSpectra`,
        [G, C, S, 2L, L+1], [G, C, S], [G, C, S] (G = B without groups).
      sigma: float [B] noise standard deviations.
      groups: None, or int32 [B]: problem b uses measurement groups[b].
      log_rho: None (uniform shifts, eq. 14) or float [B, 2L, 2L], the log
        shift prior rho(l).
      with_shift_posterior: also return `shift_posterior` (Python bool).
    returning `Statistics`, or (`Statistics`, float [B, 2L, 2L]).
  """
  partial_sums = make_partial_sums(rotations, jit_compile)
  streams = max(int(num_streams), 1)

  @tf.function(reduce_retracing=True)
  def estep(
    images,
    spectra,
    squared_norms,
    mask,
    sigma,
    groups=None,
    log_rho=None,
    with_shift_posterior=False,
  ):
    parts = chunk_streams.stream_partial_sums(
      partial_sums,
      streams,
      images,
      spectra,
      squared_norms,
      mask,
      sigma,
      groups,
      log_rho,
    )
    if with_shift_posterior:
      return finish_with_shifts(parts, sigma, log_rho)
    return finish(parts, sigma, log_rho)

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def finish(parts, sigma, log_rho=None):
    return finish_statistics(rotations, add_partial_sums(parts), sigma, log_rho)

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def finish_with_shifts(parts, sigma, log_rho=None):
    total = add_partial_sums(parts)
    return (
      finish_statistics(rotations, total, sigma, log_rho),
      shift_posterior(total),
    )

  return estep


def posterior_weights(
  measurement, image, sigma, num_rotations=4, crop=False, dtype=tf.float64
):
  """Posterior weights w[m, lx, ly, k] of eq. (14) (docs/conventions.md).

  Args:
    measurement: array [H, W], sides multiples of L (or crop=True).
    image: array [L, L], the current estimate F.
    sigma: noise standard deviation > 0.
    num_rotations: K.
    crop: drop trailing rows and columns beyond a multiple of L.
    dtype: computation dtype (float64 by default: this is a reference helper).

  Returns:
    numpy array [D, 2L, 2L, K]; each patch's weights sum to one.
  """
  image = validation.image_array(image)
  size = image.shape[0]
  sigma = validation.positive_finite(sigma, "sigma")
  patch_set = patches_lib.extract_patches(measurement, size, crop=crop)
  rotations = rotations_lib.rotation_set(size, num_rotations)
  data = patches_lib.patch_spectra(
    [patch_set], chunk_size=len(patch_set), dtype=dtype
  )
  templates_hat, norms = _templates(rotations, tf.constant(image[None], dtype))
  inv = tf.constant([0.5 / sigma**2], dtype)
  logits = shift_rotation_logits(
    data.spectra[:, 0], templates_hat, norms, inv
  )  # [1, D, K, 2L, 2L]
  weights = tf.nn.softmax(tf.reshape(logits, [len(patch_set), -1]), axis=-1)
  weights = tf.reshape(
    weights, [len(patch_set), rotations.num_rotations, 2 * size, 2 * size]
  )
  return tf.transpose(weights, [0, 2, 3, 1]).numpy()
