"""Winograd F(2 x 2, 3 x 3) (`stnjax.models.winograd`) and its use in training.

References: a float64 NumPy convolution and its gradients written from the
definition (tests/test_layers.py), XLA's own convolution and gradients, and
the adjoint property of each transform and its written-out transpose
(<T a, b> = <a, T^T b>), which holds whatever the transform computes. The
whole FCN-8s with Winograd layers against XLA's gradients:
tests/test_layers.py (`test_fcn8s_gradients_equal_for_both_conv_grads`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stnjax.models import conv, winograd
from stnjax.models.conv import DIMS, conv2d
from tests.test_layers import np_conv_grads, winograd_for_every_3x3


def _np_conv(xp, w):
    """'VALID' cross-correlation, float64: (N, H, W, C) x (3, 3, C, K)."""
    xp, w = np.asarray(xp, np.float64), np.asarray(w, np.float64)
    ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
    return sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + ho, j:j + wo], w[i, j])
               for i in range(3) for j in range(3))


def _rel_err(got, want):
    """max |got - want| / max |want| (0 where both are all zero)."""
    want = np.asarray(want, np.float64)
    gap = float(np.abs(np.asarray(got, np.float64) - want).max())
    return gap / max(float(np.abs(want).max()), 1e-30) if gap else 0.0


# (N, H, W, C) padded input, K: even and odd output sides, non-square, batch 2,
# the smallest input (3 x 3: one output pixel).
SHAPES = [((1, 10, 10, 4), 5), ((2, 9, 12, 3), 6), ((2, 3, 3, 5), 4)]


@pytest.mark.parametrize("xs,k", SHAPES)
def test_conv3x3_and_grads_match_numpy(xs, k):
    rng = np.random.default_rng(0)
    xp = rng.normal(size=xs).astype(np.float32)
    w = rng.normal(size=(3, 3, xs[-1], k)).astype(np.float32)
    y = winograd.conv3x3(jnp.asarray(xp), jnp.asarray(w), lax.Precision.HIGHEST)
    want = _np_conv(xp, w)
    assert y.shape == want.shape and y.dtype == jnp.float32
    assert _rel_err(y, want) < 2e-6
    g = rng.normal(size=want.shape).astype(np.float32)
    dxp, dw = winograd.conv3x3_grads(jnp.asarray(xp), jnp.asarray(w), jnp.asarray(g),
                                     lax.Precision.HIGHEST)
    want_dxp, want_dw = np_conv_grads(xp, w, g)
    assert dxp.shape == xp.shape and dw.shape == w.shape
    assert _rel_err(dxp, want_dxp) < 2e-6
    assert _rel_err(dw, want_dw) < 2e-6


def _adjoint_gap(fn, fn_t, a, b):
    """|<fn(a), b> - <a, fn_t(b)>| relative to |<fn(a), b>|, float64 sums."""
    lhs = np.vdot(np.asarray(fn(a), np.float64), np.asarray(b, np.float64))
    rhs = np.vdot(np.asarray(a, np.float64), np.asarray(fn_t(b), np.float64))
    return abs(lhs - rhs) / abs(lhs)


def test_transforms_and_their_transposes_are_adjoint():
    rng = np.random.default_rng(1)
    n, t, s, c, k = 2, 3, 4, 5, 6
    xp = jnp.asarray(rng.normal(size=(n, 2 * t + 2, 2 * s + 2, c)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(16, n * t * s, c)), jnp.float32)
    assert _adjoint_gap(winograd.input_transform,
                        lambda d: winograd.input_transform_t(d, (n, t, s)), xp, u) < 1e-5
    m = jnp.asarray(rng.normal(size=(16, n * t * s, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(n, 2 * t, 2 * s, k)), jnp.float32)
    assert _adjoint_gap(lambda a: winograd.output_transform(a, (n, t, s)),
                        winograd.output_transform_t, m, dy) < 1e-5
    w = jnp.asarray(rng.normal(size=(3, 3, c, k)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(16, c, k)), jnp.float32)
    assert _adjoint_gap(winograd.kernel_transform, winograd.kernel_transform_t, w, v) < 1e-5


def test_pays_draws_the_measured_line():
    f32 = jnp.float32
    assert winograd.pays((57, 57), 512, 512, (3, 3), f32)       # conv4_x at 256
    assert winograd.pays((227, 227), 64, 128, (3, 3), f32)      # conv2_1
    assert winograd.pays((15, 15), 512, 512, (3, 3), f32)
    assert not winograd.pays((11, 11), 512, 512, (3, 3), f32)   # too small a map
    assert not winograd.pays((454, 454), 64, 64, (3, 3), f32)   # conv1_2: too few channels
    assert not winograd.pays((57, 57), 512, 512, (1, 1), f32)   # not 3 x 3
    assert not winograd.pays((57, 57), 512, 512, (3, 3), jnp.bfloat16)


@pytest.fixture
def winograd_everywhere(monkeypatch):
    winograd_for_every_3x3(monkeypatch)


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((100, 100), (100, 100))])
def test_conv2d_winograd_form_equals_xla(winograd_everywhere, padding):
    """The "winograd" form of `conv2d` under differentiation: forward and
    gradients equal XLA's (and NumPy's) to float32 rounding; without
    differentiation the forward is XLA's own, bit for bit."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 6, 7)), jnp.float32)
    hp = lax.Precision.HIGHEST
    xla = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), padding,  # noqa: E731
                                                dimension_numbers=DIMS, precision=hp)
    np.testing.assert_array_equal(np.asarray(conv2d(x, w, padding, hp, "winograd")),
                                  np.asarray(xla(x, w)))
    y, pull = jax.vjp(lambda a, b: conv2d(a, b, padding, hp, "winograd"), x, w)
    y_xla, pull_xla = jax.vjp(xla, x, w)
    assert _rel_err(y, y_xla) < 2e-6
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(jax.jit(pull)(g), pull_xla(g)):
        assert _rel_err(got, want) < 2e-6


def test_conv2d_winograd_form_falls_back_where_it_does_not_pay():
    """Below the line (`pays` false) the "winograd" form is "taps": the
    training forward is XLA's convolution itself."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    pad = ((1, 1), (1, 1))
    assert not conv._winograd_here(x, w, pad, "winograd")
    y_w, _ = jax.vjp(lambda a, b: conv2d(a, b, pad, None, "winograd"), x, w)
    y_t, _ = jax.vjp(lambda a, b: conv2d(a, b, pad, None, "taps"), x, w)
    np.testing.assert_array_equal(np.asarray(y_w), np.asarray(y_t))


def test_conv2d_winograd_in_switch_branch(winograd_everywhere):
    """The fine network trains inside lax.switch: the same gradient there."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(1, 8, 7, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(w, x, i):
        branches = [lambda w, x, s=s: jnp.sum(jnp.sin(s * conv2d(x, w, pad, None, "winograd")))
                    for s in (1., 2.)]
        return lax.switch(i, branches, w, x)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x, 1)
    want = jax.grad(lambda w, x: jnp.sum(jnp.sin(2. * lax.conv_general_dilated(
        x, w, (1, 1), pad, dimension_numbers=DIMS))), argnums=(0, 1))(w, x)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-5
