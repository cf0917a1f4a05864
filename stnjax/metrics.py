"""Segmentation metrics and the largest-component filter.

Host side (NumPy/SciPy, spacing-aware, for evaluation): `dsc`, `jaccard`,
`hd95`, `surface_dice`, `inter_iteration_dsc`, `largest_components`.
Device side (JAX, jit-able, static shapes, for the coarse-to-fine
`while_loop`): `dsc_jax`, `connected_components_jax`,
`largest_components_jax`; they agree with the NumPy versions.

Empty-mask conventions (documented, never NaN):

| metric | both empty | one empty |
| --- | --- | --- |
| `dsc`, `jaccard` | `empty` (default 0.0, the reference's per-case rule, section 4.6) | 0.0 |
| `inter_iteration_dsc` | 1.0 (reference section 4.3) | 0.0 |
| `hd95` | 0.0 | the volume diagonal in mm (worst case: a failure) |
| `surface_dice` | 1.0 | 0.0 |

Surfaces are the mask voxels with at least one of their 6 face neighbours
outside the mask (the volume border counts as outside). Surface distances
are between voxel centres in mm (`distance_transform_edt` with
`sampling=spacing`); surface Dice counts surface voxels (not surfel areas).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import ndimage

from stnjax.checks import InputError, check_array

# 6-connectivity (face neighbours), reference section 4.5.
_STRUCT6 = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

def _binary_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"pred: shape {pred.shape} differs from gt shape {gt.shape}")
    return pred.astype(bool), gt.astype(bool)


def dsc(pred, gt, *, empty: float = 0.0) -> float:
    """DSC = 2|A n B| / (|A| + |B|) of two binary arrays (any shape).

    Both empty -> `empty` (0.0: the reference's per-case convention).
    """
    a, b = _binary_pair(pred, gt)
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return float(empty)
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def jaccard(pred, gt, *, empty: float = 0.0) -> float:
    """Jaccard = |A n B| / |A u B|; both empty -> `empty`."""
    a, b = _binary_pair(pred, gt)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return float(empty)
    return int(np.logical_and(a, b).sum()) / union


def inter_iteration_dsc(prev, cur) -> float:
    """DSC between consecutive rounds' masks; both empty -> 1.0 (converged)."""
    return dsc(prev, cur, empty=1.0)


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    sp = np.asarray(spacing, np.float64).reshape(-1)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing: expected {ndim} positive finite mm values, got {spacing!r}")
    return sp


def _surface(mask: np.ndarray) -> np.ndarray:
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, border_value=0)


def _surface_distances(a: np.ndarray, b: np.ndarray, sp: np.ndarray):
    """Distances (mm) from each surface voxel of a to b's surface and back."""
    # Work on the bounding box of a | b plus one voxel (clamped to the
    # volume): every surface voxel of both lies inside, so the distances are
    # exact, and voxels at the volume border stay at a border (outside).
    idx = np.nonzero(a | b)
    sl = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    a, b = a[sl], b[sl]
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return to_b[sa], to_a[sb]


def _diagonal_mm(shape: tuple[int, ...], sp: np.ndarray) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape) * sp) ** 2)))


def hd95(pred, gt, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances, in mm.

    The distances of pred's surface voxels to gt's surface and of gt's to
    pred's are pooled and the 95th percentile (linear interpolation) taken.
    Both empty -> 0.0; one empty -> the volume diagonal `sqrt(sum((n_i *
    spacing_i)^2))` (worst case, counted as a failure, never NaN).
    """
    a, b = _binary_pair(pred, gt)
    sp = _spacing(spacing, a.ndim)
    na, nb = a.any(), b.any()
    if not na and not nb:
        return 0.0
    if not (na and nb):
        return _diagonal_mm(a.shape, sp)
    d_ab, d_ba = _surface_distances(a, b, sp)
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def surface_dice(pred, gt, spacing: Sequence[float], tolerance_mm: float = 1.0) -> float:
    """Surface Dice at a tolerance: the fraction of both surfaces' voxels
    within `tolerance_mm` of the other surface. Both empty -> 1.0; one
    empty -> 0.0."""
    a, b = _binary_pair(pred, gt)
    sp = _spacing(spacing, a.ndim)
    if tolerance_mm < 0:
        raise InputError(f"tolerance_mm: must be >= 0, got {tolerance_mm}")
    na, nb = a.any(), b.any()
    if not na and not nb:
        return 1.0
    if not (na and nb):
        return 0.0
    d_ab, d_ba = _surface_distances(a, b, sp)
    hits = int(np.sum(d_ab <= tolerance_mm)) + int(np.sum(d_ba <= tolerance_mm))
    return hits / (d_ab.size + d_ba.size)


def largest_components(mask, threshold: float = 0.5, n_valid: int | None = None) -> np.ndarray:
    """The reference's post-processing (section 4.5), NumPy/SciPy.

    Args:
      mask: (X, Y, Z) binary volume.
      threshold: keep every 6-connected component whose size is >=
        threshold x the largest component's size (compared in float32, as
        `largest_components_jax`).
      n_valid: the number of real voxels when the volume is padded (default:
        all of them).

    Returns:
      (X, Y, Z) bool; the mask unchanged if it is empty or covers at least
      half of the (valid) volume.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 3:
        raise InputError(f"mask: expected rank 3, got shape {m.shape}")
    n = m.size if n_valid is None else int(n_valid)
    count = int(m.sum())
    if count == 0 or 2 * count >= n:
        return m.copy()
    labels, _ = ndimage.label(m, structure=_STRUCT6)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    cutoff = np.float32(threshold) * np.float32(sizes.max())
    keep = sizes.astype(np.float32) >= cutoff
    keep[0] = False
    return keep[labels]


# --------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------

def dsc_jax(a: jax.Array, b: jax.Array, *, empty: float = 0.0) -> jax.Array:
    """DSC of two binary arrays as a float32 scalar (jit-able).

    Counts are int32 (exact for volumes below 2**31 voxels); both empty ->
    `empty`. Equal to `dsc` up to float32 rounding of the final division.
    """
    check_array(a, "a")
    check_array(b, "b")
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(f"a: shape {tuple(a.shape)} differs from b shape {tuple(b.shape)}")
    a, b = a.astype(bool), b.astype(bool)
    inter = jnp.sum(a & b, dtype=jnp.int32)
    tot = jnp.sum(a, dtype=jnp.int32) + jnp.sum(b, dtype=jnp.int32)
    val = 2.0 * inter.astype(jnp.float32) / jnp.maximum(tot, 1).astype(jnp.float32)
    return jnp.where(tot == 0, jnp.float32(empty), val)


def _neighbour_min(lab: jax.Array, sentinel: int) -> jax.Array:
    """Elementwise min of a label volume and its 6 face-neighbour shifts."""
    out = lab
    for axis in range(lab.ndim):
        pad = [(0, 0)] * lab.ndim
        pad[axis] = (1, 1)
        p = jnp.pad(lab, pad, constant_values=sentinel)
        size = lab.shape[axis]
        out = jnp.minimum(out, lax.slice_in_dim(p, 0, size, axis=axis))
        out = jnp.minimum(out, lax.slice_in_dim(p, 2, size + 2, axis=axis))
    return out


def connected_components_jax(
    mask: jax.Array, *, jumps: int = 2, max_iters: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """6-connected components of a binary volume on device.

    Every voxel starts with its flat index as label (background: the
    sentinel N = mask.size). Each iteration of a `lax.while_loop`:
      1. m = min label over the voxel and its 6 foreground neighbours;
      2. hook: label[label[v]] = min(label[label[v]], m[v]) (scatter-min),
         which merges whole trees, and label[v] = min(label[v], m[v]);
      3. pointer jumping `label = label[label]`, `jumps` times.
    A label always names a voxel of the same component and only decreases,
    so at the fixed point (checked: no label changed) each component holds
    one label. Hooking plus jumping converges in a number of iterations far
    below a component's path length (logarithmic-like in practice).

    Args:
      mask: (X, Y, Z) bool (any rank works).
      jumps: pointer-jumping steps per iteration.
      max_iters: optional safety bound (default: mask.size, never reached).

    Returns:
      labels: int32 of mask's shape, constant on each component, the
        sentinel mask.size on background.
      n_iter: int32 scalar, iterations run.
    """
    check_array(mask, "mask")
    shape = mask.shape
    n = int(np.prod(shape))
    if n >= np.iinfo(np.int32).max:
        raise InputError(f"mask: {n} voxels do not fit int32 labels")
    fg = mask.astype(bool).reshape(-1)
    init = jnp.where(fg, jnp.arange(n, dtype=jnp.int32), jnp.int32(n))
    limit = n if max_iters is None else int(max_iters)

    def body(state):
        lab, _, it = state
        m = _neighbour_min(lab.reshape(shape), n).reshape(-1)
        m = jnp.where(fg, m, n)
        new = lab.at[lab].min(m, mode="drop")   # background (index n) dropped
        new = jnp.minimum(new, m)
        for _ in range(jumps):
            new = jnp.take(new, new, mode="fill", fill_value=n)
        return new, jnp.any(new != lab), it + 1

    def cond(state):
        return state[1] & (state[2] < limit)

    lab, _, it = lax.while_loop(cond, body, (init, jnp.bool_(True), jnp.int32(0)))
    return lab.reshape(shape), it


def largest_components_jax(
    mask: jax.Array,
    *,
    threshold: float = 0.5,
    n_valid: jax.Array | int | None = None,
) -> jax.Array:
    """`largest_components` on device (jit-able, static shapes).

    Args:
      mask: (X, Y, Z) bool; padded voxels of a bucket must be False.
      threshold: keep components with size >= threshold x the largest
        (float32 comparison, as the NumPy version; exact for sizes < 2**24).
      n_valid: int scalar (may be traced), the real voxel count of a padded
        volume, used by the "unchanged if >= half the volume" rule.

    Returns:
      (X, Y, Z) bool, equal to `largest_components(mask, threshold, n_valid)`.
    """
    check_array(mask, "mask", rank=3)
    m = mask.astype(bool)
    n = int(np.prod(m.shape))
    n_valid = jnp.asarray(n if n_valid is None else n_valid, jnp.int32)
    count = jnp.sum(m, dtype=jnp.int32)
    unchanged = (count == 0) | (2 * count >= n_valid)

    def filtered(m):
        labels, _ = connected_components_jax(m)
        flat = labels.reshape(-1)
        sizes = jax.ops.segment_sum(m.reshape(-1).astype(jnp.int32), flat,
                                    num_segments=n + 1)
        largest = jnp.max(sizes[:n])
        cutoff = jnp.float32(threshold) * largest.astype(jnp.float32)
        keep = sizes[flat].astype(jnp.float32) >= cutoff
        return (m.reshape(-1) & keep).reshape(m.shape)

    return lax.cond(unchanged, lambda m: m, filtered, m)
