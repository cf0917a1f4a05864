"""Geometry helpers of the phantom generator: the patient grid, painting
canvas, rotations, ellipsoids, tubes along curves and smooth noise.

All sizes are in mm of the patient inside `REFERENCE_FOV_MM`; the grid maps
them to voxels of the requested shape. Used by `stnjax.phantom.anatomy` (the
painters) and `stnjax.phantom` (the generator).
"""

from __future__ import annotations

import numpy as np
from scipy import interpolate, ndimage

#: Field of view (mm) of the virtual patient, canonical axes (P, L, S),
#: stretched to the requested voxel grid.
REFERENCE_FOV_MM = (320.0, 320.0, 256.0)


class Grid:
    """Voxel centres in patient mm (origin at the centre of the FOV)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.step = np.asarray(REFERENCE_FOV_MM) / np.asarray(shape)
        self.axes = [((np.arange(n) + 0.5) * s - f / 2).astype(np.float32)
                     for n, s, f in zip(shape, self.step, REFERENCE_FOV_MM)]

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in [lo, hi] mm, or None."""
        sl = []
        for ax, l, h in zip(self.axes, lo, hi):
            i0, i1 = np.searchsorted(ax, l), np.searchsorted(ax, h, side="right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        return tuple(sl)

    def coords(self, sl):
        """Broadcastable coordinates (na,1,1), (1,nb,1), (1,1,nc) of a box."""
        a, b, c = (ax[s] for ax, s in zip(self.axes, sl))
        return a[:, None, None], b[None, :, None], c[None, None, :]


class Canvas:
    """Tissue and label maps painted with priorities (higher wins), so the
    drawing order does not matter and organs never erase what outranks them."""

    def __init__(self, shape):
        self.tissue = np.zeros(shape, np.uint8)
        self.label = np.zeros(shape, np.uint8)
        self.prio = np.zeros(shape, np.uint8)

    def paint(self, sl, mask, tissue, label, prio):
        if sl is None:
            return
        m = mask & (self.prio[sl] <= prio)
        self.tissue[sl][m] = tissue
        self.label[sl][m] = label
        self.prio[sl][m] = prio


def rotation(yaw_deg=0.0, tilt_deg=0.0):
    """Rotation about the S axis (in-plane yaw) then about the P axis (tilt)."""
    y, t = np.deg2rad(yaw_deg), np.deg2rad(tilt_deg)
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rz @ rx


def ellipsoid(grid, centre, semi, rot=None):
    """Normalised radius q (q <= 1 inside) of an ellipsoid on its bounding box.

    Returns (slices, q float32) or (None, None) if outside the FOV."""
    centre, semi = np.asarray(centre, float), np.asarray(semi, float)
    ext = semi.max() if rot is not None else semi
    sl = grid.box(centre - ext, centre + ext)
    if sl is None:
        return None, None
    x = [g - c for g, c in zip(grid.coords(sl), centre)]
    r = np.eye(3) if rot is None else rot
    q2 = 0.0
    for k in range(3):  # local axis k = sum_j r[j, k] * x_j
        u = r[0, k] * x[0] + r[1, k] * x[1] + r[2, k] * x[2]
        q2 = q2 + (u / semi[k]) ** 2
    return sl, np.sqrt(q2).astype(np.float32)


def curve(points, radii, step_mm):
    """Dense points (N,3) and radii (N,) along a cubic spline through
    control points (K,3) with radii (K,), spaced about step_mm apart."""
    p, radii = np.asarray(points, float), np.asarray(radii, float)
    keep = np.r_[True, np.linalg.norm(np.diff(p, axis=0), axis=1) > 1e-3]  # drop repeats
    p, radii = p[keep], radii[keep]
    if len(p) == 1:
        return p, radii
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    n = max(int(np.ceil(s[-1] / step_mm)) + 1, 2)
    t = np.linspace(0.0, s[-1], n)
    if len(p) > 2:
        dense = interpolate.CubicSpline(s, p, bc_type="natural")(t)
    else:
        dense = np.stack([np.interp(t, s, p[:, k]) for k in range(3)], 1)
    return dense, np.interp(t, s, radii)


def tube(grid, points, radii, margin=0.0):
    """Signed distance (mm) to a tube of varying radius (a union of balls along
    a spline), on its bounding box. Returns (slices, sdf float32)."""
    pts, rad = curve(points, radii, step_mm=0.75 * grid.step.min())
    pad = rad.max() + margin + 1.0
    sl = grid.box(pts.min(0) - pad, pts.max(0) + pad)
    if sl is None:
        return None, None
    ax = [g[s] for g, s in zip(grid.axes, sl)]
    sdf = np.full(tuple(len(a) for a in ax), np.inf, np.float32)
    for i in range(0, len(pts), 16):  # chunks keep the (voxels x points) array small
        p, r = pts[i:i + 16], rad[i:i + 16]
        lo, hi = p.min(0) - pad, p.max(0) + pad
        idx = [(np.searchsorted(a, l), np.searchsorted(a, h, side="right"))
               for a, l, h in zip(ax, lo, hi)]
        if any(i1 <= i0 for i0, i1 in idx):
            continue
        d = [(a[i0:i1, None] - p[:, k]) ** 2 for k, (a, (i0, i1)) in enumerate(zip(ax, idx))]
        dist = np.sqrt(d[0][:, None, None, :] + d[1][None, :, None, :] + d[2][None, None, :, :]) - r
        sub = tuple(slice(i0, i1) for i0, i1 in idx)
        np.minimum(sdf[sub], dist.min(-1), out=sdf[sub])
    return sl, sdf


def smooth_noise(rng, shape, sigma):
    """Unit-std Gaussian random field with correlation length sigma (voxels)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def coarse_noise(rng, shape, sigma):
    """Like `smooth_noise` for large sigma: filtered on a coarse grid, then
    linearly upsampled (cheap for correlation lengths of several voxels)."""
    f = max(1, int(np.min(sigma) // 2))
    small = tuple(int(np.ceil(n / f)) + 1 for n in shape)
    g = ndimage.gaussian_filter(rng.standard_normal(small, np.float32), np.asarray(sigma) / f,
                                mode="wrap")
    g = ndimage.zoom(g, [f] * 3, order=1, grid_mode=False)[tuple(slice(0, n) for n in shape)]
    return g / max(float(g.std()), 1e-6)




def ellipsoid_on(g, sl, centre, semi):
    """Normalised radius of an axis-aligned ellipsoid on a given box."""
    x = [gg - cc for gg, cc in zip(g.coords(sl), centre)]
    return sl, np.sqrt(sum((xk / sk) ** 2 for xk, sk in zip(x, semi))).astype(np.float32)


def random_walk(rng, lo, hi, n, step):
    """n control points of a smooth random loop inside the box [lo, hi]."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    pts = [rng.uniform(lo, hi)]
    d = rng.normal(size=3)
    for _ in range(n - 1):
        d = 0.5 * d / np.linalg.norm(d) + rng.normal(size=3)  # persistence: no sharp kinks
        nxt = pts[-1] + step * d / np.linalg.norm(d)
        pts.append(np.clip(nxt, lo, hi))
    return np.array(pts)
