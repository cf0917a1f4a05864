"""The FCN-8s's convolution: `conv2d` with written-out gradients, and `Conv2D`.

`conv2d` is a stride-1 convolution whose training forward and gradients
are written out as matrix products, canonical forward convolutions and, on
CPU, Winograd's minimal filtering, used for every convolution of the
FCN-8s (`FCN8s.conv_grad="custom"`). Inference (no differentiation) is
XLA's own convolution. Why, measured on 2 CPU cores (jax 0.10.2;
bench/RESULTS.md has the whole story):

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
  256 x 256 3.99 -> 3.22 s;
- on CPU the 3 x 3 layers from conv2_1 to conv5_3 train through Winograd
  F(2 x 2, 3 x 3) (`winograd.py`): 2.25x fewer multiply-adds in the
  forward and both gradients, where XLA:CPU's direct kernels already ran
  near the machine's peak.

Gradients equal XLA's to float32 rounding (tests/test_layers.py,
tests/test_winograd.py, tests/test_train_compile.py). All take and return
NHWC arrays; kernels are HWIO.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from stnjax.checks import InputError
from stnjax.models import winograd

DIMS = ("NHWC", "HWIO", "NHWC")
CONV_GRADS = ("xla", "taps", "im2col", "winograd")
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
    * "winograd": "taps", except where `winograd.pays` for the layer's
      shapes and dtype (3 x 3, float32, enough channels and pixels) and the
      program runs on CPU: there the training forward and both gradients go
      through Winograd F(2 x 2, 3 x 3) (`winograd.conv3x3` and
      `conv3x3_grads`), equal to XLA's to float32 rounding. On GPU and TPU
      (`lax.platform_dependent`) it is "taps": their convolution libraries
      choose their own algorithms.

    Args:
      x: (N, H, W, Cin) float.
      w: (kh, kw, Cin, Cout) float, the dtype of x.
      padding: 'VALID' or ((top, bottom), (left, right)) zero padding, a
        hashable tuple of int pairs.
      precision: a `lax.Precision` or None, for every product.
      grad: "taps", "im2col" or "winograd".

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


def _winograd_here(x: jax.Array, w: jax.Array, padding: Any, grad: str) -> bool:
    """Whether this call of the "winograd" form qualifies (`winograd.pays`)."""
    if grad != "winograd":
        return False
    (t, b), (l, r) = _explicit_padding(padding)
    out_hw = (x.shape[1] + t + b - w.shape[0] + 1, x.shape[2] + l + r - w.shape[1] + 1)
    return winograd.pays(out_hw, w.shape[2], w.shape[3], w.shape[:2], x.dtype)


def _conv2d_fwd(x, w, padding, precision, grad):
    if _winograd_here(x, w, padding, grad):
        y = lax.platform_dependent(
            _pad(x, padding), w, cpu=functools.partial(winograd.conv3x3, precision=precision),
            default=lambda xp, k: _conv(xp, k, "VALID", precision))
        return y, (x, w)
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


def _taps_grads(xp, w, g, precision):
    """(dxp, dw) float32 of the "taps" form: the kernel gradient by taps (or
    rows), the input gradient as a forward convolution."""
    kh, kw = w.shape[:2]
    dw = _dw_taps(xp, g, kh, kw, precision)
    # Fewer rows than output channels (fc7): as col2im, which reads the
    # kernel as stored; the flipped, transposed kernel of the convolution
    # form is a copy of the whole 64 MB fc7 kernel a network.
    dxp = (_dx_col2im(g, w, xp.shape[1:3], precision) if _few_rows(g)
           else _dx_conv(g, w, precision))
    return dxp, dw


def _conv2d_bwd(padding, precision, grad, res, g):
    xres, w = res  # x ("taps", "winograd") or its im2col matrix ("im2col")
    (t, b), (l, r) = _explicit_padding(padding)
    kh, kw = w.shape[:2]
    padded_hw = (g.shape[1] + kh - 1, g.shape[2] + kw - 1)  # stride 1, VALID on padded x
    if grad == "im2col":
        dw = _dw_im2col(xres, g, precision).reshape(w.shape)
        dxp = _dx_col2im(g, w, padded_hw, precision)
    elif _winograd_here(xres, w, padding, grad):
        dxp, dw = lax.platform_dependent(
            _pad(xres, padding), w, g,
            cpu=functools.partial(winograd.conv3x3_grads, precision=precision),
            default=functools.partial(_taps_grads, precision=precision))
    else:
        dxp, dw = _taps_grads(_pad(xres, padding), w, g, precision)
    # The padded border's gradient belongs to the zeros, not to x.
    dx = dxp[:, t:padded_hw[0] - b, l:padded_hw[1] - r]
    return dx.astype(w.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv2D(nn.Module):
    """NHWC stride-1 convolution with float32 params cast to the compute dtype at use.

    Params: `kernel` (kh, kw, in, out) HWIO float32 and `bias` (out,) float32.
    Input (N, H, W, in) is cast to `dtype`; output (N, H', W', out) in `dtype`.
    `grad`: "xla" (XLA's own convolution gradients) or a `conv2d` form,
    "taps", "im2col" or "winograd" (padding must then be 'VALID' or explicit).
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
