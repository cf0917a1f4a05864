"""Soft DSC loss, the RSTN joint loss and (sum, count) metrics.

Reference section 3.1: per sample,
`L(Y, P) = 1 - (2 sum(y p) + eps) / (sum(y) + sum(p) + eps)` with eps = 1e-6
in numerator and denominator, the sums running over all pixels and all
(slice) channels of the sample; the joint loss is
`lam * L(Y, P_coarse) + (1 - lam) * L(Y, P_fine)` with lam = 1/3, where the
fine probability is the full-size pasted map (0 outside the box).

Batches are padded to fixed shapes (DESIGN.md): they carry each sample's
real size `hw (B, 2)`, from which the step makes the `valid (B, H, W)` mask
of real pixels (`crop.extent_mask`) and `weight (B,)` is 0 on padded batch slots. Metrics are kept
as (sum, count) pairs so that padded batches and several devices average
exactly: add sums and counts (e.g. `lax.psum` under pmap), divide once.

Example under pmap (axis name "batch")::

    def step(params, batch):
        def objective(params):
            cp, fp = forward(params, batch)
            valid = extent_mask(batch["hw"], batch["label"].shape[1:3])
            return joint_loss(cp, fp, batch["label"], valid=valid,
                              weight=batch["weight"], axis_name="batch")
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        grads = jax.lax.psum(grads, "batch")       # gradient of the global mean
        metrics = psum_metrics(metrics, "batch")   # global sums and counts
        return grads, mean_metrics(metrics)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from stnjax.checks import InputError, check_array

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def soft_dice_loss(
    prob: jax.Array,
    label: jax.Array,
    *,
    valid: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Per-sample soft DSC loss.

    Args:
      prob: (B, H, W, C) probabilities in [0, 1] (any float dtype).
      label: (B, H, W, C) binary label (float, int or bool).
      valid: optional (B, H, W) bool/float; pixels with 0 do not count.
      eps: added to numerator and denominator (reference: 1e-6).

    Returns:
      (B,) float32 losses; sums are accumulated in float32 whatever the
      input dtype (bfloat16 sums of ~1e5 pixels would lose most digits).
    """
    check_array(prob, "prob", rank=4, dtype_kind="f")
    check_array(label, "label", rank=4, dtype_kind="fiub")
    if tuple(label.shape) != tuple(prob.shape):
        raise InputError(
            f"label: expected shape {tuple(prob.shape)} to match prob, got {tuple(label.shape)}")
    p = prob.astype(jnp.float32)
    y = label.astype(jnp.float32)
    if valid is not None:
        check_array(valid, "valid", rank=3, dtype_kind="fiub")
        if tuple(valid.shape) != tuple(prob.shape[:3]):
            raise InputError(
                f"valid: expected shape {tuple(prob.shape[:3])}, got {tuple(valid.shape)}")
        v = valid.astype(jnp.float32)[..., None]
        p, y = p * v, y * v
    axes = (1, 2, 3)
    inter = jnp.sum(y * p, axis=axes)
    denom = jnp.sum(y, axis=axes) + jnp.sum(p, axis=axes)
    return 1.0 - (2.0 * inter + eps) / (denom + eps)


def joint_loss(
    coarse_prob: jax.Array,
    fine_prob: jax.Array,
    label: jax.Array,
    *,
    valid: jax.Array | None = None,
    weight: jax.Array | None = None,
    lam: float = 1.0 / 3.0,
    eps: float = 1e-6,
    bce_weight: float = 0.0,
    fine_region: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """The RSTN joint loss `lam * L_coarse + (1 - lam) * L_fine`.

    With `bce_weight` > 0 (not the reference, which is 0) each term gets a
    mean binary cross-entropy: `L_coarse + bce_weight * BCE(coarse)` over
    valid pixels, `L_fine + bce_weight * BCE(fine)` over the pixels of the
    fine crop box (`fine_region`; outside it the fine map is 0 by design).
    Training from scratch, the Dice loss alone lets whole output channels die
    (saturate at p = 0, where its gradient vanishes); the per-pixel cross-
    entropy keeps every channel alive.

    Args:
      coarse_prob, fine_prob, label: (B, H, W, C); the fine probability is the
        full-size pasted map.
      valid: optional (B, H, W) pixel validity.
      weight: optional (B,) sample weights, 0 for padded batch slots
        (default all 1).
      lam: coarse weight (reference 1/3).
      bce_weight: weight of the cross-entropy terms (reference 0).
      fine_region: (B, H, W) bool, the fine crop boxes (needed with
        bce_weight > 0).
      axis_name: when the loss runs under pmap/shard_map with this axis, the
        local weighted sum is divided by the *global* weight sum (psum), so
        the psum of the per-device gradients is the gradient of the mean over
        all real samples of all devices.

    Returns:
      loss: float32 scalar, the weighted mean of the per-sample joint loss
        (0 when every weight is 0).
      metrics: {'loss_coarse', 'loss_fine', 'loss'} (and 'loss_bce' with
        bce_weight > 0) -> (sum, count) float32 scalars over this batch
        (weighted sums and the weight total); 'loss_coarse' and 'loss_fine'
        are the Dice terms, 0 for a sample whose label is empty.
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise InputError(f"lam: must be in [0, 1], got {lam}")
    lc = soft_dice_loss(coarse_prob, label, valid=valid, eps=eps)
    lf = soft_dice_loss(fine_prob, label, valid=valid, eps=eps)
    w = _sample_weights(weight, lc.shape[0])
    # A sample without organ pixels (data.negatives; never drawn by the
    # reference's slice rule) has no overlap to score: its Dice terms are 0
    # and it trains through the cross-entropy alone. The formula would give
    # 1 - eps / (sum p + eps), whose gradient eps / (sum p + eps)^2 grows
    # without bound as the cross-entropy drives sum p down, pushing every
    # logit of the shared network towards -inf (all maps empty).
    has = organ_present(label, valid)
    lc, lf = jnp.where(has, lc, 0.0), jnp.where(has, lf, 0.0)
    per = lam * lc + (1.0 - lam) * lf
    if bce_weight:
        if fine_region is None:
            raise InputError("fine_region: needed with bce_weight > 0")
        region = fine_region if valid is None else fine_region & valid.astype(bool)
        bce = (lam * pixel_bce(coarse_prob, label, valid=valid)
               + (1.0 - lam) * pixel_bce(fine_prob, label, valid=region))
        per = per + float(bce_weight) * bce
    count = jnp.sum(w)
    total = count if axis_name is None else lax.psum(count, axis_name)
    loss_sum = jnp.sum(w * per)
    loss = loss_sum / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    metrics = {
        "loss_coarse": (jnp.sum(w * lc), count),
        "loss_fine": (jnp.sum(w * lf), count),
        "loss": (loss_sum, count),
    }
    if bce_weight:
        metrics["loss_bce"] = (jnp.sum(w * bce), count)
    return loss, metrics


def _sample_weights(weight: jax.Array | None, b: int) -> jax.Array:
    """float32 (B,) sample weights (all 1 when None), out of the gradient:
    they are data, never a parameter."""
    if weight is None:
        return jnp.ones((b,), jnp.float32)
    check_array(weight, "weight", rank=1, dtype_kind="fiub")
    if weight.shape[0] != b:
        raise InputError(f"weight: expected shape ({b},), got {tuple(weight.shape)}")
    return lax.stop_gradient(weight.astype(jnp.float32))


def organ_present(label: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """bool (B,): whether a sample's label (B, H, W, C) has an organ pixel
    inside `valid` (B, H, W) (all pixels when None)."""
    y = label.astype(jnp.float32)
    if valid is not None:
        y = y * valid.astype(jnp.float32)[..., None]
    return jnp.sum(y, axis=(1, 2, 3)) > 0


def rounds_joint_loss(
    coarse_prob: jax.Array,
    fine_probs: Sequence[jax.Array],
    label: jax.Array,
    *,
    fine_regions: Sequence[jax.Array | None],
    **kwargs,
) -> tuple[jax.Array, Metrics]:
    """The joint loss of a step with R fine rounds (train.unroll_rounds):
    `lam * L_coarse + (1 - lam) * mean_r L_fine,r` (cross-entropy terms
    likewise), i.e. the mean over rounds of `joint_loss(coarse, fine_r)`,
    so the coarse : fine weighting is the reference's.

    Args:
      coarse_prob, label: (B, H, W, C); fine_probs: R maps (B, H, W, C);
      fine_regions: R boxes (B, H, W) bool (or None without bce_weight);
      kwargs: the other arguments of `joint_loss`.

    Returns:
      loss (float32 scalar) and the metrics of `joint_loss` averaged over
      the rounds, plus 'loss_fine_r<r>' (r = 1..R), each round's Dice term.
    """
    if not fine_probs or len(fine_probs) != len(fine_regions):
        raise InputError(f"fine_probs: expected R >= 1 maps with as many regions, got "
                         f"{len(fine_probs)} maps and {len(fine_regions)} regions")
    per = [joint_loss(coarse_prob, fp, label, fine_region=fr, **kwargs)
           for fp, fr in zip(fine_probs, fine_regions)]
    n = float(len(per))
    loss = sum(lo for lo, _ in per) / n
    metrics = {k: (sum(m[k][0] for _, m in per) / n, per[0][1][k][1]) for k in per[0][1]}
    for r, (_, m) in enumerate(per, start=1):
        metrics[f"loss_fine_r{r}"] = m["loss_fine"]
    return loss, metrics


def pixel_bce(prob: jax.Array, label: jax.Array, *, valid: jax.Array | None = None,
              clip: float = 1e-7) -> jax.Array:
    """Per-sample mean binary cross-entropy over valid pixels and channels.

    prob, label: (B, H, W, C); valid: optional (B, H, W). Probabilities are
    clipped to [clip, 1 - clip] (the network's logits are not at hand).
    Returns (B,) float32.
    """
    p = jnp.clip(prob.astype(jnp.float32), clip, 1.0 - clip)
    y = label.astype(jnp.float32)
    ce = -(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p))
    v = jnp.ones(prob.shape[:3], jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v, axis=(1, 2)) * prob.shape[-1], 1.0)
    return jnp.sum(ce * v[..., None], axis=(1, 2, 3)) / n


def merge_metrics(a: Mapping, b: Mapping) -> Metrics:
    """Adds two metric dicts of (sum, count) pairs key by key."""
    if set(a) != set(b):
        raise InputError(f"metrics: keys differ: {sorted(a)} vs {sorted(b)}")
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def psum_metrics(metrics: Mapping, axis_name: str) -> Metrics:
    """Sums (sum, count) pairs over a pmap/shard_map axis."""
    return {k: (lax.psum(s, axis_name), lax.psum(c, axis_name))
            for k, (s, c) in metrics.items()}


def mean_metrics(metrics: Mapping) -> dict[str, jax.Array]:
    """(sum, count) pairs -> means (NaN where the count is 0).

    Works on JAX or NumPy values; leading axes (e.g. per device, from a pmap
    that did not psum) are summed first.
    """
    out = {}
    for k, (s, c) in metrics.items():
        s = jnp.sum(jnp.asarray(s, jnp.float32))
        c = jnp.sum(jnp.asarray(c, jnp.float32))
        out[k] = jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), jnp.nan)
    return out
