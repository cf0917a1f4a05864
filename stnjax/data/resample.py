"""Resampling a canonical voxel grid to a target spacing and back (NumPy).

`data.spacing` (mm per canonical axis) puts every case on a common grid for
training and inference: images linearly, labels by nearest neighbour. The
grid keeps the volume's physical extent: a source axis of n voxels of size
s becomes round(n s / t) voxels of size t' = n s / round(n s / t) (t' = t up
to the rounding of the voxel count), and voxel centres map by the
half-voxel rule (x_src = (i + 0.5) n_src / n_dst - 0.5, as image resizing
with aligned grid edges does), so a volume resampled to a grid and back
lands where it started. Predictions go back to the source grid the same
way (`to_grid`): a mask as a float, linearly, then >= 0.5.

Pure functions of arrays; no SciPy needed for these separable kernels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stnjax.checks import InputError


def check_spacing(spacing: object, name: str = "data.spacing") -> tuple[float, float, float] | None:
    """None / () -> None (the native grid); else three positive finite mm
    values as floats. InputError naming `name` otherwise."""
    if spacing is None or (isinstance(spacing, (list, tuple)) and len(spacing) == 0):
        return None
    try:
        vals = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected three positive numbers (mm per axis) or "
                         f"empty for the native grid, got {spacing!r}") from None
    if len(vals) != 3 or not all(np.isfinite(v) and v > 0 for v in vals):
        raise InputError(f"{name}: expected three positive numbers (mm per axis) or "
                         f"empty for the native grid, got {spacing!r}")
    return vals  # type: ignore[return-value]


def grid_shape(shape: Sequence[int], spacing: Sequence[float],
               target: Sequence[float]) -> tuple[int, int, int]:
    """The voxel counts of `shape` (voxels of `spacing` mm) on a `target` mm
    grid over the same extent: round(n s / t), at least 1 per axis."""
    return tuple(max(1, int(round(int(n) * float(s) / float(t))))
                 for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def grid_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """(4, 4) affine of the resampled grid: same extent and directions, voxel
    axis k scaled by shape[k] / new_shape[k], origin moved so that voxel
    edges stay where they were."""
    affine = np.asarray(affine, np.float64)
    f = np.asarray(shape, np.float64) / np.asarray(new_shape, np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * f[None, :]
    # World position of new voxel 0's centre: old index (0.5 f - 0.5).
    out[:3, 3] = affine[:3, :3] @ (0.5 * f - 0.5) + affine[:3, 3]
    return out


def _source_coords(n_src: int, n_dst: int) -> np.ndarray:
    """Source positions (float64, (n_dst,)) of the destination voxel centres,
    clamped to [0, n_src - 1]."""
    x = (np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5
    return np.clip(x, 0.0, n_src - 1.0)


def _linear_axis(a: np.ndarray, n_dst: int, axis: int) -> np.ndarray:
    n_src = a.shape[axis]
    if n_src == n_dst:
        return a
    x = _source_coords(n_src, n_dst)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_src - 1)
    w = (x - lo).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n_dst
    w = w.reshape(shape)
    return np.take(a, lo, axis=axis) * (1.0 - w) + np.take(a, hi, axis=axis) * w


def resample_linear(volume: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """float32 volume (X, Y, Z, ...) on `new_shape` (first three axes),
    separable linear interpolation with the half-voxel rule."""
    a = np.asarray(volume, np.float32)
    _check_shapes(a, new_shape)
    for axis, n in enumerate(new_shape):
        a = _linear_axis(a, int(n), axis)
    return np.ascontiguousarray(a, np.float32)


def resample_nearest(volume: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """volume (any dtype) on `new_shape` by nearest neighbour (labels)."""
    a = np.asarray(volume)
    _check_shapes(a, new_shape)
    for axis, n in enumerate(new_shape):
        if a.shape[axis] != int(n):
            idx = np.floor(_source_coords(a.shape[axis], int(n)) + 0.5).astype(np.int64)
            a = np.take(a, np.minimum(idx, a.shape[axis] - 1), axis=axis)
    return np.ascontiguousarray(a)


def to_grid(array: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """A model-grid result on another grid: bool masks linearly as floats,
    then >= 0.5 (smoother than nearest neighbour when the target is finer);
    float maps linearly; integer maps by nearest neighbour."""
    a = np.asarray(array)
    if tuple(a.shape[:3]) == tuple(int(n) for n in new_shape):
        return a
    if a.dtype == bool:
        return resample_linear(a.astype(np.float32), new_shape) >= 0.5
    if np.issubdtype(a.dtype, np.floating):
        return resample_linear(a, new_shape)
    return resample_nearest(a, new_shape)


def _check_shapes(a: np.ndarray, new_shape: Sequence[int]) -> None:
    if a.ndim < 3:
        raise InputError(f"volume: expected at least 3 axes, got shape {a.shape}")
    if len(new_shape) != 3 or any(int(n) < 1 for n in new_shape):
        raise InputError(f"new_shape: expected three positive sizes, got {tuple(new_shape)}")


__all__ = ["check_spacing", "grid_shape", "grid_affine", "resample_linear", "resample_nearest",
           "to_grid"]
