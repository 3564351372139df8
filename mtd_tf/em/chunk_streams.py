"""The chunk-over-streams loop: the E-step's chunks in concurrent groups.

The E-step's sums over patches (eq. 14-16 reduced to `estep.PartialSums`)
add up over any partition of the patches. The C chunks of patches are
therefore split into `num_streams` contiguous groups, each summed by its
own call of the compiled loop (`estep.make_partial_sums`); the calls do not
depend on one another, so TensorFlow runs them concurrently (XLA's CPU FFT
uses one core per loop). Both the in-memory E-step (`estep.make_estep`) and
the streamed one (`streaming.StreamingData`, one micrograph at a time) go
through `stream_partial_sums`.
"""

import tensorflow as tf

__all__ = ["stream_bounds", "stream_partial_sums"]


def stream_bounds(num_chunks, num_streams):
  """The contiguous chunk ranges of the streams.

  Args:
    num_chunks: C, an int or an int32 scalar tensor.
    num_streams: the number of streams (Python int >= 1).

  Returns:
    list of `num_streams` pairs (begin, end): stream i sums chunks
    [begin, end) = [C i // n, C (i + 1) // n); together they cover [0, C)
    once, in order (a stream may be empty).
  """
  return [
    ((num_chunks * i) // num_streams, (num_chunks * (i + 1)) // num_streams)
    for i in range(num_streams)
  ]


def stream_partial_sums(
  partial_sums,
  num_streams,
  images,
  spectra,
  squared_norms,
  mask,
  sigma,
  groups=None,
  log_rho=None,
):
  """`partial_sums` over the chunks of patches, one call per stream.

  Args:
    partial_sums: the compiled sum of `estep.make_partial_sums`.
    num_streams: the number of streams (Python int >= 1).
    images: float [B, L, L], the current estimates F_tau.
    spectra: complex [G, C, S, 2L, L+1], the rfft2d of the zero-padded
      patches (G = B without groups; G = 1 broadcasts to the B problems).
    squared_norms: float [G, C, S], ||M_m||^2.
    mask: float [G, C, S], 1 for a real patch, 0 for chunk padding.
    sigma: float [B] noise standard deviations.
    groups: None, or int32 [B]: problem b uses measurement groups[b].
    log_rho: None (uniform shifts, eq. 14) or float [B, 2L, 2L].

  Returns:
    list of `num_streams` `estep.PartialSums` (batch B), one per stream,
    not yet added (`estep.add_partial_sums`), so that the caller adds them
    where it likes (inside the XLA-compiled finish of `estep.make_estep`).
  """
  num_chunks = tf.shape(spectra)[1]
  return [
    partial_sums(
      images,
      spectra[:, begin:end],  # [G, C_i, S, 2L, L+1]
      squared_norms[:, begin:end],  # [G, C_i, S]
      mask[:, begin:end],  # [G, C_i, S]
      sigma,
      groups,
      log_rho,
    )
    for begin, end in stream_bounds(num_chunks, num_streams)
  ]
