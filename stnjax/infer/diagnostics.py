"""Per-round diagnostics of the coarse-to-fine loop, on device.

A convergence study needs to see *how* the rounds change a mask (shrinking,
growing, drifting), not only its DSC. Per round the loop records the mask's
voxel count, its overlap with the label (so precision and recall follow on
the host), and per plane the mean size of the crop boxes that round used.

The boxes are those `RSTN.fine_round` cuts: for each 3-slice window of the
plane view holding any of the crop reference (the previous mask), the box of
the union of its 3 slices plus the margin, clamped to the real slice size.
They are computed here from row and column projections, so the cost is
O(volume) and nothing of window size is materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stnjax.data.preprocess import PLANE_AXIS, gather_windows, plane_view


def _first_last(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last True along the last axis of (S, N) bool."""
    n = flags.shape[-1]
    return jnp.argmax(flags, axis=-1), n - 1 - jnp.argmax(flags[..., ::-1], axis=-1)


def plane_box_size(ref: jax.Array, extent: jax.Array, *, plane: str, margin: int
                   ) -> jax.Array:
    """Mean crop-box size of one plane: float32 (2,) (height, width) in
    pixels over the windows with a nonempty reference; NaN when none.

    Args:
      ref: (X, Y, Z) bool crop reference of a padded volume.
      extent: int32 (3,) its real size.
      plane: "X", "Y" or "Z" (static); margin: the fixed test-time margin K.
    """
    view = plane_view(ref, plane)                        # (S, H, W)
    a = PLANE_AXIS[plane]
    n = extent[a]
    hv, wv = (extent[i] for i in range(3) if i != a)
    rows, cols = jnp.any(view, axis=2), jnp.any(view, axis=1)   # (S, H), (S, W)
    j = jnp.arange(view.shape[0])
    # A window's box is that of the union of its 3 slices.
    rows_w = jnp.any(gather_windows(rows[..., None], j, n), axis=-1)[..., 0]
    cols_w = jnp.any(gather_windows(cols[..., None], j, n), axis=-1)[..., 0]
    use = jnp.any(rows_w, axis=1) & (j < n)
    r0, r1 = _first_last(rows_w)
    c0, c1 = _first_last(cols_w)
    h = jnp.minimum(r1 + margin + 1, hv) - jnp.maximum(r0 - margin, 0)
    w = jnp.minimum(c1 + margin + 1, wv) - jnp.maximum(c0 - margin, 0)
    count = jnp.sum(use)
    mean = lambda v: jnp.where(count > 0, jnp.sum(jnp.where(use, v, 0)) / jnp.maximum(count, 1),
                               jnp.nan)
    return jnp.stack([mean(h), mean(w)]).astype(jnp.float32)


def box_sizes(ref: jax.Array, extent: jax.Array, *, planes: tuple[str, ...], margin: int
              ) -> jax.Array:
    """`plane_box_size` of every plane: float32 (P, 2)."""
    return jnp.stack([plane_box_size(ref, extent, plane=p, margin=margin) for p in planes])


def overlap(mask: jax.Array, label: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(voxels in mask, voxels in mask & label) as int32; -1 without label."""
    voxels = jnp.sum(mask, dtype=jnp.int32)
    if label is None:
        return voxels, jnp.int32(-1)
    return voxels, jnp.sum(mask & label, dtype=jnp.int32)
