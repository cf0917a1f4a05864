"""The saliency transformation g of the RSTN (reference section 2.3).

g maps the coarse probabilities (after the sigmoid) to per-pixel,
per-channel weights of the same size; the fine stage sees
`image * g(coarse_prob)`, computed on the full slice before cropping.

Variants (paper Table 1): one conv with kernel 1, 3, 5 or 7, or two convs
with a ReLU between them; the reference default (and the paper's best) is
3x3 -> ReLU -> 5x5, 3 -> 3 -> 3 channels, 312 parameters. Every conv is
size-preserving ('SAME' zero padding, stride 1) with a bias; there is no
output activation, so weights may be negative or larger than 1.

Initialisation is the PyTorch port's: every layer but the last has
Xavier-normal weights (untruncated normal, std sqrt(2 / (fan_in + fan_out)),
fans counted over the receptive field as PyTorch does) and bias 1; the last
layer has zero weights and bias `last_bias` per channel, so at the start
g(p) = (1.0, 1.5, 2.0) per channel for any p and the fine input is the image
scaled by 1, 1.5 and 2. Parameters and compute are float32 at HIGHEST
precision (the module is tiny; TF32 would only add error).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stnjax.checks import InputError, check_array
from stnjax.models.crop import extent_mask
from stnjax.models.conv import Conv2D

ALLOWED_KERNELS = (1, 3, 5, 7)

# PyTorch's nn.init.xavier_normal_: plain normal, fan_avg over the receptive field.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def check_kernel_sizes(kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    """Validates a saliency layer spec: 1 or 2 layers, each kernel in {1, 3, 5, 7}.

    Returns the kernel sizes as a tuple of ints; raises InputError otherwise.
    """
    ks = tuple(kernel_sizes)
    if len(ks) not in (1, 2):
        raise InputError(
            f"Saliency.kernel_sizes: expected one or two layers, got {ks!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k not in ALLOWED_KERNELS:
            raise InputError(
                f"Saliency.kernel_sizes: each kernel must be an odd size in "
                f"{ALLOWED_KERNELS} (size-preserving 'SAME' conv), got {ks!r}")
    return tuple(int(k) for k in ks)


def _constant_bias(values: Sequence[float]):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.asarray(values, dtype), shape)
    return init


class Saliency(nn.Module):
    """Saliency transformation g: (N, H, W, C) probabilities -> (N, H, W, C) weights.

    Attributes:
      kernel_sizes: (k,) for one layer or (k1, k2) for k1 x k1 conv, ReLU,
        k2 x k2 conv; kernels in {1, 3, 5, 7}. Default (3, 5), the reference.
      channels: C, input and output channels (3 slices).
      last_bias: initial bias of the last layer, one value per channel.

    Params: 'saliency1' (and 'saliency2'), each {'kernel' (k, k, C, C),
    'bias' (C,)} float32 (the PyTorch port's layer names).
    """
    kernel_sizes: tuple[int, ...] = (3, 5)
    channels: int = 3
    last_bias: tuple[float, ...] = (1.0, 1.5, 2.0)

    @nn.compact
    def __call__(self, prob: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """Weights for the image.

        Args:
          prob: (N, H, W, channels) float coarse probabilities.
          valid_hw: optional int32 (N, 2) real size of each sample's content
            at the top-left of a padded bucket. The input and every layer's
            output are zeroed beyond it, so the weights inside equal those of
            the unpadded slice (whose 'SAME' convs see zeros there); without
            it the bias and ReLU of the first layer would make the padding
            nonzero, and a trained last layer would carry that into the last
            rows and columns of the real image.

        Returns:
          (N, H, W, channels) float32 weights (no output activation; 0
          beyond valid_hw when given).
        """
        ks = check_kernel_sizes(self.kernel_sizes)
        if self.channels < 1:
            raise InputError(f"Saliency.channels: expected >= 1, got {self.channels}")
        if len(self.last_bias) != self.channels:
            raise InputError(
                f"Saliency.last_bias: expected {self.channels} values (one per "
                f"channel), got {tuple(self.last_bias)!r}")
        check_array(prob, "Saliency input prob", rank=4, channels=self.channels,
                    dtype_kind="f")
        keep = None
        if valid_hw is not None:
            check_array(valid_hw, "Saliency valid_hw", rank=2, dtype_kind="iu")
            if tuple(valid_hw.shape) != (prob.shape[0], 2):
                raise InputError(f"Saliency valid_hw: expected shape {(prob.shape[0], 2)}, "
                                 f"got {tuple(valid_hw.shape)}")
            keep = extent_mask(valid_hw, prob.shape[1:3])[..., None]
        h = prob.astype(jnp.float32)
        if keep is not None:
            h = jnp.where(keep, h, 0.0)
        for i, k in enumerate(ks):
            last = i == len(ks) - 1
            h = Conv2D(self.channels, k, "SAME", jnp.float32,
                       nn.initializers.zeros_init() if last else xavier_normal,
                       _constant_bias(self.last_bias) if last else nn.initializers.ones_init(),
                       precision=lax.Precision.HIGHEST, name=f"saliency{i + 1}")(h)
            if not last:
                h = nn.relu(h)
            if keep is not None:
                h = jnp.where(keep, h, 0.0)
        return h


def apply_saliency(weights: jax.Array, image: jax.Array) -> jax.Array:
    """The fine-stage input before cropping: image * weights, channel by channel.

    Args:
      weights: (N, H, W, C) float output of `Saliency`.
      image: (N, H, W, C) float image.

    Returns:
      (N, H, W, C) float32 product.
    """
    check_array(weights, "apply_saliency: weights", rank=4, dtype_kind="f")
    check_array(image, "apply_saliency: image", rank=4, dtype_kind="f")
    if tuple(weights.shape) != tuple(image.shape):
        raise InputError(
            f"apply_saliency: weights shape {tuple(weights.shape)} differs from "
            f"image shape {tuple(image.shape)}")
    return image.astype(jnp.float32) * weights.astype(jnp.float32)
