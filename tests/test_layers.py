"""Layer primitives: the convolution with written-out gradients.

`conv.conv2d` must be XLA's convolution in the forward, bit for bit, and
give the gradients of a stride-1 convolution in both forms ("taps",
"im2col"): checked against a float64 NumPy reference written from the
definition and against XLA's own gradient, with padding (the reference's
100-pixel conv1_1 pad included), maps smaller than the kernel (fc6 on
pool5), inside a `lax.switch` branch, and through the whole FCN-8s.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stnjax.checks import InputError
from stnjax.models.fcn8s import FCN8s
from stnjax.models import conv
from stnjax.models import winograd
from stnjax.models.conv import DIMS, Conv2D, conv2d


def np_conv_grads(x, w, g):
    """d/dx and d/dw of sum(conv_valid(x, w) * g), float64, from the definition:
    y[n, h, v, o] = sum_{i, j, c} x[n, h + i, v + j, c] w[i, j, c, o]."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    kh, kw = w.shape[:2]
    ho, wo = g.shape[1:3]
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            dw[i, j] = np.einsum("nhvc,nhvo->co", x[:, i:i + ho, j:j + wo], g)
            dx[:, i:i + ho, j:j + wo] += np.einsum("nhvo,co->nhvc", g, w[i, j])
    return dx, dw


def winograd_for_every_3x3(monkeypatch):
    """Every 3 x 3 float32 convolution qualifies for Winograd (`winograd.pays`),
    so tests at small sizes run it."""
    for name in ("MIN_OUT_CHANNELS", "MIN_IN_CHANNELS", "MIN_PIXELS"):
        monkeypatch.setattr(winograd, name, 1)


def _xla_conv(x, w, padding="VALID"):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DIMS,
                                    precision=lax.Precision.HIGHEST)


CASES = [
    ((1, 9, 9, 5), (7, 7, 5, 6), "VALID"),             # 3 x 3 output: fc6 on pool5
    ((2, 7, 10, 4), (7, 7, 4, 3), "VALID"),            # 1 x 4 output, batch 2, not square
    ((2, 12, 11, 3), (3, 5, 3, 8), ((1, 2), (0, 3))),  # uneven padding, non-square kernel
    ((1, 5, 6, 3), (3, 3, 3, 4), ((9, 9), (9, 9))),    # padding >> kernel (conv1_1's 100)
    ((2, 6, 6, 7), (1, 1, 7, 5), "VALID"),             # 1 x 1 (score heads)
    # Fewer rows (N Ho Wo) than output channels: the kernel gradient is
    # written the other way round (fc7 on pool5-sized maps).
    ((1, 3, 2, 9), (1, 1, 9, 40), "VALID"),            # 1 x 1, 6 rows < 40 (fc7)
    ((2, 4, 4, 3), (3, 3, 3, 16), "VALID"),            # 3 x 3, 8 rows < 16
]


LARGE_MAP = ((2, 88, 86, 3), (3, 3, 3, 5), ((1, 1), (1, 1)))
# The row loop ROW_UNROLL rows an iteration (full-width layers): row counts
# that ROW_UNROLL divides (88) and does not (3, 13, 21).
UNROLLED = [CASES[0], CASES[2], CASES[3], LARGE_MAP]


FORMS = [(f, *c) for f in ("taps", "taps-rows", "im2col") for c in CASES + [LARGE_MAP]]


@pytest.mark.parametrize("form,xs,ws,padding",
                         FORMS + [("taps-unrolled", *c) for c in UNROLLED])
def test_conv2d_grad_matches_numpy_and_xla(xs, ws, padding, form, monkeypatch):
    # "taps-rows": every kernel gradient through the CPU row loop
    # (`conv._dw_rows`); "taps-unrolled": the same loop with unrolling
    # forced on; "taps": through whole-map products, except on maps of at
    # least ROW_LOOP_MIN_PIXELS (the last case), as the library runs.
    if form in ("taps-rows", "taps-unrolled"):
        monkeypatch.setattr(conv, "ROW_LOOP_MIN_PIXELS", 1)
        if form == "taps-unrolled":
            monkeypatch.setattr(conv, "ROW_UNROLL_MIN_MACS", 1)
        form = "taps"
    elif form == "taps" and xs[1] * xs[2] < conv.ROW_LOOP_MIN_PIXELS:
        monkeypatch.setattr(conv, "ROW_LOOP_MIN_PIXELS", 10**9)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    w = jnp.asarray(rng.normal(size=ws), jnp.float32)
    hp = lax.Precision.HIGHEST
    y = conv2d(x, w, padding, hp, form)
    if form == "taps":  # XLA's convolution itself
        np.testing.assert_array_equal(np.asarray(y), np.asarray(_xla_conv(x, w, padding)))
    else:               # a matrix product: another summation order
        np.testing.assert_allclose(np.asarray(y), np.asarray(_xla_conv(x, w, padding)),
                                   rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dw = jax.jit(lambda x, w, g: jax.vjp(lambda a, b: conv2d(a, b, padding, hp, form),
                                             x, w)[1](g))(x, w, g)
    (t, b), (l, r) = ((0, 0), (0, 0)) if padding == "VALID" else padding
    xp = np.pad(np.asarray(x), ((0, 0), (t, b), (l, r), (0, 0)))
    want_dxp, want_dw = np_conv_grads(xp, w, g)
    want_dx = want_dxp[:, t:xp.shape[1] - b, l:xp.shape[2] - r]
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-4)
    xla_dx, xla_dw = jax.vjp(lambda a, b: _xla_conv(a, b, padding), x, w)[1](g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(xla_dx), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(xla_dw), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", ["taps", "im2col"])
def test_conv2d_grad_bfloat16_close_to_float32(form):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 9, 9, 8)).astype(np.float32)
    w = rng.normal(size=(7, 7, 8, 4)).astype(np.float32) / 20
    g = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
    dx, dw = jax.vjp(lambda a, b: conv2d(a, b, "VALID", None, form),
                     jnp.asarray(x, jnp.bfloat16),
                     jnp.asarray(w, jnp.bfloat16))[1](jnp.asarray(g, jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    want_dx, want_dw = np_conv_grads(x, w, g)
    for got, want in ((dx, want_dx), (dw, want_dw)):
        err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
        assert err < 2e-2, err


def test_conv2d_in_switch_branch_equals_plain():
    """The fine network trains inside lax.switch: the same gradient there."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(w, x, i):
        branches = [lambda w, x, s=s: jnp.sum(jnp.sin(s * conv2d(x, w, pad))) for s in (1., 2.)]
        return jax.lax.switch(i, branches, w, x)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x, 1)
    want = jax.grad(lambda w, x: jnp.sum(jnp.sin(2. * _xla_conv(x, w, pad))), argnums=(0, 1))(w, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["taps", "im2col"])
def test_conv2d_module_custom_equals_xla_with_padding(form):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)), jnp.float32)
    pad = ((3, 3), (3, 3))
    fast = Conv2D(4, 7, pad, grad=form, precision=lax.Precision.HIGHEST)
    slow = Conv2D(4, 7, pad, grad="xla", precision=lax.Precision.HIGHEST)
    params = slow.init(jax.random.key(0), x)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    np.testing.assert_allclose(np.asarray(fast.apply(params, x)),
                               np.asarray(slow.apply(params, x)), rtol=1e-6, atol=1e-6)
    got = jax.grad(loss(fast), argnums=(0, 1))(params, x)
    want = jax.grad(loss(slow), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_conv2d_custom_rejects_same_padding_and_bad_grad():
    x = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(InputError, match="'VALID' or explicit padding"):
        Conv2D(3, 3, "SAME", grad="taps").init(jax.random.key(0), x)
    with pytest.raises(InputError, match="Conv2D.grad"):
        Conv2D(3, 3, "SAME", grad="fast").init(jax.random.key(0), x)
    with pytest.raises(InputError, match="conv_grad"):
        FCN8s(width=1 / 16, conv_grad="fast").init(jax.random.key(0), x[..., :1].repeat(3, -1))


def _np_params(model, x):
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def fill(path, s):
        if path[-1].key == "kernel":
            fan_in = s.shape[0] * s.shape[1] * s.shape[2]
            return jnp.asarray(rng.normal(0, math.sqrt(2 / fan_in), s.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def fcn_value_and_grads(net, params, x, hw):
    """((sum sin(logits), logits), (d params, d x)) of a training forward
    with dropout (a fixed key) and the extent `hw`."""
    def loss(p, x):
        y = net.apply(p, x, train=True, valid_hw=hw, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("variant,size,winograd", [("reference", 40, True), ("pad32", 40, False)])
def test_fcn8s_gradients_equal_for_both_conv_grads(variant, size, winograd, monkeypatch):
    """The whole network, with dropout and a padded extent: the same forward
    and the same gradients (params and input) with custom or XLA gradients.
    `winograd`: every 3 x 3 layer but conv1_1 through Winograd (at this
    width none qualifies by itself), beside im2col (conv1_1, fc6) and taps
    (1 x 1); else taps for the 3 x 3 layers."""
    if winograd:
        winograd_for_every_3x3(monkeypatch)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((2, size, size, 3)), jnp.float32)
    hw = jnp.asarray([[size, size], [size - 7, size - 12]], jnp.int32)
    nets = {g: FCN8s(width=1 / 16, variant=variant, conv_grad=g) for g in ("custom", "xla")}
    params = _np_params(nets["xla"], x)
    out = {}
    for g, net in nets.items():
        (_, y), grads = fcn_value_and_grads(net, params, x, hw)
        out[g] = (y, grads)
    np.testing.assert_allclose(np.asarray(out["custom"][0]), np.asarray(out["xla"][0]),
                               rtol=1e-5, atol=1e-5)
    flat_g = jax.tree_util.tree_leaves_with_path(out["custom"][1])
    flat_x = jax.tree.leaves(out["xla"][1])
    for (path, a), b in zip(flat_g, flat_x):
        scale = max(float(np.abs(np.asarray(b)).max()), 1e-12)
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
