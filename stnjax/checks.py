"""The error classes of stnjax, all of them, and the argument checks of the API boundary.

Shape, rank and dtype checks are static, so they work the same on NumPy
arrays, concrete JAX arrays and tracers inside `jit`. Value checks (NaN or
infinite entries) need concrete values: they run on NumPy and concrete JAX
arrays and are skipped for tracers, which keeps jitted code free of host
round trips. Callers that want the value check on device data call the
public (non-jitted) wrapper, which checks before it enters `jit`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class InputError(ValueError):
    """Bad input at the API boundary: names the argument and what is wrong."""


class VolumeError(InputError):
    """An unreadable or invalid image / label file; names the file."""


class GeometryError(VolumeError):
    """Image and label grids disagree in world space; names both files."""


class DatasetError(InputError):
    """A bad manifest, fold table or dataset request; names the file or case."""


class CheckpointError(RuntimeError):
    """A save that failed; the message names the folder and the newest
    complete checkpoint, which stays usable (a rerun resumes from it)."""


class TrainingDivergedError(RuntimeError):
    """A non-finite loss or parameter; the message names the run, the step
    and the last good checkpoint."""


class HostLostError(RuntimeError):
    """A process of a multi-host run was lost (killed, crashed, its host
    gone); the message names it and what the others kept."""


def is_concrete(x: Any) -> bool:
    """True when `x` holds values we can read on the host (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def dtype_kind_of(dtype: Any) -> str:
    """NumPy's dtype kind letter, with bfloat16 (NumPy kind "V") as "f"."""
    if jnp.issubdtype(dtype, jnp.floating):
        return "f"
    return np.dtype(dtype).kind


def check_array(
    x: Any,
    name: str,
    *,
    rank: int | Sequence[int] | None = None,
    channels: int | None = None,
    dtype_kind: str | None = None,
    finite: bool = False,
) -> None:
    """Checks one array argument and raises `InputError` naming it.

    Args:
      x: the array (NumPy, JAX or a tracer).
      name: the argument name used in the message, e.g. "image".
      rank: the allowed number of dimensions (one int or several).
      channels: the required size of the last axis.
      dtype_kind: allowed NumPy dtype kinds, e.g. "f" (floating), "fb"
        (floating or bool), "iu" (integers).
      finite: also reject NaN and infinite values (concrete arrays only).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise InputError(f"{name}: expected an array, got {type(x).__name__}")
    if rank is not None:
        ranks = (rank,) if isinstance(rank, int) else tuple(rank)
        if x.ndim not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise InputError(
                f"{name}: expected rank {want}, got shape {tuple(x.shape)}")
    if channels is not None and (x.ndim == 0 or x.shape[-1] != channels):
        raise InputError(
            f"{name}: expected {channels} channels on the last axis, "
            f"got shape {tuple(x.shape)}")
    kind = dtype_kind_of(x.dtype)
    if dtype_kind is not None and kind not in dtype_kind:
        raise InputError(
            f"{name}: expected dtype of kind {dtype_kind!r}, got {x.dtype}")
    if finite and is_concrete(x) and kind == "f":
        values = np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else np.asarray(x)
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise InputError(f"{name}: {bad} NaN or infinite values")


def check_int(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    """Returns `v` as an int if it is an integer (not a bool) in [lo, hi]
    (hi None: no upper bound); raises `InputError` naming `name` otherwise."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo or (
            hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InputError(f"{name}: expected an int {want}, got {v!r}")
    return int(v)


def check_range(v: Any, name: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """Returns `v` as a float if it is a finite number in the given range
    (open or closed at each end; None: unbounded); raises `InputError`
    naming `name` and the range otherwise (a config value read at the top)."""
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    x = float(v) if ok else float("nan")
    ok = ok and np.isfinite(x)
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo
    if ok and hi is not None:
        ok = x < hi if hi_open else x <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        want = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise InputError(f"{name}: expected a number in {want}, got {v!r}")
    return x
