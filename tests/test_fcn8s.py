"""FCN-8s: shapes, parameter count, exact upsampling and pooling, a NumPy
forward pass, dropout, bfloat16, jit, bad input.

Full-width networks are only traced (jax.eval_shape). Real runs use width
1/16 (channels 4 ... 32, fc 256). Params for real runs are drawn with NumPy
(no PRNG compile); keys are 'rbg' keys, which compile much faster on CPU
than threefry.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.checks import InputError
from stnjax.models.fcn8s import (BODY_LAYERS, HEAD_LAYERS, FCN8s, bilinear_kernel,
                                 fcn8s_layer_shapes, max_pool_ceil, max_pool_ceil_window,
                                 upsample_bilinear)

SMALL = 1 / 16
REFERENCE_COUNTS = {  # trainable values per layer group, reference section 2.1
    "vgg": 14_714_688, "fc6": 102_764_544, "fc7": 16_781_312,
    "score_fr": 12_291, "score_pool4": 1_539, "score_pool3": 771}


def _key(seed):
    return jax.random.key(seed, impl="rbg")


def _shapes(model, x_shape):
    return jax.eval_shape(model.init, _key(0), jax.ShapeDtypeStruct(x_shape, jnp.float32))


def _np_params(model, x_shape, seed=0):
    """He-normal kernels and small random biases drawn with NumPy."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if path[-1].key == "kernel":
            fan_in = s.shape[0] * s.shape[1] * s.shape[2]
            return jnp.asarray(rng.normal(0, math.sqrt(2 / fan_in), s.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, _shapes(model, x_shape))


# ---------------------------------------------------------------- NumPy reference

def np_conv(x, w, b, pad):
    """Cross-correlation, NCHW x OIHW (PyTorch Conv2d), zero padding `pad`."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def np_pool_ceil(x):
    n, c, h, w = x.shape
    oh, ow = -(-h // 2), -(-w // 2)
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(2, 3))
    return out


def np_conv_transpose(x, kernel, s):
    """Transposed conv by scatter-add: y[s*i + a, s*j + b] += x[i, j] * K[a, b]."""
    n, c, h, w = x.shape
    k = kernel.shape[0]
    y = np.zeros((n, c, (h - 1) * s + k, (w - 1) * s + k), np.float64)
    for i in range(h):
        for j in range(w):
            y[:, :, s * i:s * i + k, s * j:s * j + k] += x[:, :, i, j, None, None] * kernel
    return y


def np_fcn8s(params, x_nhwc, variant):
    """The FCN-8s forward in PyTorch layout (NCHW, OIHW), float64, no dropout."""
    p = {n: (np.asarray(v["kernel"], np.float64).transpose(3, 2, 0, 1),
             np.asarray(v["bias"], np.float64)) for n, v in params["params"].items()}
    x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
    H, W = x.shape[2:]
    ref = variant == "reference"
    if not ref:
        x = np.pad(x, ((0, 0), (0, 0), (0, -H % 32), (0, -W % 32)))
    h, pools = x, []
    for name in BODY_LAYERS[:-2]:
        pad = 100 if (ref and name == "conv1_1") else 1
        h = np.maximum(np_conv(h, *p[name], pad), 0)
        if name in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"):
            h = np_pool_ceil(h)
            pools.append(h)
    h = np.maximum(np_conv(h, *p["fc6"], 0 if ref else 3), 0)
    h = np.maximum(np_conv(h, *p["fc7"], 0), 0)
    sfr = np_conv(h, *p["score_fr"], 0)
    sp4 = np_conv(pools[3], *p["score_pool4"], 0)
    sp3 = np_conv(pools[2], *p["score_pool3"], 0)
    k4, k16 = bilinear_kernel(4), bilinear_kernel(16)
    if ref:
        u = np_conv_transpose(sfr, k4, 2)
        u = u + sp4[:, :, 5:5 + u.shape[2], 5:5 + u.shape[3]]
        u = np_conv_transpose(u, k4, 2)
        u = u + sp3[:, :, 9:9 + u.shape[2], 9:9 + u.shape[3]]
        u = np_conv_transpose(u, k16, 8)[:, :, 31:31 + H, 31:31 + W]
    else:
        u = np_conv_transpose(sfr, k4, 2)[:, :, 1:-1, 1:-1] + sp4
        u = np_conv_transpose(u, k4, 2)[:, :, 1:-1, 1:-1] + sp3
        u = np_conv_transpose(u, k16, 8)[:, :, 4:-4, 4:-4][:, :, :H, :W]
    return u.transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- full size

@pytest.mark.parametrize("variant", ["reference", "pad32"])
@pytest.mark.parametrize("hw", [(512, 512), (512, 206)])
def test_full_size_shapes_and_parameter_count(variant, hw):
    model = FCN8s(variant=variant)
    shapes = _shapes(model, (1, *hw, 3))
    out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
    assert out.shape == (2, *hw, 3) and out.dtype == jnp.float32
    tree = shapes["params"]
    assert set(tree) == set(BODY_LAYERS) | set(HEAD_LAYERS)  # no upscore* params
    size = {n: sum(math.prod(a.shape) for a in v.values()) for n, v in tree.items()}
    groups = {"vgg": sum(v for n, v in size.items() if n.startswith("conv")),
              **{n: size[n] for n in ("fc6", "fc7", *HEAD_LAYERS)}}
    assert groups == REFERENCE_COUNTS
    assert sum(size.values()) == 134_275_145
    assert tree["fc6"]["kernel"].shape == (7, 7, 512, 4096)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
    # bf16 compute keeps float32 params and float32 logits.
    outb = jax.eval_shape(FCN8s(variant=variant, dtype=jnp.bfloat16).apply, shapes,
                          jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
    assert outb.dtype == jnp.float32


def test_pad32_flop_saving_at_96():
    """The documented ratio: XLA cost analysis of the lowered full-width nets."""
    x = jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32)
    flops = {}
    for variant in ("reference", "pad32"):
        for grad in ("xla", "custom"):
            model = FCN8s(variant=variant, conv_grad=grad)
            cost = jax.jit(model.apply).lower(_shapes(model, x.shape), x).cost_analysis()
            if not cost:
                pytest.skip("this backend gives no cost analysis before compiling (CPU does)")
            flops[variant, grad] = cost["flops"]
    # With XLA's convolutions the count skips taps that fall on padding.
    assert 55e9 < flops["reference", "xla"] < 57e9
    assert 9.0 < flops["reference", "xla"] / flops["pad32", "xla"] < 10.0
    # Without differentiation the custom-gradient convolutions are XLA's own.
    assert flops["reference", "custom"] == flops["reference", "xla"]
    assert flops["pad32", "custom"] == flops["pad32", "xla"]


def test_layer_shapes_follow_width_rule():
    s = fcn8s_layer_shapes(SMALL, num_outputs=2, in_channels=5)
    assert s["conv1_1"][0] == (3, 3, 5, 4) and s["conv5_3"][0] == (3, 3, 32, 32)
    assert s["fc6"][0] == (7, 7, 32, 256) and s["score_pool3"][0] == (1, 1, 16, 2)
    assert fcn8s_layer_shapes(0.001)["conv1_1"][0][-1] == 1  # max(1, round(c * w))


# ---------------------------------------------------------------- output size

SIZES = [1, 2, 3, 7, 31, 32, 33, 64, 65, 100]


@pytest.mark.parametrize("variant", ["reference", "pad32"])
def test_output_size_equals_input_size(variant):
    model = FCN8s(width=SMALL, variant=variant)
    shapes = _shapes(model, (1, 8, 8, 3))
    for h, w in zip(SIZES, SIZES[::-1] + [1]):
        out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        assert out.shape == (1, h, w, 3), (h, w)


@pytest.mark.parametrize("variant,hw", [("reference", (1, 2)), ("reference", (13, 17)),
                                        ("pad32", (33, 31))])
def test_forward_matches_numpy_reference(variant, hw):
    model = FCN8s(width=SMALL, variant=variant)
    params = _np_params(model, (1, *hw, 3), seed=1)
    x = np.random.default_rng(2).uniform(0, 1, (1, *hw, 3)).astype(np.float32)
    got = np.asarray(jax.jit(model.apply)(params, x))
    want = np_fcn8s(params, x, variant)
    assert got.shape == (1, *hw, 3)
    scale = np.abs(want).max()
    assert scale > 1e-3  # a non-trivial output
    np.testing.assert_allclose(got, want, atol=2e-5 * scale + 1e-6, rtol=1e-4)


# ---------------------------------------------------------------- upsampling

def test_bilinear_kernel_values_by_hand():
    q = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_array_equal(bilinear_kernel(4), np.outer(q, q).astype(np.float32))
    e = np.array([1, 3, 5, 7, 9, 11, 13, 15, 15, 13, 11, 9, 7, 5, 3, 1]) / 16
    np.testing.assert_array_equal(bilinear_kernel(16), np.outer(e, e).astype(np.float32))
    t = np.array([0.5, 1.0, 0.5])  # odd k = 3: f = 2, c = 1
    np.testing.assert_array_equal(bilinear_kernel(3), np.outer(t, t).astype(np.float32))


@pytest.mark.parametrize("k,s", [(4, 2), (16, 8)])
def test_upsample_matches_numpy_scatter_add(k, s):
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 2)).astype(np.float32)
    got = np.asarray(upsample_bilinear(jnp.asarray(x), k, s))
    want = np_conv_transpose(x.transpose(0, 3, 1, 2), bilinear_kernel(k), s).transpose(0, 2, 3, 1)
    assert got.shape == (2, 4 * s + k, 2 * s + k, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)  # channels never mix
    crop = (3, 1, 2, 5)
    got_c = np.asarray(upsample_bilinear(jnp.asarray(x), k, s, crop))
    np.testing.assert_allclose(got_c, want[:, 3:want.shape[1] - 1, 2:want.shape[2] - 5], atol=1e-5)


@pytest.mark.parametrize("k,s", [(4, 2), (16, 8)])
def test_upsampled_constant_is_constant_in_interior(k, s):
    y = np.asarray(upsample_bilinear(jnp.full((1, 6, 5, 3), 2.5), k, s))
    b = k - s  # the first/last k - s outputs see fewer than k / s inputs
    np.testing.assert_allclose(y[:, b:-b, b:-b], 2.5, rtol=1e-6)
    assert y[0, 0, 0, 0] < 2.5


def test_upsampling_has_no_parameters_and_gradient_only_to_input():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 4, 3)), jnp.float32)
    g = jax.grad(lambda x: upsample_bilinear(x, 4, 2).sum())(x)
    # d(sum)/dx = sum of the kernel = 4 for k4 s2 (each 1-D factor sums to 2).
    np.testing.assert_allclose(np.asarray(g), 4.0, rtol=1e-6)
    model = FCN8s(width=SMALL, variant="pad32")
    params = _np_params(model, (1, 32, 32, 3))
    grads = jax.jit(jax.grad(lambda p: model.apply(p, jnp.ones((1, 32, 32, 3))).sum()))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # Under He init every trainable layer gets a gradient (jit, ceil pooling included).
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    assert not any("upscore" in n for n in params["params"])


# ---------------------------------------------------------------- pooling

def test_ceil_pooling_matches_numpy():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (5, 4), (6, 7), (9, 9)]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        got = np.asarray(max_pool_ceil(jnp.asarray(x)))
        want = np_pool_ceil(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(got, want)
    neg = -np.ones((1, 3, 3, 1), np.float32)  # edge windows take the valid max, not 0
    assert np.all(np.asarray(max_pool_ceil(jnp.asarray(neg))) == -1)


def np_pool_grad_first_max(x, g):
    """Caffe's max-pooling backward: each window's gradient goes to its first
    maximal element in row-major order (NHWC, 2x2 / 2, ceil mode)."""
    n, h, w, c = x.shape
    dx = np.zeros_like(x)
    for i in range(n):
        for k in range(c):
            for r in range(0, h, 2):
                for q in range(0, w, 2):
                    win = x[i, r:r + 2, q:q + 2, k]
                    a, b = np.unravel_index(np.argmax(win), win.shape)  # argmax: first max
                    dx[i, r + a, q + b, k] += g[i, r // 2, q // 2, k]
    return dx


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pooling_gradient_is_first_max_ties_included(dtype):
    """The reshape pooling's custom gradient equals Caffe's rule (NumPy) and
    XLA's select-and-scatter (the reduce_window form), bit for bit, on
    inputs full of ties (post-ReLU zeros, repeated integers) and odd sizes."""
    rng = np.random.default_rng(5)
    for h, w in [(1, 1), (5, 4), (6, 7), (9, 9), (2, 3)]:
        x = np.maximum(rng.integers(-3, 4, size=(2, h, w, 3)), 0).astype(np.float32)
        g = rng.normal(size=(2, (h + 1) // 2, (w + 1) // 2, 3)).astype(np.float32)
        xd, gd = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
        got = jax.jit(lambda v, t: jax.vjp(max_pool_ceil, v)[1](t)[0])(xd, gd)
        window = jax.vjp(max_pool_ceil_window, xd)[1](gd)[0]
        want = np_pool_grad_first_max(x, np.asarray(gd, np.float32))
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(window, np.float32))
        np.testing.assert_array_equal(np.asarray(max_pool_ceil(xd), np.float32),
                                      np.asarray(max_pool_ceil_window(xd), np.float32))


# ---------------------------------------------------------------- init, dropout, dtype, jit

def test_init_schemes():
    x = jnp.zeros((1, 32, 32, 3))
    p = jax.jit(FCN8s(width=SMALL, variant="pad32").init)(_key(0), x)["params"]
    assert all(np.all(np.asarray(v["bias"]) == 0) for v in p.values())
    for name in ("conv3_1", "conv5_3", "fc6", "fc7"):
        k = np.asarray(p[name]["kernel"])
        want = math.sqrt(2 / math.prod(k.shape[:3]))
        assert abs(k.std() / want - 1) < 0.1, name
    ref = FCN8s(width=SMALL, variant="pad32", init_scheme="reference")
    pr = jax.jit(ref.init)(_key(0), x)
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(pr))
    assert np.all(np.asarray(ref.apply(pr, x + 0.5)) == 0)  # zero heads: zero logits


def test_dropout_only_in_training():
    model = FCN8s(width=SMALL, variant="pad32")
    params = _np_params(model, (1, 32, 32, 3))
    x = jnp.asarray(np.random.default_rng(4).uniform(size=(1, 32, 32, 3)), jnp.float32)
    f = jax.jit(model.apply, static_argnames="train")
    a = f(params, x, train=False, rngs={"dropout": _key(1)})
    b = f(params, x, train=False, rngs={"dropout": _key(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(f(params, x)))
    t1 = f(params, x, train=True, rngs={"dropout": _key(1)})
    t1b = f(params, x, train=True, rngs={"dropout": _key(1)})
    t2 = f(params, x, train=True, rngs={"dropout": _key(2)})
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))
    assert not np.allclose(np.asarray(t1), np.asarray(a))
    with pytest.raises(InputError, match="dropout"):
        model.apply(params, x, train=True)


def test_bfloat16_close_to_float32_and_jit_agrees():
    hw = (40, 36)
    x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, *hw, 3)), jnp.float32)
    m32 = FCN8s(width=SMALL)
    params = _np_params(m32, (1, *hw, 3), seed=6)
    y32 = np.asarray(jax.jit(m32.apply)(params, x))
    eager = np.asarray(m32.apply(params, x))
    np.testing.assert_allclose(eager, y32, rtol=1e-5, atol=1e-5 * np.abs(y32).max())
    yb = jax.jit(FCN8s(width=SMALL, dtype=jnp.bfloat16).apply)(params, x)
    assert yb.dtype == jnp.float32
    err = np.abs(np.asarray(yb) - y32).max() / np.abs(y32).max()
    assert err < 0.05, err


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 3), np.float32), "rank 4"),
    (np.zeros((1, 8, 8, 3), np.int32), "dtype"),
    (np.zeros((1, 8, 8, 2), np.float32), "channels"),
    (np.zeros((1, 0, 8, 3), np.float32), "empty"),
])
def test_bad_input_errors(bad, match):
    model = FCN8s(width=SMALL, variant="pad32", in_channels=3)
    params = _shapes(FCN8s(width=SMALL, variant="pad32"), (1, 8, 8, 3))
    with pytest.raises(InputError, match=match):
        jax.eval_shape(model.apply, params, bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "pad16"}, "variant"), ({"init_scheme": "xavier"}, "init_scheme"),
    ({"dtype": jnp.float16}, "dtype"), ({"width": 0.0}, "width"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        jax.eval_shape(FCN8s(**kwargs).init, _key(0), jnp.zeros((1, 8, 8, 3)))
