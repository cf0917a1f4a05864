"""Saliency transformation: size, reference init, a NumPy forward, gradients, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.checks import InputError
from stnjax.models.saliency import Saliency, apply_saliency


def _key(seed):
    return jax.random.key(seed, impl="rbg")


def np_conv_same(x, w, b):
    """NHWC x HWIO cross-correlation with zero 'SAME' padding (odd kernels)."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
    return np.einsum("nhwcij,ijco->nhwo", win, w) + b


@pytest.mark.parametrize("ks", [(1,), (3,), (5,), (7,), (3, 5)])
def test_shape_preserving_and_reference_init(ks):
    model = Saliency(kernel_sizes=ks)
    prob = jax.random.uniform(_key(1), (2, 9, 14, 3))
    params = jax.jit(model.init)(_key(0), prob)
    w = jax.jit(model.apply)(params, prob)
    assert w.shape == prob.shape and w.dtype == jnp.float32
    # Last layer zero weights, bias (1, 1.5, 2): g(p) is that constant per channel.
    np.testing.assert_array_equal(np.asarray(w), np.broadcast_to([1.0, 1.5, 2.0], w.shape))
    image = jax.random.uniform(_key(2), prob.shape)
    np.testing.assert_array_equal(
        np.asarray(apply_saliency(w, image)),
        np.asarray(image) * np.array([1.0, 1.5, 2.0], np.float32))
    p = params["params"]
    assert sorted(p) == [f"saliency{i + 1}" for i in range(len(ks))]
    assert p[f"saliency{len(ks)}"]["kernel"].shape == (ks[-1], ks[-1], 3, 3)
    if len(ks) == 2:
        assert sum(a.size for a in jax.tree.leaves(params)) == 312  # the reference's count
        np.testing.assert_array_equal(np.asarray(p["saliency1"]["bias"]), 1.0)


def test_first_layer_is_xavier_normal():
    model = Saliency(kernel_sizes=(7, 5), channels=16, last_bias=(1.0,) * 16)
    k = np.asarray(jax.jit(model.init)(_key(3), jnp.zeros((1, 8, 8, 16)))
                   ["params"]["saliency1"]["kernel"])
    want = math.sqrt(2.0 / (16 * 49 + 16 * 49))  # PyTorch fans: channels * receptive field
    assert abs(k.std() / want - 1) < 0.05
    assert np.abs(k).max() > 2.5 * want  # plain normal, not truncated at 2 std


def test_forward_matches_numpy_and_gradient_reaches_probabilities():
    model = Saliency()
    rng = np.random.default_rng(0)
    prob = rng.uniform(size=(2, 7, 6, 3)).astype(np.float32)
    params = jax.jit(model.init)(_key(0), prob)
    # Non-zero last layer so the output depends on the input.
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    p = {n: {k: np.asarray(v, np.float64) for k, v in d.items()} for n, d in params["params"].items()}
    h = np.maximum(np_conv_same(prob.astype(np.float64), p["saliency1"]["kernel"],
                                p["saliency1"]["bias"]), 0)
    want = np_conv_same(h, p["saliency2"]["kernel"], p["saliency2"]["bias"])
    np.testing.assert_allclose(np.asarray(model.apply(params, prob)), want, rtol=1e-5, atol=1e-5)
    image = jnp.asarray(rng.uniform(size=prob.shape), jnp.float32)
    g = jax.jit(jax.grad(lambda q: apply_saliency(model.apply(params, q), image).sum()))(
        jnp.asarray(prob))
    assert g.shape == prob.shape and np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("ks", [(2,), (4, 5), (9,), (3, 5, 3), (), (3.0,)])
def test_bad_kernel_size_errors(ks):
    with pytest.raises(InputError, match="kernel_sizes"):
        Saliency(kernel_sizes=ks).init(_key(0), jnp.zeros((1, 4, 4, 3)))


def test_bad_input_errors():
    model = Saliency()
    params = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4, 4, 3)))
    for bad, match in [(jnp.zeros((4, 4, 3)), "rank 4"), (jnp.zeros((1, 4, 4, 2)), "channels"),
                       (jnp.zeros((1, 4, 4, 3), jnp.int32), "dtype")]:
        with pytest.raises(InputError, match=match):
            model.apply(params, bad)
    with pytest.raises(InputError, match="last_bias"):
        Saliency(last_bias=(1.0, 2.0)).init(_key(0), jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(InputError, match="differs"):
        apply_saliency(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 5, 3)))


def _trained(model, seed=3):
    """Params with a nonzero (as if trained) last layer, and first-layer
    biases that make relu(bias) > 0 on zero input (the padding problem)."""
    params = model.init(_key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    k1, k2 = jax.random.split(_key(seed))
    last = params["saliency2"]
    params = {"saliency1": dict(params["saliency1"], bias=jnp.asarray([0.7, 1.1, 0.4])),
              "saliency2": dict(last, kernel=0.4 * jax.random.normal(k2, last["kernel"].shape))}
    return {"params": params}


def test_padding_does_not_change_the_weights_inside_with_valid_hw():
    """A slice padded to a bucket (its padded coarse map at 0.5, as a
    sigmoid(0) coarse head gives there) gets, inside its real size, exactly
    the weights of the unpadded slice, with a trained last layer; without
    valid_hw the last rows and columns differ (the bug this guards)."""
    model = Saliency()
    variables = _trained(model)
    rng = np.random.default_rng(0)
    h, w, hb, wb = 20, 23, 32, 32
    prob = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
    padded = np.full((1, hb, wb, 3), 0.5, np.float32)
    padded[:, :h, :w] = prob
    want = np.asarray(model.apply(variables, jnp.asarray(prob)))
    got = np.asarray(model.apply(variables, jnp.asarray(padded),
                                 jnp.asarray([[h, w]], jnp.int32)))
    np.testing.assert_allclose(got[:, :h, :w], want, rtol=1e-6, atol=1e-6)
    assert not got[:, h:].any() and not got[:, :, w:].any()
    unmasked = np.asarray(model.apply(variables, jnp.asarray(padded)))
    border = np.abs(unmasked[:, :h, :w] - want)
    assert border[:, h - 2:].max() > 1e-2 and border[:, :h - 4, :w - 4].max() < 1e-6
    # A NumPy forward of the unpadded slice agrees (zero 'SAME' padding).
    p = variables["params"]
    h1 = np.maximum(np_conv_same(prob, np.asarray(p["saliency1"]["kernel"]),
                                 np.asarray(p["saliency1"]["bias"])), 0)
    ref = np_conv_same(h1, np.asarray(p["saliency2"]["kernel"]), np.asarray(p["saliency2"]["bias"]))
    np.testing.assert_allclose(got[:, :h, :w], ref, rtol=1e-5, atol=1e-5)
