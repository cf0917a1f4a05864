"""Winograd F(2 x 2, 3 x 3): the FCN-8s's 3 x 3 training convolutions on CPU.

Why (measured 2026-12-07 on 2 AMD EPYC cores, jax 0.10.2, bench/RESULTS.md
session 12): XLA:CPU's 3 x 3 convolution kernels run at most of the
machine's peak already, so the remaining gap to PyTorch's oneDNN step could
only close with fewer operations. Winograd's minimal filtering computes each
2 x 2 block of outputs from a 4 x 4 block of inputs with 16 products per
(input, output) channel pair instead of 36: the channel contraction becomes
16 independent matrix products (one per transform point), 2.25x fewer
multiply-adds, and the transforms around them are additions of whole
arrays that XLA fuses. The gradients follow from the same factorisation
(the transposes of the transforms around two more batches of 16 products),
so forward and backward are both 2.25x cheaper in their products. Per layer
at 256 x 256 (forward / backward, ms): conv3_2 109 / 185 -> 50 / 109,
conv4_2 108 / 180 -> 45 / 96, conv5_2 32 / 52 -> 15 / 30. It does not
pay where the map is tiny (the transforms and 16 small products cost more
than they save) or the channels few (conv1_2's 64 -> 64 backward, the main
job's 1/16 width): `pays` draws that line.

Numbers: the transform points (0, 1, -1, infinity) have coefficients 0,
+-1 and 1/2 only, so results equal the direct convolution to float32
rounding (relative error about 1e-6 of the output's scale, tested against
a float64 NumPy convolution in tests/test_winograd.py), the same order as
any change of summation order.

Layout: a padded input xp (N, 2T + 2, 2S + 2, C) has T x S overlapping
4 x 4 tiles at stride 2. Transformed arrays are (16, N T S, channels): one
row block per transform point (a, b), a-major, so each product is a plain
batched matmul. All functions take and return float32 NHWC / HWIO arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Lavin & Gray (2016), F(2, 3): Y = A^T [(G g G^T) * (B^T d B)] A.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)

# Where Winograd pays on CPU (per-layer forward + backward, ms, 2 cores,
# XLA's direct forward and the "taps" gradients -> Winograd): 227 x 227,
# 64 -> 128: 159 -> 125; 57 x 57 x 512: 288 -> 141; 29 x 29 x 512: 84 -> 45;
# 15 x 15 x 512: 22 -> 19; not at 11 x 11 x 512 (15 -> 15) or smaller, nor
# at 64 -> 64 channels (454 x 454: 346 -> 381; 164 x 164: 47 -> 48).
MIN_OUT_CHANNELS = 128
MIN_IN_CHANNELS = 64
MIN_PIXELS = 14 * 14


def pays(out_hw: Sequence[int], cin: int, cout: int, kernel_hw: Sequence[int],
         dtype: Any) -> bool:
    """Whether a stride-1 convolution should train through Winograd on CPU.

    Args:
      out_hw: (Ho, Wo) of the convolution's output.
      cin, cout: its channel counts.
      kernel_hw: (kh, kw); only 3 x 3 kernels qualify.
      dtype: the compute dtype; only float32 qualifies (the transforms'
        additions would lose bfloat16's few mantissa bits).
    """
    return (tuple(kernel_hw) == (3, 3) and jnp.dtype(dtype) == jnp.float32
            and cin >= MIN_IN_CHANNELS and cout >= MIN_OUT_CHANNELS
            and out_hw[0] * out_hw[1] >= MIN_PIXELS)


def _combine(matrix: np.ndarray, parts: Sequence[jax.Array]) -> list[jax.Array]:
    """[sum_j matrix[i, j] parts[j] for each row i], skipping zero terms.

    The coefficients are constants (0, +-1, 1/2), so each result is a few
    additions of whole arrays, which XLA fuses with their neighbours."""
    out = []
    for row in matrix:
        acc = None
        for coef, part in zip(row, parts):
            if coef == 0:
                continue
            term = part if coef == 1 else (-part if coef == -1 else coef * part)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _split_pairs(x: jax.Array, axis: int) -> list[jax.Array]:
    """The four stride-2 tile offsets 0..3 along `axis` of a (2T + 2)-long axis.

    Returns [x[2t], x[2t + 1], x[2t + 2], x[2t + 3] for t < T], each with T
    along `axis`: reshapes and slices, no gathers."""
    n = x.shape[axis] // 2
    pairs = x.reshape(x.shape[:axis] + (n, 2) + x.shape[axis + 1:])
    def take(lo: int, hi: int, k: int) -> jax.Array:
        idx = (slice(None),) * axis + (slice(lo, hi), k)
        return pairs[idx]
    return [take(0, n - 1, 0), take(0, n - 1, 1), take(1, n, 0), take(1, n, 1)]


def _overlap_add(parts: Sequence[jax.Array], axis: int) -> jax.Array:
    """The transpose of `_split_pairs`: four (T)-long arrays added back at
    their offsets into one (2T + 2)-long axis."""
    nd = parts[0].ndim
    low = [(0, 0)] * nd
    high = [(0, 0)] * nd
    low[axis], high[axis] = (0, 1), (1, 0)
    halves = [jnp.pad(parts[k], low) + jnp.pad(parts[k + 2], high) for k in range(2)]
    inter = jnp.stack(halves, axis=axis + 1)
    shape = list(halves[0].shape)
    shape[axis] *= 2
    return inter.reshape(shape)


def input_transform(xp: jax.Array) -> jax.Array:
    """B^T d B of every tile: xp (N, 2T + 2, 2S + 2, C) -> (16, N T S, C)."""
    rows = _split_pairs(xp, 1)                                 # 4 x (N, T, W, C)
    tiles = [_split_pairs(r, 2) for r in rows]                 # [i][j]: (N, T, S, C)
    by_col = [_combine(_BT, [tiles[i][j] for i in range(4)]) for j in range(4)]  # [j][a]
    u = [_combine(_BT, [by_col[j][a] for j in range(4)]) for a in range(4)]      # [a][b]
    flat = jnp.stack([part for row in u for part in row])
    return flat.reshape(16, -1, xp.shape[-1])


def input_transform_t(du: jax.Array, tiles_shape: Sequence[int]) -> jax.Array:
    """The transpose of `input_transform`: du (16, N T S, C) -> (N, 2T + 2, 2S + 2, C).

    Args:
      du: cotangent of the transformed input.
      tiles_shape: (N, T, S).
    """
    parts = du.reshape((4, 4) + tuple(tiles_shape) + du.shape[-1:])
    by_b = [_combine(_BT.T, [parts[a, b] for a in range(4)]) for b in range(4)]  # [b][i]
    tiles = [_combine(_BT.T, [by_b[b][i] for b in range(4)]) for i in range(4)]  # [i][j]
    rows = [_overlap_add(tiles[i], 2) for i in range(4)]
    return _overlap_add(rows, 1)


def output_transform(m: jax.Array, tiles_shape: Sequence[int]) -> jax.Array:
    """A^T m A of every tile: m (16, N T S, K) -> (N, 2T, 2S, K)."""
    n, t, s = tiles_shape
    parts = m.reshape((4, 4, n, t, s) + m.shape[-1:])
    by_b = [_combine(_AT, [parts[a, b] for a in range(4)]) for b in range(4)]  # [b][p]
    y = [_combine(_AT, [by_b[b][p] for b in range(4)]) for p in range(2)]       # [p][q]
    blocks = jnp.stack([jnp.stack(yp, axis=3) for yp in y], axis=2)  # (N, T, 2, S, 2, K)
    return blocks.reshape(n, 2 * t, 2 * s, m.shape[-1])


def output_transform_t(dy: jax.Array) -> jax.Array:
    """The transpose of `output_transform`: dy (N, 2T, 2S, K) -> (16, N T S, K)."""
    n, h, w, k = dy.shape
    blocks = dy.reshape(n, h // 2, 2, w // 2, 2, k)
    d = [[blocks[:, :, p, :, q] for q in range(2)] for p in range(2)]
    by_q = [_combine(_AT.T, [d[p][q] for p in range(2)]) for q in range(2)]  # [q][a]
    m = [_combine(_AT.T, [by_q[q][a] for q in range(2)]) for a in range(4)]  # [a][b]
    return jnp.stack([part for row in m for part in row]).reshape(16, -1, k)


def kernel_transform(w: jax.Array) -> jax.Array:
    """G g G^T of every channel pair: w (3, 3, C, K) -> (16, C, K).

    As `_combine`s of whole (C, K) planes: an einsum with the 4 x 3 constant
    took 23 ms at 512 -> 512 channels (XLA:CPU transposed the kernel around
    two products), this 2.4 ms."""
    rows = _combine(_G, [w[i] for i in range(3)])                       # [a]: (3, C, K)
    v = [_combine(_G, [row[j] for j in range(3)]) for row in rows]      # [a][b]
    return jnp.stack([part for row in v for part in row])


def kernel_transform_t(dv: jax.Array) -> jax.Array:
    """The transpose of `kernel_transform`: dv (16, C, K) -> (3, 3, C, K)."""
    parts = dv.reshape((4, 4) + dv.shape[1:])
    rows = _combine(_G.T, [parts[a] for a in range(4)])                 # [i]: (4, C, K)
    dw = [_combine(_G.T, [row[b] for b in range(4)]) for row in rows]   # [i][j]
    return jnp.stack([jnp.stack(row) for row in dw])


def _pad_to_even(a: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """a (N, H, W, C) with a zero row / column added at the bottom / right
    where the output size out_hw is odd (the 2 x 2 output blocks then tile
    it; the extra output row / column is cut off again)."""
    return jnp.pad(a, ((0, 0), (0, out_hw[0] % 2), (0, out_hw[1] % 2), (0, 0)))


def _tiles_shape(xp_even: jax.Array) -> tuple[int, int, int]:
    return xp_even.shape[0], (xp_even.shape[1] - 2) // 2, (xp_even.shape[2] - 2) // 2


def conv3x3(xp: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
    """'VALID' stride-1 3 x 3 convolution (cross-correlation) by Winograd.

    Args:
      xp: (N, H, W, C) float32, already zero-padded as the layer needs; H, W >= 3.
      w: (3, 3, C, K) float32 HWIO kernel.
      precision: a `lax.Precision` or None, for the 16 channel products.

    Returns:
      (N, H - 2, W - 2, K) float32, equal to `lax.conv_general_dilated` to
      float32 rounding.
    """
    ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
    xe = _pad_to_even(xp, (ho, wo))
    shape = _tiles_shape(xe)
    m = jnp.matmul(input_transform(xe), kernel_transform(w), precision=precision,
                   preferred_element_type=jnp.float32)
    return output_transform(m, shape)[:, :ho, :wo]


def conv3x3_grads(xp: jax.Array, w: jax.Array, g: jax.Array,
                  precision: Any = None) -> tuple[jax.Array, jax.Array]:
    """Gradients of `conv3x3` (hence of the direct convolution) by Winograd.

    The input's transform is recomputed here rather than kept from the
    forward: equal speed in the measurement, and the residual stays xp
    (a quarter of the transformed input's memory).

    Args:
      xp: (N, H, W, C) float32, the padded input of the forward.
      w: (3, 3, C, K) float32.
      g: (N, H - 2, W - 2, K) float32 cotangent of the output.
      precision: as in `conv3x3`.

    Returns:
      (dxp (N, H, W, C), dw (3, 3, C, K)), float32.
    """
    out_hw = g.shape[1:3]
    xe = _pad_to_even(xp, out_hw)
    shape = _tiles_shape(xe)
    dm = output_transform_t(_pad_to_even(g, out_hw))               # (16, P, K)
    u = input_transform(xe)                                        # (16, P, C)
    v = kernel_transform(w)                                        # (16, C, K)
    du = jnp.einsum("fpk,fck->fpc", dm, v, precision=precision,
                    preferred_element_type=jnp.float32)
    dv = jnp.einsum("fpc,fpk->fck", u, dm, precision=precision,
                    preferred_element_type=jnp.float32)
    dxp = input_transform_t(du, shape)[:, :xp.shape[1], :xp.shape[2]]
    return dxp, kernel_transform_t(dv)
