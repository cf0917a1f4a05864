"""HU window, plane views, 3-slice windows and their inverse (reference 1.5, 1.7)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.data import preprocess as pp
from stnjax.checks import InputError


def _volume(shape=(5, 4, 6), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------ window

def test_window_hu_hand_values():
    hu = np.array([-1000, -100, 0, 70, 240, 3000], np.int16)
    want = np.array([0.0, 0.0, 100 / 340, 170 / 340, 1.0, 1.0], np.float32)
    got = pp.window_hu(hu)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a configurable window
    np.testing.assert_allclose(pp.window_hu(np.array([-10.0, 0.0, 5.0, 20.0]),
                                            low=-10.0, high=10.0),
                               [0.0, 0.5, 0.75, 1.0], rtol=1e-6)


def test_window_hu_jit_matches_numpy():
    hu = np.random.default_rng(1).uniform(-1200, 1500, (3, 7, 5)).astype(np.float32)
    got = jax.jit(pp.window_hu)(jnp.asarray(hu))
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), pp.window_hu(hu), rtol=1e-6)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


@pytest.mark.parametrize("low, high", [(240.0, -100.0), (5.0, 5.0),
                                       (float("nan"), 1.0)])
def test_window_hu_rejects_bad_window(low, high):
    with pytest.raises(InputError, match="low, high"):
        pp.window_hu(np.zeros(3), low=low, high=high)


def test_window_hu_rejects_non_numeric():
    with pytest.raises(InputError, match="hu"):
        pp.window_hu(np.array(["a", "b"]))


# ------------------------------------------------------------------ planes

def test_plane_view_matches_reference_slicing():
    v = _volume()
    # reference 1.2: X slices V[j, :, :], Y slices V[:, j, :], Z slices V[:, :, j]
    for j in range(v.shape[0]):
        np.testing.assert_array_equal(pp.plane_view(v, "X")[j], v[j, :, :])
    for j in range(v.shape[1]):
        np.testing.assert_array_equal(pp.plane_view(v, "Y")[j], v[:, j, :])
    for j in range(v.shape[2]):
        np.testing.assert_array_equal(pp.plane_view(v, "Z")[j], v[:, :, j])
    for plane in pp.PLANES:
        np.testing.assert_array_equal(
            pp.from_plane_view(pp.plane_view(v, plane), plane), v)


@pytest.mark.parametrize("plane", ["x", "axial", 2, None])
def test_check_plane_rejects(plane):
    with pytest.raises(InputError, match="plane: expected one of X, Y, Z"):
        pp.check_plane(plane)
    with pytest.raises(InputError, match="plane"):
        pp.plane_view(_volume(), plane)


def test_plane_view_rejects_wrong_rank():
    with pytest.raises(InputError, match="volume: expected rank 3"):
        pp.plane_view(np.zeros((4, 4)), "Z")


# ----------------------------------------------------------------- windows

def _windows_loop(view):
    s = view.shape[0]
    out = np.empty(view.shape + (3,), view.dtype)
    for j in range(s):
        for c, k in enumerate((j - 1, j, j + 1)):
            out[j, ..., c] = view[min(max(k, 0), s - 1)]
    return out


def _accumulate_loop(pred):
    """Reference 1.7 as written: add each window's valid channels to the
    accumulators of slices j-1, j, j+1, then divide by the number added."""
    s = pred.shape[0]
    acc = np.zeros(pred.shape[:3], np.float64)
    cnt = np.zeros(s)
    for j in range(s):
        for c, k in enumerate((j - 1, j, j + 1)):
            if 0 <= k < s:
                acc[k] += pred[j, ..., c]
                cnt[k] += 1
    return acc / cnt[:, None, None]


@pytest.mark.parametrize("s", [1, 2, 3, 6])
def test_slice_windows_against_loop(s):
    view = _volume((s, 3, 4), seed=s)
    got = pp.slice_windows(view)
    assert got.shape == (s, 3, 4, 3)
    np.testing.assert_array_equal(got, _windows_loop(view))
    for j in range(s):
        np.testing.assert_array_equal(pp.window_at(view, j), got[j])


def test_window_at_rejects_bad_index():
    view = _volume((4, 2, 2))
    with pytest.raises(InputError, match="j: slice 4 out of range"):
        pp.window_at(view, 4)
    with pytest.raises(InputError, match="j: expected an int"):
        pp.window_at(view, 1.5)


@pytest.mark.parametrize("s", [1, 2, 3, 7])
def test_accumulate_windows_against_loop(s):
    pred = np.random.default_rng(s).uniform(size=(s, 3, 2, 3)).astype(np.float32)
    got = pp.accumulate_windows(pred)
    assert got.shape == (s, 3, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, _accumulate_loop(pred), rtol=1e-6)


def test_accumulate_windows_counts_edges_once():
    # every window predicts 1 for its replicated channels and 0 elsewhere:
    # a double-counted edge would leave a non-zero value on slices 0 and S-1
    s = 4
    pred = np.zeros((s, 1, 1, 3), np.float32)
    pred[0, ..., 0] = 1.0       # window 0, channel 0 is a copy of slice 0
    pred[s - 1, ..., 2] = 1.0   # window S-1, channel 2 is a copy of slice S-1
    np.testing.assert_array_equal(pp.accumulate_windows(pred), 0.0)
    # a hand case: S=2, out[0] = (p[0,1] + p[1,0]) / 2, out[1] = (p[0,2] + p[1,1]) / 2
    p = np.array([[10, 20, 30], [40, 50, 60]], np.float32).reshape(2, 1, 1, 3)
    np.testing.assert_array_equal(pp.accumulate_windows(p).ravel(), [30.0, 40.0])


@pytest.mark.parametrize("shape", [(5, 4, 6), (1, 3, 2), (2, 1, 3), (3, 2, 1)])
def test_slice_then_unslice_gives_volume(shape):
    v = _volume(shape, seed=sum(shape))
    for plane in pp.PLANES:
        back = pp.volume_from_windows(pp.volume_windows(v, plane), plane)
        np.testing.assert_allclose(back, v, rtol=1e-6, atol=1e-7)
    # integer-valued floats survive the mean exactly
    vi = np.round(v * 10).astype(np.float32)
    for plane in pp.PLANES:
        np.testing.assert_array_equal(
            pp.volume_from_windows(pp.volume_windows(vi, plane), plane), vi)


def test_accumulate_windows_rejects_bad_shape():
    with pytest.raises(InputError, match="pred: expected 3 channels"):
        pp.accumulate_windows(np.zeros((2, 3, 3, 2)))
    with pytest.raises(InputError, match="pred: expected rank 4"):
        pp.accumulate_windows(np.zeros((2, 3, 3)))


# --------------------------------------------------------------------- jit

def test_jit_agrees_with_numpy():
    v = _volume((5, 4, 6), seed=3)
    for plane in pp.PLANES:
        fwd = jax.jit(functools.partial(pp.volume_windows, plane=plane))
        inv = jax.jit(functools.partial(pp.volume_from_windows, plane=plane))
        w = fwd(jnp.asarray(v))
        assert isinstance(w, jax.Array)
        np.testing.assert_array_equal(np.asarray(w), pp.volume_windows(v, plane))
        pred = np.random.default_rng(7).uniform(size=w.shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(inv(jnp.asarray(pred))),
                                   pp.volume_from_windows(pred, plane),
                                   rtol=1e-6)
    view = pp.plane_view(v, "Z")
    at = jax.jit(pp.window_at)
    for j in range(view.shape[0]):
        np.testing.assert_array_equal(np.asarray(at(jnp.asarray(view), j)),
                                      pp.window_at(view, j))
    # a traced index outside [0, S) is clipped (no host check under jit)
    np.testing.assert_array_equal(np.asarray(at(jnp.asarray(view), 99)),
                                  pp.window_at(view, view.shape[0] - 1))
