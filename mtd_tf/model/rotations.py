"""The in-plane rotation operators R_k of the patch model, eq. (9) and (11).

Phi = {2 pi k / K : k = 0..K-1}. Rotation k turns an L x L image
counter-clockwise by 2 pi k / K about its centre ((L-1)/2, (L-1)/2). Where
4 k / K is an integer the rotation is exactly `np.rot90(F, 4 k / K)`, a
permutation of pixels; other angles use cubic convolution (Keys' kernel,
a = -1/2: exact for quadratics, 4 x 4 taps; pixels that fall outside the
image read zero).

Each operator is sparse: every output pixel reads at most `TAPS` input
pixels, so the K operators are K L^2 `TAPS` (index, weight) pairs
(`rotation_taps`, O(K L^2) memory) instead of K dense L^2 x L^2 matrices,
and the tensors the compiled E-step holds do not grow with K beyond that.
R_k F is a gather, R_k^T G the matching scatter-add, so the adjoint is
exact, which the M-step relies on. `rotation_matrices` builds the dense
matrices from the taps where a caller wants them (small K and L).
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf

__all__ = [
  "RotationSet",
  "rotation_set",
  "rotation_matrices",
  "rotation_taps",
  "rotate_all",
  "unrotate",
  "TAPS",
  "rotation_matrix",
  "rotate_image",
  "operator_bytes",
  "TENSOR_LIMIT_BYTES",
]

# The largest tensor TensorFlow can hold as a constant of a graph (the 2 GB
# limit of its protocol buffers): the rotation taps are constants.
TENSOR_LIMIT_BYTES = 2**31 - 1
# Input pixels each output pixel of an interpolated rotation reads (4 x 4).
TAPS = 16


def operator_bytes(image_size, num_rotations, itemsize=8):
  """Bytes of the K operators' taps: K L^2 TAPS (int32 index, weight)."""
  return int(num_rotations) * int(image_size) ** 2 * TAPS * (4 + int(itemsize))


def _quarter_turns(k, num_rotations):
  """4 k / K as an int where rotation k is a quarter turn, else None."""
  quarter = 4 * int(k) / int(num_rotations)
  return int(quarter) if float(quarter).is_integer() else None


def _keys(t):
  """Keys' cubic convolution kernel (a = -1/2) at offsets t (numpy)."""
  t = np.abs(t)
  near = (1.5 * t - 2.5) * t * t + 1.0
  far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
  return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _snapped(points):
  """Points within rounding of a whole pixel, put on it."""
  nearest = np.round(points)
  return np.where(np.abs(points - nearest) < 1e-9, nearest, points)


def _taps(image_size, k, num_rotations):
  """Rotation k of K as taps: (int32 [L^2, TAPS] source pixels, float64
  [L^2, TAPS] weights); out[p] = sum_t weights[p, t] F[index[p, t]].

  A quarter turn is one tap of weight 1 per pixel (the permutation); taps
  outside the image get weight 0 (index 0).
  """
  size = int(image_size)
  index = np.zeros((size * size, TAPS), np.int32)
  weights = np.zeros((size * size, TAPS))
  quarter = _quarter_turns(k, num_rotations)
  if quarter is not None:
    grid = np.arange(size * size).reshape(size, size)
    index[:, 0] = np.rot90(grid, quarter).reshape(-1)
    weights[:, 0] = 1.0
    return index, weights
  angle = 2 * np.pi * int(k) / int(num_rotations)
  centre = (size - 1) / 2.0
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  # Counter-clockwise on screen (row axis pointing down), as np.rot90 turns:
  # the output pixel at (r, c) reads the input at the inverse-rotated point.
  y, x = rows - centre, cols - centre
  cos, sin = np.cos(angle), np.sin(angle)
  src_r = (centre + cos * y + sin * x).reshape(-1)  # [L^2]
  src_c = (centre - sin * y + cos * x).reshape(-1)  # [L^2]
  # Snap source points within rounding of a pixel (so that exact grid
  # points read one pixel, as the permutation does).
  src_r, src_c = _snapped(src_r), _snapped(src_c)
  base_r, base_c = np.floor(src_r).astype(int), np.floor(src_c).astype(int)
  tap = 0
  for dr in (-1, 0, 1, 2):
    for dc in (-1, 0, 1, 2):
      rr, cc = base_r + dr, base_c + dc
      weight = _keys(src_r - rr) * _keys(src_c - cc)
      inside = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
      weight = np.where(inside & (np.abs(weight) > 1e-15), weight, 0.0)
      index[:, tap] = np.where(weight != 0.0, rr * size + cc, 0)
      weights[:, tap] = weight
      tap += 1
  return index, weights


@functools.lru_cache(maxsize=32)
def rotation_taps(image_size, num_rotations):
  """The K operators as taps (module docstring), read-only numpy arrays.

  Returns:
    (int32 [K, L^2, TAPS] source pixel of each tap, float64 [K, L^2, TAPS]
    its weight): (R_k F)[p] = sum_t weights[k, p, t] F[index[k, p, t]].
  """
  if int(num_rotations) < 1:
    raise ValueError(f"num_rotations must be >= 1, got {num_rotations}.")
  size, count = int(image_size), int(num_rotations)
  index = np.empty((count, size * size, TAPS), np.int32)  # [K, L^2, T]
  weights = np.empty((count, size * size, TAPS))  # [K, L^2, T]
  for k in range(count):
    index[k], weights[k] = _taps(size, k, count)
  index.setflags(write=False)
  weights.setflags(write=False)
  return index, weights


def rotation_matrix(image_size, k, num_rotations):
  """The operator R_k of rotation k of K, float64 [L^2, L^2] (its taps)."""
  size = int(image_size)
  index, weights = _taps(size, k, num_rotations)
  matrix = np.zeros((size * size, size * size))  # [L^2, L^2]
  rows = np.repeat(np.arange(size * size), TAPS)
  np.add.at(matrix, (rows, index.reshape(-1)), weights.reshape(-1))
  return matrix


def rotate_image(image, k, num_rotations):
  """R_k F for one image: rotation k of K, equal to `rotation_matrix` @ F.

  Quarter turns are `np.rot90` (the permutation, exactly); other angles
  build only their own operator, so a huge K costs nothing here.

  Args:
    image: float [L, L].
    k: the rotation, 0 <= k < K.
    num_rotations: K.

  Returns:
    float64 [L, L].
  """
  image = np.asarray(image, np.float64)
  quarter = _quarter_turns(k, num_rotations)
  if quarter is not None:
    return np.rot90(image, quarter).copy()
  size = image.shape[0]
  index, weights = _taps(size, k, num_rotations)  # [L^2, T] each
  flat = image.reshape(-1)
  return np.sum(weights * flat[index], axis=1).reshape(size, size)


def rotate_all(images, num_rotations):
  """Every rotation of Phi of each image, in numpy (by the taps).

  Args:
    images: float [..., L, L].
    num_rotations: K.

  Returns:
    float64 [..., K, L, L]: (R_k F) for k = 0..K-1.
  """
  images = np.asarray(images, np.float64)
  size = images.shape[-1]
  index, weights = rotation_taps(size, int(num_rotations))  # [K, L^2, T]
  flat = images.reshape(images.shape[:-2] + (size * size,))  # [..., L^2]
  out = np.sum(flat[..., index] * weights, axis=-1)  # [..., K, L^2]
  return out.reshape(images.shape[:-2] + (int(num_rotations), size, size))


def unrotate(image, k, num_rotations):
  """R_k^T G for one image G [L, L], in numpy (the adjoint, by the taps)."""
  image = np.asarray(image, np.float64)
  size = image.shape[0]
  index, weights = _taps(size, k, num_rotations)  # [L^2, T]
  out = np.zeros(size * size)
  np.add.at(
    out, index.reshape(-1), (weights * image.reshape(-1, 1)).reshape(-1)
  )
  return out.reshape(size, size)


@functools.lru_cache(maxsize=32)
def rotation_matrices(image_size, num_rotations):
  """The K rotation operators as float64 matrices.

  Args:
    image_size: L, the side of the image in pixels.
    num_rotations: K >= 1, the number of rotations in Phi.

  Returns:
    A read-only float64 numpy array [K, L^2, L^2]; `R[k] @ F.reshape(-1)` is
    the image turned counter-clockwise by 2 pi k / K, row-major.
  """
  if int(num_rotations) < 1:
    raise ValueError(f"num_rotations must be >= 1, got {num_rotations}.")
  size = int(image_size)
  index, weights = rotation_taps(size, int(num_rotations))  # [K, L^2, T]
  # Filled in place: stacking a list would hold the operators twice.
  out = np.zeros((int(num_rotations), size**2, size**2))  # [K, L^2, L^2]
  rows = np.repeat(np.arange(size * size), TAPS)
  for k in range(int(num_rotations)):
    np.add.at(out[k], (rows, index[k].reshape(-1)), weights[k].reshape(-1))
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True)
class RotationSet:
  """The rotations Phi of eq. (11) as TensorFlow operators.

  Attributes:
    image_size: L.
    num_rotations: K.
    is_permutation: True when every R_k is exactly a np.rot90 (K in 1, 2, 4);
      then sum_k R_k^T diag(v_k) R_k is diagonal and the closed-form M-step is
      elementwise.
  """

  image_size: int
  num_rotations: int
  is_permutation: bool

  def matrices(self, dtype):
    """The operators as a dense constant tensor [K, L^2, L^2] of `dtype`
    (for checks and small K; EM uses the taps)."""
    return tf.constant(
      rotation_matrices(self.image_size, self.num_rotations), dtype=dtype
    )

  def _taps(self, dtype):
    """(int32 [K, L^2, T] indices, [K, L^2, T] weights) as constants."""
    index, weights = rotation_taps(self.image_size, self.num_rotations)
    return tf.constant(index), tf.constant(weights, dtype=dtype)

  def _scatter(self, values, index):
    """sum over the taps of values [..., K, L^2, T] into their source
    pixels: [..., K, L^2] (the transpose of the gather)."""
    count, pixels = self.num_rotations, self.image_size**2
    lead = tf.shape(values)[:-3]
    # Segments k L^2 + source pixel, on the first axis.
    segments = tf.reshape(
      index + pixels * tf.range(count, dtype=tf.int32)[:, None, None], [-1]
    )  # [K L^2 T]
    rank = values.shape.rank
    moved = tf.transpose(
      values, [rank - 3, rank - 2, rank - 1] + list(range(rank - 3))
    )  # [K, L^2, T, ...]
    flat = tf.reshape(
      moved, tf.concat([[count * pixels * TAPS], lead], 0)
    )  # [K L^2 T, ...]
    summed = tf.math.unsorted_segment_sum(
      flat, segments, count * pixels
    )  # [K L^2, ...]
    back = tf.reshape(summed, tf.concat([[count, pixels], lead], 0))
    return tf.transpose(
      back, list(range(2, rank - 1)) + [0, 1]
    )  # [..., K, L^2]

  def rotate(self, images):
    """R_k F for every k.

    Args:
      images: float tensor [..., L, L].

    Returns:
      Tensor [..., K, L, L] of the same dtype.
    """
    images = tf.convert_to_tensor(images)
    size = self.image_size
    if self.is_permutation:
      turns = [images]
      for _ in range(1, self.num_rotations):
        turns.append(_rot90(turns[-1], 4 // self.num_rotations))
      return tf.stack(turns, axis=-3)
    flat = tf.reshape(
      images, tf.concat([tf.shape(images)[:-2], [size * size]], 0)
    )  # [..., L^2]
    index, weights = self._taps(images.dtype)
    taps = tf.gather(flat, index, axis=-1)  # [..., K, L^2, T]
    out = tf.reduce_sum(taps * weights, axis=-1)  # [..., K, L^2]
    return tf.reshape(
      out,
      tf.concat([tf.shape(images)[:-2], [self.num_rotations, size, size]], 0),
    )

  def adjoint(self, rotated):
    """R_k^T G_k for every k (not summed).

    Args:
      rotated: float tensor [..., K, L, L].

    Returns:
      Tensor [..., K, L, L].
    """
    rotated = tf.convert_to_tensor(rotated)
    size = self.image_size
    if self.is_permutation:
      parts = tf.unstack(rotated, num=self.num_rotations, axis=-3)
      step = 4 // self.num_rotations
      back = [_rot90(g, (4 - step * k) % 4) for k, g in enumerate(parts)]
      return tf.stack(back, axis=-3)
    lead = tf.shape(rotated)[:-3]
    flat = tf.reshape(
      rotated, tf.concat([lead, [self.num_rotations, size * size]], 0)
    )  # [..., K, L^2]
    index, weights = self._taps(rotated.dtype)
    out = self._scatter(flat[..., None] * weights, index)  # [..., K, L^2]
    return tf.reshape(
      out, tf.concat([lead, [self.num_rotations, size, size]], 0)
    )

  def normal_matrix(self, weights):
    """sum_k R_k^T diag(weights_k) R_k as a dense matrix.

    Args:
      weights: float tensor [..., K, L, L].

    Returns:
      Tensor [..., L^2, L^2].
    """
    size = self.image_size
    pixels = size * size
    lead = tf.shape(weights)[:-3]
    flat = tf.reshape(
      weights, tf.concat([lead, [self.num_rotations, pixels]], 0)
    )  # [..., K, L^2]
    index, taps = self._taps(weights.dtype)  # [K, L^2, T]
    # Row p of R_k contributes v_k[p] w_t w_s at (index_t, index_s).
    pairs = taps[..., :, None] * taps[..., None, :]  # [K, L^2, T, T]
    values = flat[..., None, None] * pairs  # [..., K, L^2, T, T]
    cells = tf.reshape(
      index[..., :, None] * pixels + index[..., None, :], [-1]
    )  # [K L^2 T T]
    rank = values.shape.rank
    moved = tf.transpose(
      values, list(range(rank - 4, rank)) + list(range(rank - 4))
    )  # [K, L^2, T, T, ...]
    summed = tf.math.unsorted_segment_sum(
      tf.reshape(moved, tf.concat([[-1], lead], 0)), cells, pixels * pixels
    )  # [L^4, ...]
    out = tf.reshape(summed, tf.concat([[pixels, pixels], lead], 0))
    return tf.transpose(
      out, list(range(2, rank - 2)) + [0, 1]
    )  # [..., L^2, L^2]

  def normal_diagonal(self, weights):
    """The diagonal of sum_k R_k^T diag(weights_k) R_k, as images.

    Args:
      weights: float tensor [..., K, L, L].

    Returns:
      Tensor [..., L, L]; for permutations, sum_k R_k^T weights_k.
    """
    if self.is_permutation:
      return tf.reduce_sum(self.adjoint(weights), axis=-3)
    size = self.image_size
    lead = tf.shape(weights)[:-3]
    flat = tf.reshape(
      weights, tf.concat([lead, [self.num_rotations, size * size]], 0)
    )  # [..., K, L^2]
    index, taps = self._taps(weights.dtype)
    # (R_k^T diag(v_k) R_k)_qq = sum_p v_k[p] R_k[p, q]^2.
    out = tf.reduce_sum(
      self._scatter(flat[..., None] * taps**2, index), axis=-2
    )  # [..., L^2]
    return tf.reshape(out, tf.concat([lead, [size, size]], 0))


def _rot90(images, quarter_turns):
  """np.rot90 over the last two axes, for quarter_turns in 0..3."""
  quarter_turns %= 4
  if quarter_turns == 0:
    return images
  rank = images.shape.rank
  perm = list(range(rank - 2)) + [rank - 1, rank - 2]
  if quarter_turns == 1:
    return tf.reverse(tf.transpose(images, perm), axis=[-2])
  if quarter_turns == 2:
    return tf.reverse(images, axis=[-2, -1])
  return tf.transpose(tf.reverse(images, axis=[-2]), perm)


def rotation_set(image_size, num_rotations):
  """Builds the `RotationSet` for L = image_size and K = num_rotations.

  Raises:
    ValueError: if K < 1 or L < 1, or if the operators of an interpolated
      K (not 1, 2 or 4) would exceed `TENSOR_LIMIT_BYTES` even in float32.
  """
  if int(image_size) < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}.")
  if int(num_rotations) < 1:
    raise ValueError(
      f"num_rotations (K) must be >= 1, got {num_rotations}; K = 4 is the "
      "paper's choice."
    )
  # The largest constant: the taps' float64 weights [K, L^2, TAPS].
  needed = int(num_rotations) * int(image_size) ** 2 * TAPS * 8
  if int(num_rotations) not in (1, 2, 4) and needed > TENSOR_LIMIT_BYTES:
    most = TENSOR_LIMIT_BYTES // (int(image_size) ** 2 * TAPS * 8)
    raise ValueError(
      f"num_rotations={num_rotations} needs {num_rotations} rotation "
      f"operators of {image_size}^2 x {TAPS} taps, "
      f"{needed / 2**30:.3g} GiB, more than the 2 GiB TensorFlow "
      f"can hold in one tensor: use K <= {most} (K = 4 is the paper's)."
    )
  return RotationSet(
    int(image_size), int(num_rotations), int(num_rotations) in (1, 2, 4)
  )
