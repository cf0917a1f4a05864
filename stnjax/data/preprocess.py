"""HU window, plane views and 3-slice windows (reference sections 1.2, 1.5, 1.7).

Every function takes NumPy arrays or JAX arrays and answers in kind: NumPy
in, NumPy out; JAX in (also tracers under `jax.jit`), JAX out built from
`jnp` ops with static shapes only. The plane is a Python string, so it must
be a static argument under `jit`.

Volumes are canonical PLS `(X, Y, Z)` arrays (DESIGN.md). A plane view moves
the slicing axis first: `(S, H, W)`. A window stacks slices j-1, j, j+1 as
channels (edges replicated), which is what the FCN sees and predicts; the
inverse averages each slice over the 2 or 3 windows that hold it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stnjax.checks import InputError, check_array, is_concrete

HU_WINDOW = (-100.0, 240.0)
PLANES = ("X", "Y", "Z")
PLANE_AXIS = {"X": 0, "Y": 1, "Z": 2}


def _xp(x: Any):
    """jnp for JAX arrays (tracers included), np otherwise."""
    return jnp if isinstance(x, jax.Array) else np


def _as_array(x: Any) -> Any:
    return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def window_hu(hu: Any, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
              ) -> Any:
    """Clips HU to [low, high] and maps it linearly to [0, 1].

    Args:
      hu: array of any shape, integer or floating HU values.
      low, high: the window (low < high).

    Returns:
      float32 array of the same shape, (clip(hu, low, high) - low) / (high - low).
    """
    hu = _as_array(hu)
    check_array(hu, "hu", dtype_kind="iuf")
    if is_concrete(low) and is_concrete(high):
        lo, hi = float(low), float(high)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"low, high: expected finite low < high, got "
                             f"low={low}, high={high}")
    xp = _xp(hu)
    x = xp.clip(hu.astype(xp.float32), low, high)
    return ((x - low) / (high - low)).astype(xp.float32)


def check_plane(plane: Any, name: str = "plane") -> str:
    """Returns `plane` if it is one of PLANES, else raises InputError."""
    if not isinstance(plane, str) or plane not in PLANE_AXIS:
        raise InputError(f"{name}: expected one of {', '.join(PLANES)}, got "
                         f"{plane!r}")
    return plane


def plane_view(volume: Any, plane: str) -> Any:
    """(X, Y, Z) volume -> (S, H, W) with the plane's slicing axis first.

    X (coronal): (X, Y, Z); Y (sagittal): (Y, X, Z); Z (axial): (Z, X, Y).
    NumPy returns a view (no copy).
    """
    check_plane(plane)
    volume = _as_array(volume)
    check_array(volume, "volume", rank=3)
    return _xp(volume).moveaxis(volume, PLANE_AXIS[plane], 0)


def from_plane_view(view: Any, plane: str) -> Any:
    """The inverse of `plane_view`: (S, H, W) -> (X, Y, Z)."""
    check_plane(plane)
    view = _as_array(view)
    check_array(view, "view", rank=3)
    return _xp(view).moveaxis(view, 0, PLANE_AXIS[plane])


def _neighbours(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Static indices of the previous and next slice, edges replicated."""
    j = np.arange(s)
    return np.maximum(j - 1, 0), np.minimum(j + 1, s - 1)


def slice_windows(view: Any) -> Any:
    """(S, H, W) -> (S, H, W, 3) windows [max(0, j-1), j, min(S-1, j+1)].

    Copies the data three times; use `window_at` for one window.
    """
    view = _as_array(view)
    check_array(view, "view", rank=3)
    if view.shape[0] == 0:
        raise InputError("view: no slices (shape[0] == 0)")
    prev, nxt = _neighbours(view.shape[0])
    return _xp(view).stack([view[prev], view, view[nxt]], axis=-1)


def window_at(view: Any, j: Any) -> Any:
    """One window (H, W, 3) = slices [max(0, j-1), j, min(S-1, j+1)].

    Args:
      view: (S, H, W) NumPy or JAX array.
      j: the centre slice; a Python/NumPy int in [0, S), or (under jit) a
        traced integer, which is clipped to [0, S-1].
    """
    view = _as_array(view)
    check_array(view, "view", rank=3)
    s = view.shape[0]
    if is_concrete(j) and not isinstance(j, jax.Array):
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
            raise InputError(f"j: expected an int slice index, got {j!r}")
        if not 0 <= j < s:
            raise InputError(f"j: slice {j} out of range [0, {s})")
        j = int(j)
        xp = _xp(view)
        return xp.stack([view[max(j - 1, 0)], view[j], view[min(j + 1, s - 1)]],
                        axis=-1)
    centre = jnp.clip(jnp.asarray(j, jnp.int32), 0, s - 1)
    idx = jnp.clip(centre + jnp.arange(-1, 2), 0, s - 1)
    return jnp.moveaxis(jnp.take(jnp.asarray(view), idx, axis=0), 0, -1)


def accumulate_windows(pred: Any) -> Any:
    """Averages per-window predictions back into slices (reference 1.7).

    out[j] = (pred[j-1, ..., 2] + pred[j, ..., 1] + pred[j+1, ..., 0]) / count
    with out-of-range terms dropped: count is 3 inside, 2 on the first and
    last slice, 1 when S == 1. The replicated channel of an edge window is
    dropped, not counted twice.

    Args:
      pred: (S, H, W, 3) predictions, one window per slice.

    Returns:
      (S, H, W) in pred's floating dtype (float32 for integer or bool input).
    """
    pred = _as_array(pred)
    check_array(pred, "pred", rank=4, channels=3, dtype_kind="biuf")
    xp = _xp(pred)
    s = pred.shape[0]
    if s == 0:
        raise InputError("pred: no slices (shape[0] == 0)")
    dtype = jnp.promote_types(pred.dtype, jnp.float32)
    p = pred.astype(dtype)
    out = p[..., 1]
    if s > 1:
        zero = xp.zeros((1,) + tuple(pred.shape[1:3]), dtype)
        # slice j is channel 0 of window j+1 and channel 2 of window j-1
        out = (out + xp.concatenate([p[1:, ..., 0], zero], axis=0)
               + xp.concatenate([zero, p[:-1, ..., 2]], axis=0))
    count = np.full((s,), 3.0)
    count[0] = count[-1] = min(s, 2)
    return out / xp.asarray(count, dtype)[:, None, None]


def volume_windows(volume: Any, plane: str) -> Any:
    """(X, Y, Z) volume -> (S, H, W, 3) windows of one plane."""
    return slice_windows(plane_view(volume, plane))


def volume_from_windows(pred: Any, plane: str) -> Any:
    """(S, H, W, 3) window predictions of one plane -> (X, Y, Z) volume."""
    return from_plane_view(accumulate_windows(pred), plane)
