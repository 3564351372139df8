"""The in-plane rotation operators R_k of the patch model, eq. (9) and (11).

Phi = {2 pi k / K : k = 0..K-1}. Rotation k turns an L x L image
counter-clockwise by 2 pi k / K about its centre ((L-1)/2, (L-1)/2). Where
4 k / K is an integer the rotation is exactly `np.rot90(F, 4 k / K)`, a
permutation of pixels; other angles use bilinear interpolation (pixels that
fall outside the image read zero). Every operator is an explicit L^2 x L^2
matrix, so its adjoint R_k^T is exact, which the M-step relies on.

K L^4 numbers of operators grow fast: `rotation_set` refuses, before any
work, a K whose operators TensorFlow could not hold as one constant
(`TENSOR_LIMIT_BYTES`); `em.EMOptions.check_size` also compares them with
the machine's memory. The simulator needs only the drawn rotations
(`rotate_image`), so it takes any K.
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf

__all__ = [
  "RotationSet",
  "rotation_set",
  "rotation_matrices",
  "rotation_matrix",
  "rotate_image",
  "operator_bytes",
  "TENSOR_LIMIT_BYTES",
]

# The largest tensor TensorFlow can hold as a constant of a graph (the 2 GB
# limit of its protocol buffers): the rotation operators are one.
TENSOR_LIMIT_BYTES = 2**31 - 1


def operator_bytes(image_size, num_rotations, itemsize=8):
  """Bytes of the K operators [K, L^2, L^2] of `itemsize`-byte numbers."""
  return int(num_rotations) * int(image_size) ** 4 * int(itemsize)


def _quarter_turns(k, num_rotations):
  """4 k / K as an int where rotation k is a quarter turn, else None."""
  quarter = 4 * int(k) / int(num_rotations)
  return int(quarter) if float(quarter).is_integer() else None


def _rot90_matrix(image_size, quarter_turns):
  """Permutation matrix P with P @ vec(F) = vec(np.rot90(F, quarter_turns))."""
  index = np.arange(image_size * image_size).reshape(image_size, image_size)
  source = np.rot90(index, quarter_turns).reshape(-1)  # [L^2]
  matrix = np.zeros((image_size**2, image_size**2))
  matrix[np.arange(image_size**2), source] = 1.0
  return matrix


def _bilinear_rotation_matrix(image_size, angle):
  """Bilinear interpolation matrix of a counter-clockwise turn by `angle`."""
  centre = (image_size - 1) / 2.0
  rows, cols = np.meshgrid(
    np.arange(image_size), np.arange(image_size), indexing="ij"
  )
  # Counter-clockwise on screen (row axis pointing down), as np.rot90 turns:
  # the output pixel at (r, c) reads the input at the inverse-rotated point.
  y = rows - centre
  x = cols - centre
  cos, sin = np.cos(angle), np.sin(angle)
  src_r = centre + cos * y + sin * x
  src_c = centre - sin * y + cos * x
  matrix = np.zeros((image_size**2, image_size**2))
  r0 = np.floor(src_r).astype(int)
  c0 = np.floor(src_c).astype(int)
  fr = src_r - r0
  fc = src_c - c0
  out = (rows * image_size + cols).reshape(-1)
  for dr, dc, weight in (
    (0, 0, (1 - fr) * (1 - fc)),
    (1, 0, fr * (1 - fc)),
    (0, 1, (1 - fr) * fc),
    (1, 1, fr * fc),
  ):
    rr = (r0 + dr).reshape(-1)
    cc = (c0 + dc).reshape(-1)
    w = weight.reshape(-1)
    inside = (rr >= 0) & (rr < image_size) & (cc >= 0) & (cc < image_size)
    inside &= w > 1e-12
    np.add.at(
      matrix, (out[inside], rr[inside] * image_size + cc[inside]), w[inside]
    )
  return matrix


def rotation_matrix(image_size, k, num_rotations):
  """The operator R_k of rotation k of K, float64 [L^2, L^2] (as below)."""
  quarter = _quarter_turns(k, num_rotations)
  if quarter is not None:
    return _rot90_matrix(image_size, quarter)
  return _bilinear_rotation_matrix(
    image_size, 2 * np.pi * int(k) / int(num_rotations)
  )


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
  operator = rotation_matrix(size, k, num_rotations)  # [L^2, L^2]
  return (operator @ image.reshape(-1)).reshape(size, size)


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
  # Filled in place: stacking a list would hold the operators twice.
  out = np.empty((int(num_rotations), size**2, size**2))  # [K, L^2, L^2]
  for k in range(int(num_rotations)):
    out[k] = rotation_matrix(size, k, num_rotations)
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
    """The operators as a constant tensor [K, L^2, L^2] of `dtype`."""
    return tf.constant(
      rotation_matrices(self.image_size, self.num_rotations), dtype=dtype
    )

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
    out = tf.einsum("kpq,...q->...kp", self.matrices(images.dtype), flat)
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
    out = tf.einsum("kpq,...kp->...kq", self.matrices(rotated.dtype), flat)
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
    lead = tf.shape(weights)[:-3]
    flat = tf.reshape(
      weights, tf.concat([lead, [self.num_rotations, size * size]], 0)
    )  # [..., K, L^2]
    mats = self.matrices(weights.dtype)  # [K, L^2, L^2]
    return tf.einsum("kpq,...kp,kpr->...qr", mats, flat, mats)

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
    out = tf.einsum("kpq,...kp->...q", self.matrices(weights.dtype) ** 2, flat)
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
  needed = operator_bytes(image_size, num_rotations, 4)
  if int(num_rotations) not in (1, 2, 4) and needed > TENSOR_LIMIT_BYTES:
    most = TENSOR_LIMIT_BYTES // operator_bytes(image_size, 1, 4)
    raise ValueError(
      f"num_rotations={num_rotations} needs {num_rotations} rotation "
      f"operators of {image_size}^2 x {image_size}^2 numbers, "
      f"{needed / 2**30:.3g} GiB in float32, more than the 2 GiB TensorFlow "
      f"can hold in one tensor: use K <= {most} (K = 4 is the paper's)."
    )
  return RotationSet(
    int(image_size), int(num_rotations), int(num_rotations) in (1, 2, 4)
  )
