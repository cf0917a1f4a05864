"""Group normalisation restricted to a per-sample extent (not in the paper).

The reference FCN-8s has no normalisation: it starts from PASCAL weights.
Trained from scratch at CPU scale (1/16 width, minutes), the plain VGG body
fits even its own training slices badly (bench/RESULTS.md, session 11:
27-53 % coarse DSC on training volumes). `FCN8s(norm="group")` puts a
GroupNorm after every body convolution (conv1_1 ... fc7, before the ReLU),
the standard remedy for training a deep plain network from scratch with
small batches. Group statistics are per sample, so a batch of one and a
batch of many give the same result and inference needs no running state.
Measured (bench/RESULTS.md, session 13, one real-CT screen): the same
training loss after 3,000 steps as without it, at 1.4x the step time and
2x the compile time; no config uses it.

Padded inputs: the statistics are taken over the layer's extent for the
sample's real (h, w) content only (`fcn8s_extents`, the positions the lone
run on the unpadded image has), so `valid_hw` keeps its promise that
padding never changes a result. Without an extent the whole map is used,
which is exactly the lone run's map.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from stnjax.checks import InputError
from stnjax.models.layers import extent_mask

NORMS = ("none", "group")
#: Groups per layer: min(MAX_GROUPS, channels), so the 4-channel first block
#: of a 1/16-width network normalises each channel on its own.
MAX_GROUPS = 8
EPS = 1e-5


def num_groups(channels: int) -> int:
    """The group count `GroupNorm` uses for `channels` (>= 1): a divisor of
    channels, at most MAX_GROUPS."""
    g = min(MAX_GROUPS, channels)
    while channels % g:
        g -= 1
    return g


def masked_group_norm(x: jax.Array, groups: int, extent: jax.Array | None = None,
                      eps: float = EPS) -> jax.Array:
    """Normalises x per sample and channel group to zero mean, unit variance.

    Args:
      x: (N, H, W, C) float array; C divisible by `groups`.
      groups: number of channel groups (1 = LayerNorm over H, W, C; C =
        InstanceNorm).
      extent: optional int (N, 2), the rows and columns per sample whose
        values form the statistics (the rest is normalised with them too,
        and is the caller's to mask); an empty extent gives zeros. None:
        the whole map.
      eps: added to the variance.

    Returns:
      float32 (N, H, W, C), (x - mean) / sqrt(var + eps) per (sample, group).
    """
    n, h, w, c = x.shape
    if c % groups:
        raise InputError(f"masked_group_norm: {c} channels not divisible by {groups} groups")
    xg = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
    if extent is None:
        extent = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (n, 2))
    m = extent_mask(extent, h, w).astype(jnp.float32)[..., None]    # (N, H, W, 1, 1)
    count = jnp.sum(m, axis=(1, 2), keepdims=True) * (c // groups)
    mean = jnp.sum(xg * m, axis=(1, 2, 4), keepdims=True) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.square((xg - mean) * m), axis=(1, 2, 4),
                  keepdims=True) / jnp.maximum(count, 1.0)
    # An empty extent (h or w = 0, a padded batch slot): zeros, not x / sqrt(eps).
    return ((xg - mean) * jnp.where(count > 0, lax.rsqrt(var + eps), 0.0)).reshape(n, h, w, c)


class GroupNorm(nn.Module):
    """`masked_group_norm` with a learned per-channel scale (init 1) and
    shift (init 0); the output in x's dtype. Params: `scale`, `bias` (C,)."""

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        y = masked_group_norm(x, num_groups(c), extent) * scale + bias
        return y.astype(x.dtype)
