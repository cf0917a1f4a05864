"""FCN-8s (VGG16 body) as in the RSTN reference, with frozen bilinear upsampling.

Two variants share one parameter tree (the layer names of the reference,
`conv1_1` ... `conv5_3`, `fc6`, `fc7`, `score_fr`, `score_pool4`,
`score_pool3`, each with `kernel` HWIO and `bias`):

* `"reference"` (reference section 2.1): conv1_1 padded by 100, 3x3 convs
  padded by 1, ceil-mode 2x2/2 max pooling, fc6 a 7x7 VALID conv, fc7 1x1,
  three 1x1 score heads, upscore2 (k4 s2), score_pool4 cropped at 5,
  upscore_pool4 (k4 s2), score_pool3 cropped at 9, upscore8 (k16 s8) and the
  final crop at 31. The output has exactly the input size for every
  H, W >= 1 (the offsets assume ceil-mode pooling, lesson 9).
* `"pad32"` (fast, not in the reference): the input is zero-padded at the
  bottom/right to a multiple of 32, every conv is 'SAME' (fc6 7x7 too), there
  is no 100-pixel border, and each transposed conv is cropped by (k - s) / 2
  per side, which puts every upsampled feature at the centre of the pixels it
  summarises (exact alignment, no crop offsets). The output is cropped back
  to H x W. Measured at full width, per image (XLA cost analysis of the
  lowered jit, which skips taps that fall on padding; in brackets a dense
  count of every tap, which is what the hardware executes):
  96x96: 55.9 vs 5.87 GFLOP, 9.5x (57.5 vs 7.8, 7.4x);
  512x512: 375.7 vs 208.9 GFLOP, 1.8x (379.3 vs 221.6, 1.7x).
  The saving comes from the 100-pixel border, which the reference convolves
  through the whole VGG body, so it shrinks as the image grows. Border
  behaviour differs from the reference, so pretrained PASCAL weights see a
  different context near the edges.

The three upsampling layers are per-channel bilinear transposed convolutions
with zero cross-channel weights (the Caffe behaviour, reference 2.2; not the
PyTorch port's random off-diagonal entries). Their kernels are NumPy
constants built at trace time, not parameters: they are never trained, get
no gradient and are not in the parameter tree (2,592 values per network in
the reference count, excluded here). At width 1 with 3 outputs the tree
holds exactly the reference's 134,275,145 trainable values.
`upsampling="stored"` (the official PyTorch models, whose upsampling
kernels carry PyTorch's random initialisation off the channel diagonal,
frozen) holds the three full (k, k, C, C) kernels as params instead
(2,592 values at 3 outputs), frozen: no gradient, no optimiser update.

Checked on an H200 against a PyTorch implementation of the reference
network (torch Conv2d pad 100, MaxPool2d ceil_mode, ConvTranspose2d with the
bilinear diagonal, crops 5 / 9 / 31) at full width, weights passed through
launch/convert_weights.py: relative error 3.7e-6 in float32 at HIGHEST
precision. Note that float32 convs at default precision use TF32 on
Hopper (3e-3 relative error); bfloat16 compute gives about 1.3e-2.

Dropout is element-wise (the Caffe layer; the PyTorch port uses channel
dropout, Dropout2d) after fc6 and fc7, active only with `train=True`.

Padded inputs (shape buckets, crop canvases, volume buckets): the reference
runs every slice or crop at its exact size. `FCN8s(...)(x, valid_hw=hw)`
gives that result on an input padded at the bottom/right: each layer is
zeroed beyond the extent it has for the (h, w) content alone
(`fcn8s_extents`), so the padded run sees exactly the zeros that the lone
run sees as conv padding; logits inside (h, w) equal the lone run's (1e-6
in float32, tests/test_fcn8s_valid.py) and are 0 beyond. Without it, deep
layers see relu(bias) responses of the padded area (up to ~40 % of the
logit scale at width 1/16 with random biases). Cost: one select per element
of every conv activation (as many element-wise ops as the ReLUs, ~4e-4 of
the FLOPs); on CPU at width 1/16 and 1/4 the time is within noise (+-6 %).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stnjax.checks import InputError, check_array, is_concrete
# Re-exported: the layer primitives were defined here before layers.py.
from stnjax.models.conv import Conv2D
from stnjax.models.layers import (StoredUpsampling, bilinear_kernel,  # noqa: F401
                                  extent_mask, max_pool_ceil, max_pool_ceil_window,
                                  upsample_bilinear)
from stnjax.models.norm import NORMS, GroupNorm

VARIANTS = ("reference", "pad32")
FCN_CONV_GRADS = ("custom", "taps", "xla")
# The layers whose gradients (and training forward) go through the im2col
# matrix (`conv.conv2d`): conv1_1, whose 3 input channels make that matrix
# 27 columns wide (its kernel gradient as 9 per-tap products with 3 columns
# each took 148 ms instead of 50 at 256 x 256, full width, 2 CPU cores), and
# fc6, a 7 x 7 kernel on a map hardly larger than it. The other 3 x 3 layers:
# "winograd" (on CPU where `winograd.pays`, else "taps"); 1 x 1: "taps".
IM2COL_LAYERS = ("conv1_1", "fc6")
INIT_SCHEMES = ("he", "reference")
# "bilinear": Caffe's per-channel bilinear constants; "stored": per-layer
# channel kernels held in the params (frozen), as the official PyTorch models.
UPSAMPLINGS = ("bilinear", "stored")
# The three transposed convolutions: (kernel size, stride), in the order they run.
UPSAMPLING_LAYERS = {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)}
DTYPES = (jnp.float32, jnp.bfloat16)

# VGG16 convolution blocks: (number of 3x3 convs, output channels).
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
FC_CHANNELS = 4096
BODY_LAYERS = tuple(f"conv{b + 1}_{j + 1}" for b, (n, _) in enumerate(VGG16_BLOCKS)
                    for j in range(n)) + ("fc6", "fc7")
HEAD_LAYERS = ("score_fr", "score_pool4", "score_pool3")

def conv_form(name: str, kernel_size: int, conv_grad: str) -> str:
    """The `conv.conv2d` form ("xla", "taps", "im2col" or "winograd") that
    layer `name` with a kernel_size x kernel_size kernel uses under
    `FCN8s.conv_grad` ("custom", "taps" or "xla"); see IM2COL_LAYERS."""
    if conv_grad == "xla":
        return "xla"
    if name in IM2COL_LAYERS:
        return "im2col"
    return "winograd" if conv_grad == "custom" and kernel_size == 3 else "taps"


def scaled_width(channels: int, width: float) -> int:
    """Channel count of a layer under the width multiplier: max(1, round(c * width))."""
    return max(1, int(round(channels * width)))


def fcn8s_layer_shapes(width: float = 1.0, num_outputs: int = 3,
                       in_channels: int = 3) -> dict[str, tuple[tuple[int, ...], tuple[int]]]:
    """Kernel (HWIO) and bias shapes of every FCN8s parameter, in layer order.

    Args:
      width: channel multiplier (1.0 = the reference VGG16 / FCN-8s).
      num_outputs: channels of the score heads.
      in_channels: channels of the input image.

    Returns:
      {layer name: ((kh, kw, in, out), (out,))} for the 15 body layers and the
      3 heads; the same for both variants.
    """
    shapes: dict[str, tuple[tuple[int, ...], tuple[int]]] = {}
    cin = in_channels
    pool_channels = []
    for b, (n, c) in enumerate(VGG16_BLOCKS):
        cout = scaled_width(c, width)
        for j in range(n):
            shapes[f"conv{b + 1}_{j + 1}"] = ((3, 3, cin, cout), (cout,))
            cin = cout
        pool_channels.append(cout)
    fc = scaled_width(FC_CHANNELS, width)
    shapes["fc6"] = ((7, 7, cin, fc), (fc,))
    shapes["fc7"] = ((1, 1, fc, fc), (fc,))
    shapes["score_fr"] = ((1, 1, fc, num_outputs), (num_outputs,))
    shapes["score_pool4"] = ((1, 1, pool_channels[3], num_outputs), (num_outputs,))
    shapes["score_pool3"] = ((1, 1, pool_channels[2], num_outputs), (num_outputs,))
    return shapes


def upsampling_shapes(num_outputs: int = 3) -> dict[str, tuple[int, int, int, int]]:
    """Kernel shapes (k, k, C, C) of the three upsampling layers, held as params
    with `FCN8s.upsampling="stored"` only (the PyTorch port's names)."""
    return {name: (k, k, num_outputs, num_outputs) for name, (k, _) in UPSAMPLING_LAYERS.items()}


def fcn8s_extents(hw: Any, variant: str) -> dict[str, Any]:
    """Per-stage spatial extents of FCN8s run alone on an (h, w) image.

    The same size arithmetic as the layers, on integers: "reference": conv1_1
    (pad 100) gives n + 198, 3x3 pad-1 convs keep n, ceil pooling gives
    ceil(n / 2), fc6 (7x7 VALID) n - 6, each k4 s2 upsampling (n - 1) * 2 + 4
    (the crops 5 / 9 take from the skip maps, not the fused map). "pad32":
    the run pads n to P = ceil(n / 32) * 32, so block b has P / 2^(b-1)
    before its pool, fc6 ... score_fr P / 32, fuse4 P / 16, fuse3 P / 8.
    Works on Python ints, NumPy and JAX integer arrays (tracers too).

    Args:
      hw: integer array (..., 2): (h, w) per sample, each >= 0 (0 gives an
        empty output extent).
      variant: "reference" or "pad32".

    Returns:
      {stage: array like hw}: "input", "conv1" ... "conv5" (every conv of the
      block, before its pool), "pool1" ... "pool5", "fc6" (also fc7 and
      score_fr), "fuse4" (the map fed to the second upsampling), "fuse3" (fed
      to the x8 upsampling) and "output" (= hw).
    """
    if variant not in VARIANTS:
        raise InputError(f"fcn8s_extents: variant must be one of {VARIANTS}, got {variant!r}")
    ext = {"input": hw}
    if variant == "reference":
        m = hw + 198
        for b in range(1, 6):
            ext[f"conv{b}"] = m
            m = -(-m // 2)  # ceil mode
            ext[f"pool{b}"] = m
        f = m - 6
        ext["fc6"] = f
        ext["fuse4"] = (f - 1) * 2 + 4
        ext["fuse3"] = (ext["fuse4"] - 1) * 2 + 4
    else:
        p = -(-hw // 32) * 32
        for b in range(1, 6):
            ext[f"conv{b}"] = p // 2 ** (b - 1)
            ext[f"pool{b}"] = p // 2 ** b
        ext["fc6"], ext["fuse4"], ext["fuse3"] = p // 32, p // 16, p // 8
    ext["output"] = hw
    return ext


def mask_to_extent(x: jax.Array, extent: jax.Array) -> jax.Array:
    """Zeros every position of x at row >= extent[:, 0] or column >= extent[:, 1].

    One select against an (N, H, W, 1) mask built from two iota comparisons
    (fused by XLA into the producer); a select rather than a multiply, so
    that non-finite values beyond the extent cannot leak in as NaN.

    Args:
      x: (N, H, W, C) array, any float dtype.
      extent: int (N, 2), rows and columns kept per sample.

    Returns:
      x with zeros beyond the extent, same shape and dtype.
    """
    return jnp.where(extent_mask(extent, x.shape[1], x.shape[2]), x, jnp.zeros((), x.dtype))


def _check_valid_hw(valid_hw: Any, n: int, height: int, width: int) -> jax.Array:
    """Checks valid_hw against x's shape; returns it as int32 clipped to (H, W)."""
    check_array(valid_hw, "FCN8s valid_hw", rank=2, dtype_kind="iu")
    if tuple(valid_hw.shape) != (n, 2):
        raise InputError(
            f"FCN8s valid_hw: expected shape ({n}, 2), got {tuple(valid_hw.shape)}")
    if is_concrete(valid_hw):
        v = np.asarray(valid_hw)
        if (v < 0).any() or (v[:, 0] > height).any() or (v[:, 1] > width).any():
            raise InputError(
                f"FCN8s valid_hw: each (h, w) must lie in [0, {height}] x [0, {width}] "
                f"(the input's H, W), got {v.tolist()}")
    return jnp.clip(jnp.asarray(valid_hw).astype(jnp.int32), 0,
                    jnp.array([height, width], jnp.int32))


class FCN8s(nn.Module):
    """FCN-8s on NHWC images, logits of the input size.

    Attributes:
      num_outputs: channels of the output (3: one logit map per input slice).
      width: channel multiplier for CPU-scale configs; each VGG / fc width c
        becomes max(1, round(c * width)); 1.0 is the reference network.
      variant: "reference" (pad 100, ceil pooling, crops 5 / 9 / 31) or
        "pad32" (pad to a multiple of 32, 'SAME' convs, ~9x cheaper).
      dropout_rate: element-wise dropout after fc6 and fc7 (training only).
      dtype: compute dtype, jnp.float32 or jnp.bfloat16; activations stay in
        it, params are float32 and cast at use, the score heads' outputs and
        the upsampling run in float32, and the logits are float32.
      init_scheme: "he": He-normal kernels (heads too), zero biases, a
        from-scratch init that trains. "reference": every kernel and bias
        zero, as PyTorch RSTN's `_initialize_weights`; only meant to be
        followed by `stnjax.models.weights.assign_pretrained` (the body of an
        all-zero network gets no gradient). (Named `init_scheme` because
        `init` is the Flax method.)
      in_channels: if set, the required channel count of the input.
      conv_grad: "custom" (the default: every convolution's gradient written
        out by `conv.conv2d`, "im2col" for `IM2COL_LAYERS`, "winograd" for
        the other 3 x 3 layers, "taps" for the 1 x 1), "taps" (the same
        without Winograd: the form before it, kept to measure
        against) or "xla" (XLA's own convolution gradients). Inference is
        identical; under differentiation the im2col and Winograd layers'
        forward and all gradients equal XLA's to float32 rounding; "custom"
        exists because XLA:CPU runs its own convolution gradients 10-100x
        slower inside a `lax.switch` branch, where the fine network trains,
        and Winograd because its direct 3 x 3 kernels were the rest of the
        gap to PyTorch (conv.py).
      upsampling: "bilinear" (the default, Caffe: per-channel bilinear
        constants, not parameters) or "stored" (the official PyTorch models:
        each upsampling layer's full (k, k, C, C) channel kernel is a param,
        `upscore2`, `upscore_pool4`, `upscore8` / `kernel`, initialised to
        the bilinear diagonal, given no gradient and never updated by the
        optimiser). Same sizes, crops and `valid_hw` rule either way.
      norm: "none" (the reference: no normalisation) or "group" (not in the
        paper: `norm.GroupNorm` after every body convolution, conv1_1 ...
        fc7, before its ReLU, with statistics over the layer's `valid_hw`
        extent; params `<layer>_norm/scale`, `<layer>_norm/bias`). For
        training from scratch; pretrained weights have no norm params.
    """
    num_outputs: int = 3
    width: float = 1.0
    variant: str = "reference"
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    init_scheme: str = "he"
    in_channels: int | None = None
    conv_grad: str = "custom"
    upsampling: str = "bilinear"
    norm: str = "none"

    def _check_config(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"FCN8s.variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise InputError(
                f"FCN8s.init_scheme: expected one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if not self.width > 0:
            raise InputError(f"FCN8s.width: expected > 0, got {self.width}")
        if self.num_outputs < 1:
            raise InputError(f"FCN8s.num_outputs: expected >= 1, got {self.num_outputs}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise InputError(f"FCN8s.dropout_rate: expected in [0, 1), got {self.dropout_rate}")
        if self.conv_grad not in FCN_CONV_GRADS:
            raise InputError(
                f"FCN8s.conv_grad: expected one of {FCN_CONV_GRADS}, got {self.conv_grad!r}")
        if self.upsampling not in UPSAMPLINGS:
            raise InputError(
                f"FCN8s.upsampling: expected one of {UPSAMPLINGS}, got {self.upsampling!r}")
        if self.norm not in NORMS:
            raise InputError(f"FCN8s.norm: expected one of {NORMS}, got {self.norm!r}")
        if jnp.dtype(self.dtype) not in [jnp.dtype(d) for d in DTYPES]:
            raise InputError(f"FCN8s.dtype: expected float32 or bfloat16, got {self.dtype}")

    def _dropout(self, h: jax.Array, train: bool) -> jax.Array:
        if not train or self.dropout_rate == 0.0:
            return h
        return nn.Dropout(self.dropout_rate, deterministic=False)(h)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 valid_hw: jax.Array | None = None) -> jax.Array:
        """Logits of the input size.

        Args:
          x: (N, H, W, C) floating images, H, W >= 1.
          train: enables dropout; then `apply` needs rngs={'dropout': key}.
          valid_hw: optional int (N, 2), the real (h, w) of each sample's
            content at the top-left of x, 0 <= h <= H, 0 <= w <= W (checked
            when concrete, clipped when traced). Every layer is then masked
            to the extent it has for that (h, w) input alone
            (`fcn8s_extents`), so out[i, :h, :w] equals the network on
            x[i:i + 1, :h, :w] exactly (float rounding; with train=True only
            in distribution, the dropout draws differ) whatever x holds
            beyond; out is 0 beyond (h, w), and nothing beyond gets or
            gives gradient. None: no masking (the padded content is
            seen as image).

        Returns:
          (N, H, W, num_outputs) float32 logits.
        """
        self._check_config()
        check_array(x, "FCN8s input x", rank=4, dtype_kind="f", channels=self.in_channels)
        n, height, width, _ = x.shape
        if min(n, height, width) < 1:
            raise InputError(f"FCN8s input x: empty batch or image, shape {tuple(x.shape)}")
        if train and self.dropout_rate > 0 and not self.has_rng("dropout"):
            raise InputError("FCN8s: train=True needs apply(..., rngs={'dropout': key})")
        ref = self.variant == "reference"
        shapes = fcn8s_layer_shapes(self.width, self.num_outputs, x.shape[-1])
        zero = nn.initializers.zeros_init()
        kinit = nn.initializers.he_normal() if self.init_scheme == "he" else zero
        ext = None
        if valid_hw is not None:
            ext = fcn8s_extents(_check_valid_hw(valid_hw, n, height, width), self.variant)

        def keep(h: jax.Array, stage: str) -> jax.Array:
            """h zeroed beyond the stage's extent of the lone (h, w) run."""
            return h if ext is None else mask_to_extent(h, ext[stage])

        def conv(name: str, h: jax.Array, padding: Any) -> jax.Array:
            kshape = shapes[name][0]
            h = Conv2D(kshape[-1], kshape[0], padding, self.dtype, kinit, zero,
                       grad=conv_form(name, kshape[0], self.conv_grad), name=name)(h)
            if self.norm == "none" or name not in BODY_LAYERS:
                return h
            # Statistics over the lone run's positions only (norm.py).
            stage = "fc6" if name.startswith("fc") else name.split("_")[0]
            return GroupNorm(name=f"{name}_norm")(h, None if ext is None else ext[stage])

        h, pool3, pool4 = _vgg_body(x.astype(self.dtype), conv, keep, ref)
        # fc6: a 7x7 conv on the small pool5 map; its gradients go through
        # im2col (`conv_grad`): XLA:CPU's own input gradient of it is 30-60x
        # its forward when the map is barely larger than the kernel.
        # Known issue (H200, bf16, batch 16, 512x512): in pad32 *inference* the
        # fc6 -> ReLU -> fc7 chain on the 16x16 map takes ~40 ms of a 46 ms
        # forward (the same convs alone: ~2.5 ms; with dropout between them, as
        # in training, the whole fwd+bwd takes 17 ms). Cause not established.
        h = nn.relu(conv("fc6", h, "VALID" if ref else ((3, 3), (3, 3))))
        h = self._dropout(h, train)
        h = nn.relu(conv("fc7", h, "VALID"))
        h = self._dropout(h, train)
        # With valid_hw, fc6 (its input pool5 is zero beyond its extent, as
        # the lone run's padding) is exact inside the "fc6" extent; fc7 and
        # score_fr are 1x1, so the relu(bias) values beyond it only reach
        # score_fr beyond it, which is masked: no mask on the 4096-wide maps.
        def up(name: str, h: jax.Array, crop: tuple[int, int, int, int]) -> jax.Array:
            k, s = UPSAMPLING_LAYERS[name]
            if self.upsampling == "stored":
                return StoredUpsampling(k, s, crop, name=name)(h)
            return upsample_bilinear(h, k, s, crop)

        return _heads(h, pool3, pool4, conv, up, keep, ref, (height, width))


def _vgg_body(x: jax.Array, conv: Callable, keep: Callable, ref: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The five VGG16 blocks of `FCN8s` (convs, ReLUs, ceil-mode pooling),
    masked stage by stage; returns (pool5, pool3, pool4)."""
    height, width = x.shape[1:3]
    # Masking the input makes the result independent of what the padded
    # area holds (the lone run sees zeros there: its conv padding).
    h = keep(x, "input")
    if not ref:  # zero-pad bottom/right to a multiple of 32
        h = jnp.pad(h, ((0, 0), (0, -height % 32), (0, -width % 32), (0, 0)))
    pools = []
    for b, (nconv, _) in enumerate(VGG16_BLOCKS):
        for j in range(nconv):
            pad = 100 if (ref and b == 0 and j == 0) else 1
            h = nn.relu(conv(f"conv{b + 1}_{j + 1}", h, ((pad, pad), (pad, pad))))
            # A masked zero is what the lone run's next conv reads as its
            # zero padding.
            h = keep(h, f"conv{b + 1}")
        # No mask after pooling: windows beyond the pooled extent hold
        # only masked zeros (and -inf padding), so they give 0 already;
        # the last window of an odd extent (ceil mode, reference) holds
        # valid values >= 0 (post-ReLU) and masked zeros, so its max is
        # the max of the valid part, which is what the lone run takes.
        h = max_pool_ceil(h)
        pools.append(h)
    return h, pools[2], pools[3]


def _heads(h: jax.Array, pool3: jax.Array, pool4: jax.Array, conv: Callable, up: Callable,
           keep: Callable, ref: bool, hw: tuple[int, int]) -> jax.Array:
    """The score heads of `FCN8s`: fc7's map and the pool3 / pool4 skips
    fused and upsampled (`up(layer name, map, crop)`) to the input size `hw`;
    (N, H, W, C) float32."""
    height, width = hw
    # Heads: 3-channel maps, fused and upsampled in float32 (cheap).
    # Masks on score_fr and the fused maps (values of either sign): a
    # transposed conv of a map that is zero beyond its extent equals the
    # lone run's on that run's whole output; the skip maps score_pool4 / 3
    # are not masked, they only enter through the masked sums.
    score_fr = keep(conv("score_fr", h, "VALID").astype(jnp.float32), "fc6")
    score_pool4 = conv("score_pool4", pool4, "VALID").astype(jnp.float32)
    score_pool3 = conv("score_pool3", pool3, "VALID").astype(jnp.float32)
    if ref:
        up2 = up("upscore2", score_fr, (0, 0, 0, 0))
        fuse4 = keep(up2 + score_pool4[:, 5:5 + up2.shape[1], 5:5 + up2.shape[2]], "fuse4")
        up4 = up("upscore_pool4", fuse4, (0, 0, 0, 0))
        fuse3 = keep(up4 + score_pool3[:, 9:9 + up4.shape[1], 9:9 + up4.shape[2]], "fuse3")
        full = (fuse3.shape[1] - 1) * 8 + 16, (fuse3.shape[2] - 1) * 8 + 16
        out = up("upscore8", fuse3, (31, full[0] - 31 - height, 31, full[1] - 31 - width))
    else:
        fuse4 = keep(up("upscore2", score_fr, (1, 1, 1, 1)) + score_pool4, "fuse4")
        fuse3 = keep(up("upscore_pool4", fuse4, (1, 1, 1, 1)) + score_pool3, "fuse3")
        # Aligned crop of 4 per side, plus the bottom/right padding.
        pad_h, pad_w = -height % 32, -width % 32
        out = up("upscore8", fuse3, (4, 4 + pad_h, 4, 4 + pad_w))
    # The lone run's output ends at (h, w); beyond it the padded run would
    # give the upsampling's tail: zeroed, so it has no gradient either.
    return keep(out, "output")
