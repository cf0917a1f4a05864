"""Layer primitives of the FCN-8s beside the convolution (`conv.py`).

Each has a reason to exist beside the textbook `lax` call:

* `upsample_bilinear`: the frozen per-channel bilinear transposed convolution
  as two small matrix products (separable kernel); `upsample_transposed` /
  `StoredUpsampling`: the same layer with a full, stored channel kernel (the
  official PyTorch models' upsampling, `FCN8s.upsampling="stored"`).
* `max_pool_ceil`: ceil-mode 2 x 2 pooling as a reshape and a max, with the
  Caffe first-maximum gradient written elementwise.
* `extent_mask`: which positions of a padded map a per-sample (h, w) extent
  keeps (the `valid_hw` masking of the FCN-8s and its norm statistics).

All take and return NHWC arrays; kernels are HWIO.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stnjax.checks import InputError, check_array


def extent_mask(extent: jax.Array, height: int, width: int) -> jax.Array:
    """bool (N, H, W, 1): True at row < extent[:, 0] and column < extent[:, 1].

    Two iota comparisons (XLA fuses them into the consumer). extent: int
    (N, 2), rows and columns kept per sample.
    """
    e = extent.astype(jnp.int32)
    rows = lax.broadcasted_iota(jnp.int32, (1, height, 1, 1), 1) < e[:, 0, None, None, None]
    cols = lax.broadcasted_iota(jnp.int32, (1, 1, width, 1), 2) < e[:, 1, None, None, None]
    return rows & cols


def _bilinear_1d(k: int) -> np.ndarray:
    """The 1-D factor of the bilinear kernel: (k,) float64."""
    if k < 1:
        raise InputError(f"bilinear_kernel: k must be >= 1, got {k}")
    f = math.ceil(k / 2)
    c = f - 0.5 if k % 2 == 0 else f - 1
    return 1.0 - np.abs(np.arange(k, dtype=np.float64) - c) / f


def bilinear_kernel(k: int) -> np.ndarray:
    """The reference's bilinear upsampling kernel (reference 2.2) as (k, k) float32.

    f = ceil(k / 2), c = f - 0.5 for even k else f - 1,
    w[i, j] = (1 - |i - c| / f) * (1 - |j - c| / f).
    """
    w1 = _bilinear_1d(k)
    return np.outer(w1, w1).astype(np.float32)


def _interp_matrix(n: int, k: int, s: int, lo: int, hi: int) -> np.ndarray:
    """1-D transposed conv with the bilinear factor as a matrix: (out, n) float32.

    Row o, column i holds w1[o - s * i] (0 outside the kernel), for the full
    (n - 1) * s + k outputs with `lo` rows removed at the start and `hi` at the end.
    """
    w1 = _bilinear_1d(k)
    full = (n - 1) * s + k
    a = np.zeros((full, n), np.float64)
    for i in range(n):
        a[s * i:s * i + k, i] = w1
    return a[lo:full - hi].astype(np.float32)


def _checked_crop(who: str, h: int, w: int, k: int, s: int,
                  crop: Sequence[int]) -> tuple[int, int, int, int]:
    """The crop (top, bottom, left, right) as ints; InputError unless it
    leaves at least one pixel of the (h - 1) s + k by (w - 1) s + k output."""
    top, bottom, left, right = (int(v) for v in crop)
    full_h, full_w = (h - 1) * s + k, (w - 1) * s + k
    if min(top, bottom, left, right) < 0 or full_h - top - bottom < 1 \
            or full_w - left - right < 1:
        raise InputError(f"{who}: crop {tuple(crop)} does not fit the {full_h}x{full_w} "
                         f"output of a {h}x{w} input")
    return top, bottom, left, right


def upsample_bilinear(x: jax.Array, kernel_size: int, stride: int,
                      crop: Sequence[int] = (0, 0, 0, 0)) -> jax.Array:
    """Per-channel bilinear transposed convolution (no bias), optionally cropped.

    Equals a transposed conv with the `bilinear_kernel` on the channel
    diagonal and zeros across channels: output size (n - 1) * stride + k per
    spatial axis, minus the crop. The kernel is separable (outer product of
    one 1-D factor), so the transposed conv is A_h @ x @ A_w^T per image and
    channel, with A the (out, n) matrix of the 1-D transposed conv; the crop
    removes rows of A, so cropped outputs are never computed. One einsum at
    HIGHEST precision (no TF32): exact to float32 rounding and, for the x8
    layer at 512x512 on an H200, 10x faster than the equivalent depthwise
    conv with lhs_dilation (0.29 vs 2.9 ms, batch 16). The matrices are NumPy
    constants: no parameter, no gradient.

    Args:
      x: (N, h, w, C) float array.
      kernel_size: k.
      stride: s.
      crop: (top, bottom, left, right) rows / columns removed from the full
        (n - 1) * s + k output.

    Returns:
      (N, (h - 1) * s + k - top - bottom, (w - 1) * s + k - left - right, C),
      dtype of x.
    """
    check_array(x, "upsample_bilinear: x", rank=4, dtype_kind="f")
    k, s = int(kernel_size), int(stride)
    _, h, w, _ = x.shape
    top, bottom, left, right = _checked_crop("upsample_bilinear", h, w, k, s, crop)
    a_h = jnp.asarray(_interp_matrix(h, k, s, top, bottom), x.dtype)
    a_w = jnp.asarray(_interp_matrix(w, k, s, left, right), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", a_h, x, a_w,
                      precision=lax.Precision.HIGHEST)


def upsample_transposed(x: jax.Array, kernel: jax.Array, stride: int,
                        crop: Sequence[int] = (0, 0, 0, 0)) -> jax.Array:
    """Transposed convolution with a full channel kernel (no bias), optionally cropped.

    PyTorch's `ConvTranspose2d` (padding 0, dilation 1) with the weight
    stored as (k, k, Cin, Cout) (PyTorch's (Cin, Cout, k, k) moved by
    (2, 3, 0, 1)): out[n, s i + a, s j + b, o] += x[n, i, j, c] w[a, b, c, o].
    The official RSTN's upsampling layers carry such kernels: the bilinear
    filter on the channel diagonal, PyTorch's random initialisation off it
    (frozen ever since). Computed as one product (every input pixel times the
    whole kernel, at HIGHEST precision) and an overlap-add of the ceil(k / s)^2
    shifted stride-s blocks, so the crop is a slice.

    Args:
      x: (N, h, w, Cin) float array.
      kernel: (k, k, Cin, Cout) float array (square kernel).
      stride: s >= 1.
      crop: as in `upsample_bilinear`.

    Returns:
      (N, H', W', Cout) with H', W' as in `upsample_bilinear`, dtype of x.
    """
    check_array(x, "upsample_transposed: x", rank=4, dtype_kind="f")
    s = int(stride)
    k = int(kernel.shape[0]) if kernel.ndim == 4 else -1
    if kernel.ndim != 4 or kernel.shape[1] != k or kernel.shape[2] != x.shape[-1] or s < 1:
        raise InputError(f"upsample_transposed: kernel {tuple(kernel.shape)} and stride {s} "
                         f"do not fit a (k, k, {x.shape[-1]}, Cout) transposed conv")
    n, h, w, _ = x.shape
    top, bottom, left, right = _checked_crop("upsample_transposed", h, w, k, s, crop)
    full_h, full_w = (h - 1) * s + k, (w - 1) * s + k
    m = -(-k // s)  # blocks of s taps per axis
    wk = jnp.pad(kernel.astype(x.dtype), ((0, m * s - k), (0, m * s - k), (0, 0), (0, 0)))
    cout = wk.shape[-1]
    # t[n, i, p, q, j, p', q', o]: input pixel (i, j) times tap (p s + q, p' s + q').
    t = jnp.einsum("nhwc,abco->nhawbo", x, wk, precision=lax.Precision.HIGHEST)
    t = t.reshape(n, h, m, s, w, m, s, cout)
    out = 0.0
    for p in range(m):  # block row i + p of the output takes tap block p of row i
        for q in range(m):
            out = out + jnp.pad(t[:, :, p, :, :, q], ((0, 0), (p, m - 1 - p), (0, 0),
                                                      (q, m - 1 - q), (0, 0), (0, 0)))
    out = out.reshape(n, (h + m - 1) * s, (w + m - 1) * s, cout)
    return out[:, top:full_h - bottom, left:full_w - right]


class StoredUpsampling(nn.Module):
    """A frozen transposed convolution whose kernel is a variable of the model.

    Param: `kernel` (k, k, C, C) float32, initialised to the bilinear filter
    on the channel diagonal (the `upsample_bilinear` result) and replaced by
    the stored kernel of imported weights. The kernel enters through
    `lax.stop_gradient` (no gradient) and the optimiser leaves it alone
    (`stnjax.train.optim`: the upsampling layers are frozen), as in the
    official code, where these layers are never trained.
    """
    kernel_size: int
    stride: int
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, h, w, C) float -> (N, (h - 1) s + k - crop, ..., C), dtype of x."""
        c, k = x.shape[-1], self.kernel_size

        def init(key, shape, dtype=jnp.float32):
            del key
            return jnp.asarray(bilinear_diagonal(k, c), dtype).reshape(shape)

        kernel = self.param("kernel", init, (k, k, c, c))
        return upsample_transposed(x, lax.stop_gradient(kernel), self.stride, self.crop)


def bilinear_diagonal(k: int, channels: int) -> np.ndarray:
    """(k, k, C, C) float32: `bilinear_kernel(k)` on the channel diagonal, zeros
    across channels (the Caffe upsampling as a full channel kernel)."""
    out = np.zeros((k, k, channels, channels), np.float32)
    for c in range(channels):
        out[:, :, c, c] = bilinear_kernel(k)
    return out


def max_pool_ceil_window(x: jax.Array) -> jax.Array:
    """`max_pool_ceil` as one `lax.reduce_window` (the textbook form, whose
    gradient is XLA's select-and-scatter); kept as the reference the tests
    and `bench/train_step.py --pool=window` compare against."""
    _, h, w, _ = x.shape
    return lax.reduce_window(
        x, np.array(-np.inf, x.dtype), lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
        ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def _pool_windows(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, ceil(H/2), 2, ceil(W/2), 2, C): the 2x2 windows,
    an odd edge padded with -inf."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c)


@jax.custom_vjp
def max_pool_ceil(x: jax.Array) -> jax.Array:
    """2x2 / stride-2 max pooling in ceil mode (Caffe / PyTorch ceil_mode=True).

    An odd edge gets a last window that runs past the border; it takes the
    max of its valid part (the border is padded with -inf).

    The windows do not overlap, so the pooling is a reshape and a max, and
    its gradient goes to the first maximal element of each window in
    row-major order, as Caffe's pooling and XLA's select-and-scatter (the
    gradient of `max_pool_ceil_window`) do, bit for bit, ties included; but
    as elementwise operations that fuse, not a scatter.

    Args:
      x: (N, H, W, C) float array, H, W >= 1.

    Returns:
      (N, ceil(H / 2), ceil(W / 2), C), dtype of x.
    """
    return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_ceil(x)
    return y, (x, y)


def _max_pool_bwd(res, g):
    x, y = res
    n, h, w, c = x.shape
    hit = _pool_windows(x) == y[:, :, None, :, None, :]
    # Keep the first hit in the order (0,0), (0,1), (1,0), (1,1).
    taken = jnp.zeros_like(hit[:, :, 0, :, 0])
    first = []
    for a in (0, 1):
        for b in (0, 1):
            e = hit[:, :, a, :, b] & ~taken
            first.append(e)
            taken = taken | e
    sel = jnp.stack([jnp.stack(first[0:2], axis=3), jnp.stack(first[2:4], axis=3)], axis=2)
    dx = jnp.where(sel, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(n, 2 * ((h + 1) // 2), 2 * ((w + 1) // 2), c)[:, :h, :w]
    return (dx,)


max_pool_ceil.defvjp(_max_pool_fwd, _max_pool_bwd)
