"""Layer primitives of the FCN-8s: convolutions, bilinear upsampling, max pooling.

Each has a reason to exist beside the textbook `lax` call:

* `conv2d`: a stride-1 convolution with its gradients written out as
  matrix products and canonical forward convolutions, used for every
  convolution of the FCN-8s (`FCN8s.conv_grad="custom"`). Why, measured on
  2 CPU cores (jax 0.10.2; bench/RESULTS.md has the whole story):
  - inside a `lax.switch` branch (the fine network trains in the canvas
    switch) XLA:CPU runs its own convolution gradients outside its fast
    convolution library: a 3 x 3 kernel gradient at 82 x 82 x 256 took
    15.8 s instead of 0.19 s, an input gradient 0.36 s instead of 0.04 s;
    matrix products and forward convolutions keep their speed there. This
    made the full-width J step at 256 x 256 take 146 s, 24x the official
    PyTorch step;
  - even outside a switch, fc6's input gradient (a 7 x 7 kernel on a map
    hardly larger than it) becomes a convolution with kernel and cotangent
    swapped, 30-60x its forward at width 1/4, and its kernel gradient and
    forward are 2-3x slower than the same products written as im2col GEMMs;
  - the operand orders below avoid transposed copies of whole kernels and
    of every shifted activation, which XLA:CPU otherwise inserts;
  - on CPU the kernel gradient of a large map loops over output rows, one
    im2col product a row (`_dw_rows`): conv1_2's at full width 2x faster
    than per-tap products, the coarse FCN-8s forward plus backward at
    256 x 256 3.99 -> 3.22 s.
  Gradients equal XLA's to float32 rounding (tests/test_layers.py,
  tests/test_train_compile.py).
* `upsample_bilinear`: the frozen per-channel bilinear transposed convolution
  as two small matrix products (separable kernel); `upsample_transposed` /
  `StoredUpsampling`: the same layer with a full, stored channel kernel (the
  official PyTorch models' upsampling, `FCN8s.upsampling="stored"`).
* `max_pool_ceil`: ceil-mode 2 x 2 pooling as a reshape and a max, with the
  Caffe first-maximum gradient written elementwise.

All take and return NHWC arrays; kernels are HWIO.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stnjax.checks import InputError, check_array

DIMS = ("NHWC", "HWIO", "NHWC")
CONV_GRADS = ("xla", "taps", "im2col")
# Kernel gradients of maps with at least this many pixels (Ho x Wo) loop over
# rows on CPU (`_dw_rows`): faster from conv2_x at 256 x 256 up (114 x 114 x
# 128 -> 256: 102 -> 65 ms), equal at 57 x 57, slower at 29 x 29 (34 -> 49 ms).
ROW_LOOP_MIN_PIXELS = 80 * 80
# The row loop runs ROW_UNROLL rows an iteration for layers of at least
# ROW_UNROLL_MIN_MACS = Cin x Cout: at full width (conv1_2, 64 -> 64, 454 x
# 454) 168 -> 134 ms and the J step at 256 x 256 about 5 % faster, for 4-5 s
# more compilation; at the main job's width (4 -> 4 channels) no faster and
# 5 s more to compile a step, so small layers keep one row an iteration.
ROW_UNROLL = 4
ROW_UNROLL_MIN_MACS = 64 * 64


def _explicit_padding(padding: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of 'VALID' or explicit int pairs."""
    if padding == "VALID":
        return (0, 0), (0, 0)
    if isinstance(padding, str):
        raise InputError(f"Conv2D: a custom gradient needs 'VALID' or explicit padding, "
                         f"got {padding!r}")
    (t, b), (l, r) = padding
    return (int(t), int(b)), (int(l), int(r))


def _conv(x: jax.Array, w: jax.Array, padding: Any, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DIMS,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, padding: Any = "VALID", precision: Any = None,
           grad: str = "taps") -> jax.Array:
    """Stride-1 NHWC convolution with its gradients written out (see the module doc).

    * "taps": the forward is `lax.conv_general_dilated` itself (bit for bit
      XLA's); kernel gradient as one matrix product per kernel tap (the
      cotangent contracted over N H W with x shifted by the tap); input
      gradient as a forward convolution of the cotangent with the flipped,
      in/out-swapped kernel (canonical dimension numbers). For the 3 x 3 and
      1 x 1 layers (but conv1_1).
    * "im2col": under differentiation the forward, kernel gradient and input
      gradient are products with the im2col matrix (the kh kw shifted views
      of x stacked), the input gradient added back at each tap's offset
      (col2im). For the layers where that matrix is small: fc6 (7 x 7 on a
      map hardly larger than the kernel, where XLA:CPU's convolution is slow
      in both directions) and conv1_1 (3 input channels, so 27 columns; nine
      per-tap products of 3 columns each ran at a third of that speed:
      148 vs 50 ms at 454 x 454 x 64). That training forward equals XLA's convolution to float32
      rounding (another summation order); without differentiation
      (inference) the forward is XLA's convolution itself.

    Args:
      x: (N, H, W, Cin) float.
      w: (kh, kw, Cin, Cout) float, the dtype of x.
      padding: 'VALID' or ((top, bottom), (left, right)) zero padding, a
        hashable tuple of int pairs.
      precision: a `lax.Precision` or None, for every product.
      grad: "taps" or "im2col".

    Returns:
      (N, H + top + bottom - kh + 1, W + left + right - kw + 1, Cout), dtype of x.
    """
    # Not under differentiation (inference): XLA's convolution in both forms,
    # which skips the taps that fall on padding (pad32's fc6 on a 3 x 3 map
    # reads mostly padding) and keeps inference unchanged.
    return _conv(x, w, padding, precision)


def _pad(x: jax.Array, padding: Any) -> jax.Array:
    (t, b), (l, r) = _explicit_padding(padding)
    return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))


def _im2col(xp: jax.Array, kh: int, kw: int) -> jax.Array:
    """(N, Ho, Wo, kh kw, Cin): the shifted views of the padded input, tap-major."""
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return jnp.stack([xp[:, i:i + ho, j:j + wo] for i, j in _taps(kh, kw)], axis=3)


def _conv2d_fwd(x, w, padding, precision, grad):
    if grad == "im2col":
        kh, kw, cin, cout = w.shape
        cols = _im2col(_pad(x, padding), kh, kw)
        # Two-dimensional operands: the kernel's reshape is then free (with a
        # (taps, Cin) contraction XLA:CPU copied the whole kernel first).
        y = jnp.matmul(cols.reshape(-1, kh * kw * cin), w.reshape(kh * kw * cin, cout),
                       precision=precision, preferred_element_type=jnp.float32)
        # The im2col matrix is small for these layers and the kernel gradient needs it
        # again: kept as the residual instead of x.
        return y.reshape(cols.shape[:3] + (cout,)).astype(x.dtype), (cols, w)
    return _conv(x, w, padding, precision), (x, w)


def _taps(kh: int, kw: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(kh) for j in range(kw)]


def _few_rows(g: jax.Array) -> bool:
    """Fewer activation rows (N Ho Wo of the cotangent) than output channels:
    fc7 on pool5-sized maps, whose gradients are then ordered to read and
    write the kernel as stored (see `_dw_taps`)."""
    return g.shape[0] * g.shape[1] * g.shape[2] < g.shape[3]


def _dw_taps(xp, g, kh, kw, precision):
    """(kh, kw, Cin, Cout) float32: sum over N, Ho, Wo of x[tap] g, one product a tap.

    The operand order depends on which is smaller, the activations (M = N Ho
    Wo rows) or the kernel, because XLA:CPU copies the transposed operand or
    result of each product:
    - M >= Cout (every layer on a large map): each product is written
      (Cout, Cin) = g^T x[tap] with g^T formed once, and only the small
      result is transposed; written x[tap]^T g, XLA:CPU copied every shifted
      view of x transposed (at full width conv1_2's kernel gradient took 1.2 s
      that way, half of it in those copies);
    - M < Cout (fc7 on pool5-sized maps: 4096 x 4096 kernel, M <= 289 at
      512 x 512): written x^T g, so the 64 MB result comes out as stored;
      transposed, it was read strided by the optimiser and copied in the
      backward (0.3 s a step for the two networks, full width, 1 x 64 x 64).
    Plain 2-D matmuls, not einsums: they trace several times faster
    (kh x kw products a layer). On CPU, maps of at least
    ROW_LOOP_MIN_PIXELS loop over rows instead (`_dw_rows`), chosen per
    platform by `lax.platform_dependent`: on GPU and TPU a loop of small
    products would serialise the device."""
    ho, wo = g.shape[1:3]
    if not _few_rows(g) and ho * wo >= ROW_LOOP_MIN_PIXELS:
        return lax.platform_dependent(
            xp, g, cpu=functools.partial(_dw_rows, kh=kh, kw=kw, precision=precision),
            default=functools.partial(_dw_products, kh=kh, kw=kw, precision=precision))
    return _dw_products(xp, g, kh=kh, kw=kw, precision=precision)


def _dw_rows(xp, g, *, kh, kw, precision):
    """`_dw_taps` on CPU for large maps: a loop over output rows, one im2col
    product (Cout, N Wo) x (N Wo, kh kw Cin) a row, accumulated in float32.

    Why: a per-tap product has a tiny (Cin, Cout) result and a huge
    contraction, which XLA:CPU's matmul runs at a third of its speed (one
    core), and one whole-map im2col matrix costs more to write than the
    product (conv1_2 at full width: 475 MB). A row's im2col matrix (1 MB for
    conv1_2) stays in cache. conv1_2's kernel gradient at 454 x 454 x 64
    took 430-530 ms as per-tap products and 180-270 ms this way (PyTorch:
    115 ms); bench/RESULTS.md, session 7."""
    n, ho, wo, cout = g.shape
    cin = xp.shape[-1]

    def row(r, acc):
        xr = lax.dynamic_slice_in_dim(xp, r, kh, axis=1)          # (N, kh, Wp, Cin)
        cols = jnp.concatenate([xr[:, i, j:j + wo] for i, j in _taps(kh, kw)], axis=-1)
        gr = lax.dynamic_index_in_dim(g, r, axis=1, keepdims=False)  # (N, Wo, Cout)
        return acc + jnp.matmul(gr.reshape(n * wo, cout).T, cols.reshape(n * wo, -1),
                                precision=precision, preferred_element_type=jnp.float32)

    unroll = ROW_UNROLL if cin * cout >= ROW_UNROLL_MIN_MACS else 1
    acc = lax.fori_loop(0, ho, row, jnp.zeros((cout, kh * kw * cin), jnp.float32),
                        unroll=unroll)
    return acc.T.reshape(kh, kw, cin, cout)


def _dw_products(xp, g, *, kh, kw, precision):
    """`_dw_taps` as kh x kw whole-map products (see there)."""
    n, ho, wo, cout = g.shape
    cin = xp.shape[-1]
    g2 = g.reshape(n * ho * wo, cout)

    def tap(i, j):
        return xp[:, i:i + ho, j:j + wo].reshape(-1, cin)

    def mm(a, b):
        return jnp.matmul(a, b, precision=precision, preferred_element_type=jnp.float32)

    if _few_rows(g):
        return jnp.stack([jnp.stack([mm(tap(i, j).T, g2) for j in range(kw)])
                          for i in range(kh)])
    gt = g2.T
    rows = [jnp.stack([mm(gt, tap(i, j)) for j in range(kw)]) for i in range(kh)]
    return jnp.stack(rows).transpose(0, 1, 3, 2)


def _dx_conv(g, w, precision):
    """Full correlation of g with the flipped kernel: the gradient wrt the padded x."""
    kh, kw = w.shape[:2]
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    return lax.conv_general_dilated(
        g, wt, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)), dimension_numbers=DIMS,
        precision=precision, preferred_element_type=jnp.float32)


def _dw_im2col(cols, g, precision):
    """(kh kw Cin, Cout) float32: the im2col matrix transposed times the cotangent."""
    m = cols.shape[0] * cols.shape[1] * cols.shape[2]
    return jnp.matmul(cols.reshape(m, -1).T, g.reshape(m, -1), precision=precision,
                      preferred_element_type=jnp.float32)


def _dx_col2im(g, w, padded_hw, precision):
    kh, kw, cin, cout = w.shape
    n, ho, wo, _ = g.shape
    height, width = padded_hw
    # The product's output is (taps x Cin, N Ho Wo), kernel rows first: it then
    # reads w as stored. With the output ordered (N Ho Wo, taps x Cin) XLA:CPU
    # copies the whole fc6 kernel transposed first (0.45 s a network at full
    # width); here only the small result is transposed.
    per_tap = jnp.matmul(w.reshape(-1, cout), g.reshape(-1, cout).T, precision=precision,
                         preferred_element_type=jnp.float32).reshape(kh, kw, cin, n, ho, wo)
    dx = 0.0
    for i, j in _taps(kh, kw):
        dx = dx + jnp.pad(per_tap[i, j].transpose(1, 2, 3, 0),
                          ((0, 0), (i, height - ho - i), (j, width - wo - j), (0, 0)))
    return dx


def _conv2d_bwd(padding, precision, grad, res, g):
    xres, w = res  # x ("taps") or its im2col matrix ("im2col")
    (t, b), (l, r) = _explicit_padding(padding)
    kh, kw = w.shape[:2]
    padded_hw = (g.shape[1] + kh - 1, g.shape[2] + kw - 1)  # stride 1, VALID on padded x
    if grad == "im2col":
        dw = _dw_im2col(xres, g, precision).reshape(w.shape)
        dxp = _dx_col2im(g, w, padded_hw, precision)
    else:
        dw = _dw_taps(_pad(xres, padding), g, kh, kw, precision)
        # Fewer rows than output channels (fc7): as col2im, which reads the
        # kernel as stored; the flipped, transposed kernel of the convolution
        # form is a copy of the whole 64 MB fc7 kernel a network.
        dxp = (_dx_col2im(g, w, padded_hw, precision) if _few_rows(g)
               else _dx_conv(g, w, precision))
    # The padded border's gradient belongs to the zeros, not to x.
    dx = dxp[:, t:padded_hw[0] - b, l:padded_hw[1] - r]
    return dx.astype(w.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv2D(nn.Module):
    """NHWC stride-1 convolution with float32 params cast to the compute dtype at use.

    Params: `kernel` (kh, kw, in, out) HWIO float32 and `bias` (out,) float32.
    Input (N, H, W, in) is cast to `dtype`; output (N, H', W', out) in `dtype`.
    `grad`: "xla" (XLA's own convolution gradients) or a `conv2d` form,
    "taps" or "im2col" (padding must then be 'VALID' or explicit).
    """
    features: int
    kernel_size: int
    padding: Any  # 'SAME', 'VALID' or ((top, bottom), (left, right))
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.he_normal()
    bias_init: Any = nn.initializers.zeros_init()
    precision: Any = None
    grad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.grad not in CONV_GRADS:
            raise InputError(f"Conv2D.grad: expected one of {CONV_GRADS}, got {self.grad!r}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.grad == "xla":
            y = _conv(x, kernel, self.padding, self.precision)
        else:
            pad = "VALID" if self.padding == "VALID" else _explicit_padding(self.padding)
            y = conv2d(x, kernel, pad, self.precision, self.grad)
        return y + bias.astype(self.dtype)


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


