"""FCN8s with `valid_hw`: a padded input equals the lone run of its content.

The reference for every check is the same network applied to the unpadded
(h, w) image alone (what the Caffe / PyTorch reference does: each slice or
crop at its exact size, batch 1). Parameters are He-normal kernels with
RANDOM biases (std 0.1): with zero biases the zero padding would mostly stay
zero and hide the differences. The extents themselves are checked against
the layer shapes of the lone run (jax.eval_shape, nothing compiled).

Width 1/16 (channels 4 ... 32, fc 256); one padded (70, 45) batch per
variant; keys are 'rbg' (fast to compile on CPU).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.checks import InputError
from stnjax.models.fcn8s import FCN8s, fcn8s_extents, mask_to_extent

SMALL = 1 / 16
PADDED = (70, 45)
# Per-sample content sizes inside the padded (70, 45) canvas: h = 1, odd and
# even, both sides of 32 and 64, the full canvas, and an empty sample.
SIZES = np.array([[1, 45], [33, 31], [64, 2], [65, 32], [70, 45], [0, 7]], np.int32)


def _params(model, seed=0):
    """He-normal kernels and random biases (std 0.1 on every bias), NumPy-drawn."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))

    def fill(path, s):
        if path[-1].key == "scale":  # a norm's scale (norm="group"): around 1
            return jnp.asarray(1 + rng.normal(0, 0.1, s.shape), jnp.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(rng.normal(0, math.sqrt(2 / math.prod(s.shape[:3])), s.shape),
                               jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(seed=1):
    """(zero-padded, junk-padded) batches with the same content in SIZES."""
    rng = np.random.default_rng(seed)
    junk = rng.uniform(0, 1, (len(SIZES), *PADDED, 3)).astype(np.float32)
    zero = junk.copy()
    for i, (h, w) in enumerate(SIZES):
        zero[i, h:] = 0
        zero[i, :, w:] = 0
    return zero, junk


# ---------------------------------------------------------------- extents

@pytest.mark.parametrize("variant", ["reference", "pad32"])
def test_extents_equal_lone_run_layer_shapes(variant):
    """fcn8s_extents vs the conv output shapes of the network run on n x m alone."""
    model = FCN8s(width=SMALL, variant=variant)
    params = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    stage_of = {"conv1_1": "conv1", "conv2_2": "conv2", "conv3_1": "conv3",
                "conv4_3": "conv4", "conv5_2": "conv5", "score_pool3": "pool3",
                "score_pool4": "pool4", "fc6": "fc6", "fc7": "fc6", "score_fr": "fc6"}
    for hw in [(1, 2), (31, 32), (33, 64), (65, 100), (130, 7)]:
        _, state = jax.eval_shape(
            lambda p, x: model.apply(p, x, capture_intermediates=True, mutable=["intermediates"]),
            params, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
        ext = fcn8s_extents(np.array(hw), variant)
        for layer, stage in stage_of.items():
            got = state["intermediates"][layer]["__call__"][0].shape[1:3]
            assert tuple(ext[stage]) == got, (variant, hw, layer)
        assert tuple(ext["output"]) == hw
    # The fused maps: the lone run's upsampling input sizes, by hand for 1 x 1.
    one = fcn8s_extents(np.array([1, 1]), variant)
    want = {"reference": (7, 1, 4, 10), "pad32": (1, 1, 2, 4)}[variant]
    assert (int(one["pool5"][0]), int(one["fc6"][0]), int(one["fuse4"][0]),
            int(one["fuse3"][0])) == want


def test_mask_to_extent_by_hand():
    x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2) + 1
    got = np.asarray(mask_to_extent(x, jnp.array([[2, 3], [0, 4]])))
    want = np.asarray(x).copy()
    want[0, 2:] = 0
    want[0, :, 3:] = 0
    want[1] = 0
    np.testing.assert_array_equal(got, want)
    nan = jnp.full((1, 2, 2, 1), jnp.nan, jnp.bfloat16)  # a select: no NaN leaks
    out = mask_to_extent(nan, jnp.array([[1, 1]]))
    assert out.dtype == jnp.bfloat16 and np.isnan(float(out[0, 0, 0, 0]))
    assert np.all(np.asarray(out[0, 1:], np.float32) == 0)


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("variant,norm", [("reference", "none"), ("pad32", "none"),
                                          ("pad32", "group")])
def test_padded_with_valid_hw_equals_lone_runs(variant, norm):
    """Inside (h, w): padded + valid_hw == lone run (1e-5); 0 beyond; without
    valid_hw the zero-padded batch differs (the test is meaningful). With
    GroupNorm the statistics must come from the lone run's positions only
    (and from each sample alone: the lone run is a batch of one)."""
    model = FCN8s(width=SMALL, variant=variant, norm=norm)
    params = _params(model)
    apply = jax.jit(model.apply)          # shape-polymorphic: one trace per shape
    zero, junk = _images()
    hw = jnp.asarray(SIZES)               # traced under jit
    masked = np.asarray(apply(params, zero, valid_hw=hw))
    masked_junk = np.asarray(apply(params, junk, valid_hw=hw))  # same compile
    plain = np.asarray(apply(params, zero))
    worst_plain = 0.0
    for i, (h, w) in enumerate(SIZES):
        beyond = np.ones(PADDED, bool)
        beyond[:h, :w] = False
        assert np.all(masked[i][beyond] == 0) and np.all(masked_junk[i][beyond] == 0)
        if h == 0:
            continue
        if (h, w) == PADDED:  # the whole canvas: the lone run is the plain one
            np.testing.assert_allclose(masked[i], plain[i], atol=1e-5, rtol=0)
            continue
        lone = np.asarray(apply(params, zero[i:i + 1, :h, :w]))[0]
        scale = np.abs(lone).max()
        assert scale > 0.1, (h, w)                     # a non-trivial output
        tol = 1e-5
        np.testing.assert_allclose(masked[i, :h, :w], lone, atol=tol, rtol=0,
                                   err_msg=f"{variant} {norm} {h}x{w}")
        np.testing.assert_allclose(masked_junk[i, :h, :w], lone, atol=tol, rtol=0)
        worst_plain = max(worst_plain, np.abs(plain[i, :h, :w] - lone).max() / scale)
    assert worst_plain > 1e-2, worst_plain  # measured worst: 3.4 % reference, 41 % pad32


def test_gradients_equal_lone_runs_and_vanish_beyond():
    """d(loss on the real region) / d(x, params): padded + valid_hw vs lone
    run. Nothing beyond (h, w) gets gradient, and the parameter gradient is
    the lone run's (so nothing beyond the extents contributes). The second
    sample is empty (h = 0): no gradient at all. Reference variant (ceil
    pooling with windows across the extent); two grad compiles."""
    model = FCN8s(width=SMALL, variant="reference")
    params = _params(model, seed=3)
    sizes = np.array([[33, 20], [0, 45]], np.int32)
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (2, 40, 45, 3)).astype(np.float32)
    cot = rng.normal(size=(2, 40, 45, 3)).astype(np.float32)
    region = np.zeros((2, 40, 45, 1), np.float32)
    for i, (h, w) in enumerate(sizes):
        region[i, :h, :w] = 1

    @jax.jit
    def padded_grad(p, x, hw):
        return jax.grad(lambda p, x: jnp.sum(model.apply(p, x, valid_hw=hw) * cot * region),
                        argnums=(0, 1))(p, x)

    @jax.jit
    def lone_grad(p, x, c):
        return jax.grad(lambda p, x: jnp.sum(model.apply(p, x) * c), argnums=(0, 1))(p, x)

    gp, gx = padded_grad(params, x, jnp.asarray(sizes))
    gx = np.asarray(gx)
    h, w = sizes[0]
    want_p, lx = lone_grad(params, x[:1, :h, :w], cot[:1, :h, :w])
    lx = np.asarray(lx)[0]
    assert np.abs(lx).max() > 1e-3
    np.testing.assert_allclose(gx[0, :h, :w], lx, atol=1e-5 * np.abs(lx).max())
    assert np.all(gx[0, h:] == 0) and np.all(gx[0, :, w:] == 0) and np.all(gx[1] == 0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(want_p)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                   err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- cost, errors

@pytest.mark.parametrize("variant", ["reference", "pad32"])
def test_no_valid_hw_adds_no_op_and_masks_are_selects(variant):
    """valid_hw=None traces today's graph (no select); with valid_hw, one
    select per masked map: 13 convs + score_fr + 2 fused + input + output."""
    model = FCN8s(width=SMALL, variant=variant)
    params = _params(model)
    x = jnp.zeros((2, 40, 36, 3))
    plain = jax.make_jaxpr(model.apply)(params, x)
    masked = jax.make_jaxpr(lambda p, x, v: model.apply(p, x, valid_hw=v))(
        params, x, jnp.ones((2, 2), jnp.int32))

    def count(jaxpr, name):  # through nested jaxprs (jnp.where is a jit)
        n = 0
        for e in jaxpr.eqns:  # rank-4 selects only (the extents use some too)
            n += e.primitive.name == name and e.outvars[0].aval.ndim == 4
            for v in e.params.values():
                sub = getattr(v, "jaxpr", v)
                if hasattr(sub, "eqns"):
                    n += count(sub, name)
        return n
    plain, masked = plain.jaxpr, masked.jaxpr
    assert count(plain, "select_n") == 0
    assert count(masked, "select_n") == 18
    assert count(plain, "conv_general_dilated") == count(masked, "conv_general_dilated")


def test_bad_valid_hw_errors():
    model = FCN8s(width=SMALL, variant="pad32")
    params = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                            jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    x = jax.ShapeDtypeStruct((2, 20, 30, 3), jnp.float32)
    for bad, match in [(np.ones((2,), np.int32), "rank 2"),
                       (np.ones((3, 2), np.int32), r"shape \(2, 2\)"),
                       (np.ones((2, 2), np.float32), "dtype"),
                       (np.array([[20, 30], [21, 5]], np.int32), r"\[0, 20\] x \[0, 30\]"),
                       (np.array([[-1, 3], [2, 5]], np.int32), "valid_hw")]:
        with pytest.raises(InputError, match=match):
            jax.eval_shape(lambda p, x: model.apply(p, x, valid_hw=bad), params, x)
    with pytest.raises(InputError, match="variant"):
        fcn8s_extents(np.array([3, 3]), "pad16")
