"""Tests for stnjax.metrics: hand-built cases with exactly known answers,
a brute-force surface-distance reference, and JAX == NumPy agreement."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from stnjax import metrics as M
from stnjax.checks import InputError


def test_dsc_jaccard_by_hand():
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros((4, 5, 6), bool)
    a.flat[:10] = True                  # |A| = 10
    b.flat[6:12] = True                 # |B| = 6, |A n B| = 4, |A u B| = 12
    assert M.dsc(a, b) == pytest.approx(8 / 16)
    assert M.jaccard(a, b) == pytest.approx(4 / 12)
    z = np.zeros_like(a)
    assert M.dsc(z, z) == 0.0 and M.dsc(z, z, empty=1.0) == 1.0
    assert M.jaccard(z, z) == 0.0 and M.jaccard(z, z, empty=1.0) == 1.0
    assert M.dsc(a, z) == 0.0 and M.inter_iteration_dsc(a, z) == 0.0
    assert M.inter_iteration_dsc(z, z) == 1.0
    assert M.inter_iteration_dsc(a, a) == 1.0
    with pytest.raises(InputError, match="pred: shape"):
        M.dsc(a, b[:2])


def test_dsc_jax_matches_numpy():
    f = jax.jit(M.dsc_jax)
    rng = np.random.default_rng(0)
    for d in (0.0, 0.01, 0.3):
        a = rng.random((12, 10, 8)) < d
        b = rng.random((12, 10, 8)) < 0.2
        for x, y in ((a, b), (a, a), (a, np.zeros_like(a))):
            assert float(f(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(M.dsc(x, y), rel=1e-6)
    z = jnp.zeros((3, 3, 3), bool)
    assert float(M.dsc_jax(z, z)) == 0.0 and float(M.dsc_jax(z, z, empty=1.0)) == 1.0


# --------------------------------------------------------------------------
# Surface distances
# --------------------------------------------------------------------------

SP = (0.7, 1.3, 2.1)


def _cube_pair(axis):
    """Two 4-voxel cubes, the second shifted by 5 voxels along `axis`.

    Surface distances are exact: a surface layer k voxels from the facing
    side of its cube is (k + 2) * spacing[axis] from the other cube's facing
    face. Per cube: 16 face voxels at 2 and 5 steps, 12 ring voxels at 3 and
    4 steps; pooled over both: 32 x 2, 24 x 3, 24 x 4, 32 x 5 steps.
    """
    shape = [6, 6, 6]
    shape[axis] = 13
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    sl = [slice(1, 5)] * 3
    a[tuple(sl)] = True
    sl[axis] = slice(6, 10)
    b[tuple(sl)] = True
    return a, b


@pytest.mark.parametrize("axis", [0, 2])
def test_hd95_and_surface_dice_offset_cubes(axis):
    a, b = _cube_pair(axis)
    step = SP[axis]
    # 95th percentile of 112 pooled distances: positions 105, 106 are 5 steps
    assert M.hd95(a, b, SP) == pytest.approx(5 * step)
    assert M.surface_dice(a, b, SP, tolerance_mm=2 * step - 1e-3) == 0.0
    assert M.surface_dice(a, b, SP, tolerance_mm=2 * step + 1e-3) == pytest.approx(32 / 112)
    assert M.surface_dice(a, b, SP, tolerance_mm=3 * step + 1e-3) == pytest.approx(56 / 112)
    assert M.surface_dice(a, b, SP, tolerance_mm=5 * step + 1e-3) == 1.0
    assert M.hd95(a, a, SP) == 0.0 and M.surface_dice(a, a, SP, 0.0) == 1.0


def test_hd95_single_voxels_and_slabs():
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros((5, 5, 5), bool)
    a[1, 1, 1] = True
    b[3, 2, 1] = True
    sp = (1.5, 2.0, 3.0)
    assert M.hd95(a, b, sp) == pytest.approx(np.sqrt(3.0 ** 2 + 2.0 ** 2))
    slab_a = np.zeros((6, 7, 8), bool)
    slab_b = np.zeros((6, 7, 8), bool)
    slab_a[0] = True            # touches the volume border: still a surface
    slab_b[3] = True
    assert M.hd95(slab_a, slab_b, (2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert M.surface_dice(slab_a, slab_b, (2.5, 1.0, 1.0), 7.4) == 0.0


def test_empty_conventions():
    a, _ = _cube_pair(0)
    z = np.zeros_like(a)
    diag = np.sqrt((13 * 0.7) ** 2 + (6 * 1.3) ** 2 + (6 * 2.1) ** 2)
    assert M.hd95(z, z, SP) == 0.0 and M.surface_dice(z, z, SP) == 1.0
    assert M.hd95(a, z, SP) == pytest.approx(diag) and M.hd95(z, a, SP) == pytest.approx(diag)
    assert M.surface_dice(a, z, SP) == 0.0 and M.surface_dice(z, a, SP) == 0.0
    with pytest.raises(InputError, match="spacing"):
        M.hd95(a, a, (1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        M.hd95(a, a, (1.0, 0.0, 1.0))


def _brute_surface_distances(a, b, sp):
    """Surfaces by explicit 6-neighbour tests, distances by all pairs."""
    def surface(m):
        pts = []
        for idx in zip(*np.nonzero(m)):
            for ax, d in itertools.product(range(3), (-1, 1)):
                n = list(idx)
                n[ax] += d
                if not (0 <= n[ax] < m.shape[ax]) or not m[tuple(n)]:
                    pts.append(idx)
                    break
        return np.array(pts, np.float64) * np.asarray(sp)
    pa, pb = surface(a), surface(b)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return dist.min(1), dist.min(0)


def test_hd95_surface_dice_against_brute_force():
    rng = np.random.default_rng(1)
    sp = (0.8, 1.1, 2.5)
    for _ in range(3):
        field = ndimage.gaussian_filter(rng.random((10, 12, 9)), 1.5)
        a = field > np.quantile(field, 0.7)
        b = np.roll(a, 1, axis=int(rng.integers(3))) ^ (rng.random(a.shape) < 0.03)
        d_ab, d_ba = _brute_surface_distances(a, b, sp)
        pooled = np.concatenate([d_ab, d_ba])
        assert M.hd95(a, b, sp) == pytest.approx(np.percentile(pooled, 95), rel=1e-9)
        for tol in (0.5, 1.0, 2.0):
            assert M.surface_dice(a, b, sp, tol) == pytest.approx(np.mean(pooled <= tol))


# --------------------------------------------------------------------------
# Largest components
# --------------------------------------------------------------------------

def test_largest_components_hand_cases():
    for small, kept in ((4, False), (6, True), (5, True)):   # kept iff >= 0.5 x 10
        m = np.zeros((12, 12, 12), bool)
        m[0, 0, :10] = True                # a rod of 10 voxels
        m[6, 6, :small] = True
        out = M.largest_components(m)
        assert out[0, 0, :10].all() and out[6, 6, :small].all() == kept
        assert out.sum() == 10 + (small if kept else 0)
        np.testing.assert_array_equal(np.asarray(jax.jit(M.largest_components_jax)(
            jnp.asarray(m))), out)
    # diagonal contact is no 6-connection: the 4-voxel piece is separate
    m = np.zeros((12, 12, 12), bool)
    m[2:4, 2:4, 2:5] = True               # 12 voxels
    m[4, 4, 5:9] = True                   # touches (3, 3, 4) only at a corner
    out = M.largest_components(m)
    assert out.sum() == 12 and not out[4, 4, 5:9].any()
    assert ndimage.label(m, structure=np.ones((3, 3, 3)))[1] == 1   # one under 26-conn
    # empty stays empty; >= half of the volume stays unchanged
    assert not M.largest_components(np.zeros((4, 4, 4), bool)).any()
    m = np.zeros((4, 4, 4), bool)
    m[:2] = True                          # 32 of 64 voxels
    m[1, 3, 3] = False
    m[3, 3, 3] = True                     # an isolated voxel, still 32 voxels
    np.testing.assert_array_equal(M.largest_components(m), m)
    m[0, 0, 0] = False                    # 31 < 32: filtered
    assert M.largest_components(m).sum() == 30
    # padded to a bucket: n_valid keeps the rule on the real volume
    pad = np.zeros((6, 6, 6), bool)
    pad[:4, :4, :4] = m
    m[0, 0, 0] = True
    pad[:4, :4, :4] = m
    np.testing.assert_array_equal(M.largest_components(pad, n_valid=64), pad)
    np.testing.assert_array_equal(np.asarray(M.largest_components_jax(
        jnp.asarray(pad), n_valid=jnp.int32(64))), pad)
    assert M.largest_components(pad).sum() == 31


def _snake(shape):
    """One 6-connected path that zigzags through rows and layers."""
    x_n, y_n, z_n = shape
    m = np.zeros(shape, bool)
    for z in range(0, z_n, 2):
        for i, x in enumerate(range(0, x_n, 2)):
            m[x, :, z] = True
            if x + 2 < x_n:
                m[x + 1, y_n - 1 if i % 2 == 0 else 0, z] = True
        if z + 2 < z_n:
            last = (x_n - 1) // 2
            m[2 * last, 0 if last % 2 == 0 else y_n - 1, z + 1] = True
    return m


def test_connected_components_jax_partition_and_snake():
    cc = jax.jit(M.connected_components_jax)
    rng = np.random.default_rng(2)
    for d in (0.2, 0.3, 0.4):
        m = rng.random((20, 24, 16)) < d
        lab, _ = cc(jnp.asarray(m))
        lab = np.asarray(lab)
        ref, n = ndimage.label(m, structure=M._STRUCT6)
        assert np.all(lab[~m] == m.size)
        pairs = set(zip(ref[m].tolist(), lab[m].tolist()))
        assert len(pairs) == n and len({p[1] for p in pairs}) == n   # a bijection
    snake = _snake((20, 24, 16))
    assert ndimage.label(snake, structure=M._STRUCT6)[1] == 1
    lab, it = cc(jnp.asarray(snake))
    assert len(np.unique(np.asarray(lab)[snake])) == 1
    # the path is ~2000 voxels long; hooking + pointer jumping needs few rounds
    assert snake.sum() > 1900 and int(it) < 30


def test_largest_components_jax_matches_numpy():
    f = jax.jit(M.largest_components_jax)
    rng = np.random.default_rng(3)
    for seed in range(4):
        field = ndimage.gaussian_filter(np.random.default_rng(seed).random((20, 24, 16)), 1.2)
        for q in (0.85, 0.7):
            m = field > np.quantile(field, q)
            np.testing.assert_array_equal(np.asarray(f(jnp.asarray(m))),
                                          M.largest_components(m))
    for d in (0.1, 0.3, 0.55):        # 0.55: the >= half rule
        m = rng.random((20, 24, 16)) < d
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(m))), M.largest_components(m))
    snake = _snake((20, 24, 16))
    snake[19, 0:3, 15] = True          # a separate 3-voxel piece: removed
    out = np.asarray(f(jnp.asarray(snake)))
    np.testing.assert_array_equal(out, M.largest_components(snake))
    assert not out[19].any() and out.sum() == snake.sum() - 3
    g = jax.jit(functools.partial(M.largest_components_jax, threshold=0.3))
    m = rng.random((20, 24, 16)) < 0.25
    np.testing.assert_array_equal(np.asarray(g(jnp.asarray(m))),
                                  M.largest_components(m, threshold=0.3))
    with pytest.raises(InputError, match="mask: expected rank 3"):
        M.largest_components_jax(jnp.zeros((4, 4), bool))
