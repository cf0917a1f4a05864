"""The one volume path: HU window, plane views, 3-slice windows (reference
sections 1.2, 1.5, 1.7), shared by the case store, the training sampler and
inference.

Every function takes NumPy arrays or JAX arrays and answers in kind: NumPy
in, NumPy out; JAX in (also tracers under `jax.jit`), JAX out built from
`jnp` ops with static shapes only. The plane is a Python string, so it must
be a static argument under `jit`.

The image a network sees is `model_input(hu)`: the HU window mapped to
[0, 1] and held at 16-bit precision (`encode_window` / `decode_window`),
the form the case store caches for training; inference windows the same
way, so training and test see the same numbers for the same volume.

Volumes are `(X, Y, Z)` arrays in the model layout (canonical PLS, or the
official storage order with `data.orientation="official"`; DESIGN.md). A plane view moves
the slicing axis first: `(S, H, W)`. A window stacks slices j-1, j, j+1 as
channels (edges replicated, `window_index`), which is what the FCN sees and
predicts; the inverse (`add_windows`, `window_counts`) averages each slice
over the 2 or 3 windows that hold it.
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


#: The 16-bit form of the window: x = q / 65535, an error <= 7.7e-6 (0.003
#: HU for the [-100, 240] window), far below CT noise; half the memory of
#: float32 in the case store.
IMAGE_LEVELS = 65535


def encode_window(hu: Any, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
                  ) -> np.ndarray:
    """HU (any shape, NumPy) -> uint16 window levels round(window_hu * 65535)."""
    x = np.asarray(window_hu(np.asarray(hu), low, high))
    return np.round(x * IMAGE_LEVELS).astype(np.uint16)


def decode_window(q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 window levels -> float32 in [0, 1] (into `out` when given)."""
    if out is not None:
        return np.multiply(q, np.float32(1.0 / IMAGE_LEVELS), out=out, casting="unsafe")
    return np.multiply(q, np.float32(1.0 / IMAGE_LEVELS), dtype=np.float32)


def model_input(hu: Any, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]
                ) -> np.ndarray:
    """The image the networks see: float32 in [0, 1], the HU window at the
    case store's 16-bit precision (`decode_window(encode_window(hu))`)."""
    return decode_window(encode_window(hu, low, high))


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


def window_index(j: Any, n: Any) -> Any:
    """Slice indices of the windows centred at j: [j-1, j, j+1] clamped to the
    n real slices [0, n) (edges replicated; reference 1.7).

    Args:
      j: int or int array (...,) of centres (clamped to [0, n-1] first, so
        the unused centres of a padded batch stay in range).
      n: the number of real slices (an int, or a traced int under jit).

    Returns:
      int array (..., 3): NumPy for Python/NumPy input, else JAX.
    """
    xp = jnp if isinstance(j, jax.Array) or isinstance(n, jax.Array) else np
    jc = xp.clip(j, 0, n - 1)
    return xp.stack([xp.clip(jc - 1, 0, n - 1), jc, xp.clip(jc + 1, 0, n - 1)], -1)


def gather_windows(view: Any, j: Any, n: Any = None) -> Any:
    """Windows of a plane view: view (S, H, W), centres j (int or (B,)) ->
    (H, W, 3) or (B, H, W, 3), in view's dtype. n: real slices (default S)."""
    idx = window_index(j, view.shape[0] if n is None else n)
    return _xp(view).moveaxis(view[idx], -3, -1)


def slice_windows(view: Any) -> Any:
    """(S, H, W) -> (S, H, W, 3) windows [max(0, j-1), j, min(S-1, j+1)].

    Copies the data three times; use `window_at` for one window.
    """
    view = _as_array(view)
    check_array(view, "view", rank=3)
    if view.shape[0] == 0:
        raise InputError("view: no slices (shape[0] == 0)")
    return gather_windows(view, _xp(view).arange(view.shape[0]))


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
        return gather_windows(view, int(j))
    return gather_windows(jnp.asarray(view), jnp.asarray(j, jnp.int32))


def add_windows(acc: Any, prob: Any, j: Any, n: Any, use: Any) -> Any:
    """Adds window outputs into per-slice sums (the inverse of the windows).

    Args:
      acc: (S + 2, H, W) float sums; acc[k + 1] collects slice k, acc[0]
        and acc[S + 1] are scratch rows for the dropped terms.
      prob: (B, H, W, 3) outputs of the windows centred at j (B,) int.
      n: the number of real slices; use: (B,) bool, the windows to add.

    Returns:
      the new sums. Channel c of window j belongs to slice j - 1 + c; terms
      outside [0, n) (the replicated edge channel) and unused windows are
      dropped.
    """
    xp = _xp(acc)
    s2 = acc.shape[0]
    if xp is np:
        acc = np.array(acc, copy=True)
    for c in range(3):
        k = j - 1 + c
        ok = use & (k >= 0) & (k < n)
        idx = xp.where(ok, k + 1, s2 - 1)
        val = xp.where(ok[:, None, None], prob[..., c], 0.0)
        if xp is np:
            np.add.at(acc, idx, val.astype(acc.dtype))
        else:
            acc = acc.at[idx].add(val)
    return acc


def window_counts(s: int, n: Any) -> Any:
    """(S,) float32 number of windows holding each slice: 3 inside, 2 at the
    ends, 1 if n == 1; 1 for padded slices k >= n (their sums are 0)."""
    xp = jnp if isinstance(n, jax.Array) else np
    k = xp.arange(s)
    cnt = 1 + (k - 1 >= 0).astype(xp.int32) + (k + 1 < n).astype(xp.int32)
    return xp.where(k < n, cnt, 1).astype(xp.float32)


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
    acc = xp.zeros((s + 2,) + tuple(pred.shape[1:3]), dtype)
    j = xp.arange(s)
    acc = add_windows(acc, pred.astype(dtype), j, s, xp.ones(s, bool))
    return acc[1:s + 1] / window_counts(s, s).astype(dtype)[:, None, None]


def volume_windows(volume: Any, plane: str) -> Any:
    """(X, Y, Z) volume -> (S, H, W, 3) windows of one plane."""
    return slice_windows(plane_view(volume, plane))


def volume_from_windows(pred: Any, plane: str) -> Any:
    """(S, H, W, 3) window predictions of one plane -> (X, Y, Z) volume."""
    return from_plane_view(accumulate_windows(pred), plane)
