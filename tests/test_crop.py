"""Tests for stnjax.models.crop: box rule, margins, canvas crop, paste back, buckets.

References are independent: the box rule is a plain NumPy loop over pixels,
crops are NumPy slices of the same box, the overflow window is computed by
hand, and the network equivalence runs the same conv function on a NumPy
variable-size crop.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.models import crop as C
from stnjax.checks import InputError


# --------------------------------------------------------------------------
# NumPy reference of the box rule (reference section 2.4), pixel loops
# --------------------------------------------------------------------------

def np_box(ref, margins, valid=None, threshold=0.5):
    h, w, c = ref.shape
    hv, wv = h, w
    if valid is not None:
        hv = sum(1 for i in range(h) if valid[i].any())
        wv = sum(1 for j in range(w) if valid[:, j].any())
    rows, cols = [], []
    for i in range(h):
        for j in range(w):
            if valid is not None and not valid[i, j]:
                continue
            if any(ref[i, j, k] >= threshold for k in range(c)):
                rows.append(i)
                cols.append(j)
    if not rows:
        return [0, hv, 0, wv], False
    top, bottom, left, right = (int(m) for m in margins)
    return [max(min(rows) - top, 0), min(max(rows) + bottom + 1, hv),
            max(min(cols) - left, 0), min(max(cols) + right + 1, wv)], True


def sparse_map(rng, h, w, c, density):
    ref = rng.random((h, w, c)).astype(np.float32) * 0.49
    hits = rng.random((h, w, c)) < density
    ref[hits] = rng.uniform(0.5, 1.0, hits.sum())
    return ref


def test_box_matches_numpy_on_random_batches():
    """Random maps (some empty), random margins and valid regions, per-sample
    boxes of a batch (vmapped) against the pixel-loop rule."""
    rng = np.random.default_rng(0)
    b, h, w, c = 12, 17, 23, 3
    refs = np.stack([sparse_map(rng, h, w, c, d) for d in
                     rng.choice([0.0, 0.002, 0.01, 0.05], size=b)])
    margins = rng.integers(0, 9, size=(b, 4)).astype(np.int32)
    valid = np.zeros((b, h, w), bool)
    sizes = np.zeros((b, 2), np.int32)
    for i in range(b):
        sizes[i] = rng.integers(5, h + 1), rng.integers(5, w + 1)
        valid[i, :sizes[i, 0], :sizes[i, 1]] = True
    boxes, ok = jax.jit(C.boxes_from_maps)(jnp.asarray(refs), jnp.asarray(margins),
                                           hw=jnp.asarray(sizes))
    boxes_nv, ok_nv = C.boxes_from_maps(jnp.asarray(refs), jnp.asarray(margins))
    assert boxes.dtype == jnp.int32 and boxes.shape == (b, 4)
    for i in range(b):
        want, want_ok = np_box(refs[i], margins[i], valid[i])
        assert list(np.asarray(boxes[i])) == want and bool(ok[i]) == want_ok
        want, want_ok = np_box(refs[i], margins[i])
        assert list(np.asarray(boxes_nv[i])) == want and bool(ok_nv[i]) == want_ok
    assert len({tuple(np.asarray(x)) for x in boxes}) > 3  # boxes differ per sample


def test_box_hand_cases():
    m20 = C.fixed_margins(20)
    ref = np.zeros((64, 80, 3), np.float32)
    ref[30, 40, 1] = 0.5                       # threshold is inclusive
    box, ok = C.box_from_map(jnp.asarray(ref), m20)
    assert list(np.asarray(box)) == [10, 51, 20, 61] and bool(ok)
    # union over channels; corners clamp to the image
    ref[0, 2, 0] = 1.0
    ref[63, 79, 2] = 0.9
    box, _ = C.box_from_map(jnp.asarray(ref), m20)
    assert list(np.asarray(box)) == [0, 64, 0, 80]
    # below threshold does not count; per-side margins [top, bottom, left, right]
    ref = np.full((64, 80, 3), 0.4999, np.float32)
    ref[30, 40, 0] = 0.7
    box, _ = C.box_from_map(jnp.asarray(ref), jnp.array([1, 2, 3, 4], jnp.int32))
    assert list(np.asarray(box)) == [29, 33, 37, 45]
    # empty map: whole image, flag False
    box, ok = C.box_from_map(jnp.zeros((64, 80, 3)), m20)
    assert list(np.asarray(box)) == [0, 64, 0, 80] and not bool(ok)


def test_box_real_size_ignores_padding_and_clamps():
    ref = np.zeros((32, 32, 3), np.float32)
    ref[25, 5, 0] = 1.0            # in the padding: ignored
    ref[18, 23, 1] = 1.0           # near the valid border: clamped to (20, 25)
    box, ok = C.box_from_map(jnp.asarray(ref), C.fixed_margins(4), hw=jnp.asarray([20, 25]))
    assert list(np.asarray(box)) == [14, 20, 19, 25] and bool(ok)
    ref[18, 23, 1] = 0.0
    box, ok = C.box_from_map(jnp.asarray(ref), C.fixed_margins(4), hw=jnp.asarray([20, 25]))
    assert list(np.asarray(box)) == [0, 20, 0, 25] and not bool(ok)


def test_extent_mask_matches_numpy():
    """extent_mask(hw, shape) is the top-left hw region, for one size and a batch."""
    m = np.asarray(C.extent_mask(jnp.asarray([3, 5]), (6, 7)))
    want = np.zeros((6, 7), bool)
    want[:3, :5] = True
    np.testing.assert_array_equal(m, want)
    sizes = np.array([[6, 7], [0, 0], [1, 2]], np.int32)
    got = np.asarray(C.extent_mask(jnp.asarray(sizes), (6, 7)))
    for i, (h, w) in enumerate(sizes):
        want = np.zeros((6, 7), bool)
        want[:h, :w] = True
        np.testing.assert_array_equal(got[i], want)


def test_box_with_fallback_sources():
    m = C.fixed_margins(2)
    pred = np.zeros((16, 16, 3), np.float32)
    label = np.zeros((16, 16, 3), np.float32)
    label[8, 8, 1] = 1.0
    pred[3, 4, 0] = 0.9
    box, src = C.box_with_fallback(jnp.asarray(pred), jnp.asarray(label), m)
    assert list(np.asarray(box)) == [1, 6, 2, 7] and int(src) == C.SOURCE_PREDICTION
    pred[3, 4, 0] = 0.4
    box, src = C.box_with_fallback(jnp.asarray(pred), jnp.asarray(label), m)
    assert list(np.asarray(box)) == [6, 11, 6, 11] and int(src) == C.SOURCE_LABEL
    box, src = C.box_with_fallback(jnp.asarray(pred), jnp.zeros((16, 16, 3)), m)
    assert list(np.asarray(box)) == [0, 16, 0, 16] and int(src) == C.SOURCE_NONE


def test_random_margins_distribution():
    keys = jax.random.split(jax.random.key(3), 4000)
    draw = jax.jit(jax.vmap(functools.partial(C.random_margins, margin=20, prob_fixed=0.5)))
    m = np.asarray(draw(keys))
    assert m.dtype == np.int32 and m.shape == (4000, 4)
    assert m.min() == 0 and m.max() == 40
    fixed = np.all(m == 20, axis=1)
    assert abs(fixed.mean() - 0.5) < 0.04           # 4 sigma ~ 0.032
    free = m[~fixed]
    assert abs(free.mean() - 20.0) < 0.6            # uniform on [0, 40]: mean 20
    assert len(np.unique(free)) == 41
    assert np.mean(free[:, 0] == free[:, 1]) < 0.1  # sides independent (1/41)
    never = np.asarray(jax.vmap(lambda k: C.random_margins(k, margin=5, prob_fixed=1.0))(keys[:50]))
    assert np.all(never == 5)


# --------------------------------------------------------------------------
# Canvas crop and paste back
# --------------------------------------------------------------------------

@pytest.mark.parametrize("canvas", [(24, 20), (40, 50)])
def test_crop_to_canvas_matches_variable_crop(canvas):
    """Exact: the canvas top-left holds the same pixels as image[r0:r1, c0:c1],
    zeros and invalid beyond, also for boxes at the bottom/right border and a
    canvas larger than the image."""
    rng = np.random.default_rng(1)
    img = rng.random((30, 36, 3)).astype(np.float32) + 0.1
    f = jax.jit(functools.partial(C.crop_to_canvas, canvas_hw=canvas))
    boxes = [[0, 30, 0, 36], [7, 30, 20, 36], [0, 1, 35, 36], [12, 31 - 1, 3, 22]]
    boxes += [sorted(rng.choice(31, 2, replace=False)) + sorted(rng.choice(37, 2, replace=False))
              for _ in range(6)]
    for bx in boxes:
        bx = np.array(bx, np.int32)
        hh, ww = bx[1] - bx[0], bx[3] - bx[2]
        if hh > canvas[0] or ww > canvas[1]:
            continue
        crop, valid, origin, over = f(jnp.asarray(img), jnp.asarray(bx))
        want = np.zeros(canvas + (3,), np.float32)
        want[:hh, :ww] = img[bx[0]:bx[1], bx[2]:bx[3]]
        np.testing.assert_array_equal(np.asarray(crop), want)
        np.testing.assert_array_equal(np.asarray(valid), want[..., 0] > 0)
        assert list(np.asarray(origin)) == [bx[0], bx[2]] and not bool(over)


def test_overflow_keeps_centred_window():
    img = np.arange(40 * 50 * 1, dtype=np.float32).reshape(40, 50, 1) + 1
    box = np.array([3, 38, 10, 21], np.int32)      # 35 x 11 into a 16 x 16 canvas
    crop, valid, origin, over = C.crop_to_canvas(jnp.asarray(img), jnp.asarray(box), (16, 16))
    start = (3 + 38) // 2 - 16 // 2                 # centre 20 -> rows [12, 28)
    assert bool(over) and list(np.asarray(origin)) == [start, 10]
    np.testing.assert_array_equal(np.asarray(crop)[:, :11], img[start:start + 16, 10:21])
    assert not np.asarray(valid)[:, 11:].any() and np.asarray(valid)[:, :11].all()
    assert 3 <= start and start + 16 <= 38          # the window lies in the box


def test_paste_logits_fill_and_sigmoid():
    rng = np.random.default_rng(2)
    img = jnp.asarray(rng.random((20, 24, 3)), jnp.float32)
    box = jnp.array([4, 11, 6, 20], jnp.int32)
    crop, valid, origin, _ = C.crop_to_canvas(img, box, (12, 16))
    logits = jnp.asarray(rng.normal(size=(12, 16, 3)), jnp.bfloat16)
    out = np.asarray(C.paste_logits(logits, valid, origin, (20, 24)))
    assert out.dtype == np.float32 and out.shape == (20, 24, 3)
    inside = np.zeros((20, 24), bool)
    inside[4:11, 6:20] = True
    np.testing.assert_array_equal(out[4:11, 6:20], np.asarray(logits, np.float32)[:7, :14])
    assert np.all(out[~inside] == C.FILL)
    assert np.all(np.asarray(jax.nn.sigmoid(out))[~inside] == 0.0)


def test_select_canvas_and_canvases_for():
    cv = ((16, 16), (16, 32), (32, 32), (48, 64))
    pick = jax.jit(functools.partial(C.select_canvas, canvases=cv))
    cases = [([[5, 5], [16, 16]], 0, False), ([[5, 17], [3, 3]], 1, False),
             ([[17, 3], [3, 30]], 2, False), ([[33, 3]], 3, False),
             ([[49, 3], [1, 1]], 3, True), ([[0, 0]], 0, False)]
    for hw, idx, over in cases:
        i, o = pick(jnp.array(hw, jnp.int32))
        assert (int(i), bool(o)) == (idx, over), hw
    got = C.canvases_for((100, 60), [32, (64, 96), 200], margin=10)
    assert got == ((32, 32), (64, 60), (100, 60))
    assert C.canvases_for((24, 24), [64]) == ((24, 24),)
    # margin 20 on a 30-px image: the smallest box is the image side (30)
    assert C.check_canvases(((30, 41),), image_hw=(30, 50), margin=20) == ((30, 41),)


def _conv_fn(params, x):
    """A small translation-equivariant FCN stand-in: 2 x (3x3 SAME conv, ReLU)."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, params[0], (1, 1), "SAME",
                                                 dimension_numbers=dn) + params[1])
    return jax.lax.conv_general_dilated(h, params[2], (1, 1), "SAME",
                                        dimension_numbers=dn) + params[3]


def _conv_params(seed=0, cin=3, cout=3):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (3, 3, cin, 4)) * 0.3, jax.random.normal(ks[1], (4,)) * 0.3,
            jax.random.normal(ks[2], (3, 3, 4, cout)) * 0.3, jax.random.normal(ks[3], (cout,)))


def test_fine_on_canvas_per_sample_boxes_vs_variable_crops():
    """fn through the canvas equals fn on the variable-size crop inside the box.

    For this 2-layer 3x3 SAME conv the canvas differs from the variable crop
    only through the second layer reading the first layer's output one pixel
    beyond the box (bias and spread there, zero padding in the variable
    crop): it is equal (atol 1e-5) on every box pixel except the last row and
    last column. Outside the box the logits are the fill value.
    """
    rng = np.random.default_rng(4)
    params = _conv_params()
    fn = functools.partial(_conv_fn, params)
    img = rng.random((3, 40, 44, 3)).astype(np.float32)
    boxes = np.array([[2, 20, 5, 30], [20, 40, 0, 9], [10, 27, 30, 44]], np.int32)
    cv = ((16, 16), (24, 32), (40, 44))
    run = jax.jit(lambda im, bx: C.fine_on_canvas(fn, im, bx, cv))
    out, info = run(jnp.asarray(img), jnp.asarray(boxes))
    assert out.dtype == jnp.float32 and out.shape == (3, 40, 44, 3)
    assert int(info["canvas_index"]) == 1 and int(info["overflow_count"]) == 0
    assert (int(info["canvas_h"]), int(info["canvas_w"])) == (24, 32)
    out = np.asarray(out)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        var = np.asarray(fn(jnp.asarray(img[i:i + 1, r0:r1, c0:c1])))[0]
        got = out[i, r0:r1, c0:c1]
        np.testing.assert_allclose(got[:-1, :-1], var[:-1, :-1], atol=1e-5)
        outside = np.ones((40, 44), bool)
        outside[r0:r1, c0:c1] = False
        assert np.all(out[i][outside] == C.FILL)
    # same results without jit
    out2, _ = C.fine_on_canvas(fn, jnp.asarray(img), jnp.asarray(boxes), cv)
    np.testing.assert_allclose(np.asarray(out2), out, atol=1e-6)


def test_fine_on_canvas_overflow_active_and_hw():
    img = jnp.ones((2, 40, 40, 1), jnp.float32)
    boxes = jnp.array([[0, 30, 0, 10], [5, 10, 5, 10]], jnp.int32)
    seen = {}

    def fn(x, hw):
        seen["shape"] = x.shape
        return jnp.concatenate([x, jnp.broadcast_to(hw[:, None, None, :1], x.shape[:3] + (1,))
                                .astype(jnp.float32)], -1)

    out, info = C.fine_on_canvas(fn, img, boxes, ((16, 16), (20, 20)), pass_hw=True)
    assert int(info["canvas_index"]) == 1 and int(info["overflow_count"]) == 1
    out = np.asarray(out)
    assert np.all(out[0, 5:25, 0:10, 0] == 1) and np.all(out[0, :5, :, 0] == C.FILL)
    assert np.all(out[0, 5:25, 0:10, 1] == 20) and np.all(out[1, 5:10, 5:10, 1] == 5)
    # an inactive sample neither drives the canvas choice nor gets logits
    out, info = C.fine_on_canvas(fn, img, boxes, ((16, 16), (20, 20)),
                                 active=jnp.array([False, True]), pass_hw=True)
    assert int(info["canvas_index"]) == 0 and int(info["overflow_count"]) == 0
    assert np.all(np.asarray(out)[0] == C.FILL) and np.all(np.asarray(out)[1, 5:10, 5:10, 0] == 1)


def test_gradient_inside_box_only_and_through_saliency():
    """d(loss)/d(image) and d/d(saliency) are nonzero inside each sample's own
    box and exactly zero outside it; computing the box from a float map inside
    the differentiated function raises nothing (the box gets no gradient)."""
    rng = np.random.default_rng(5)
    params = _conv_params(1)
    img = jnp.asarray(rng.random((2, 24, 28, 3)), jnp.float32)
    sal = jnp.asarray(rng.random((2, 24, 28, 3)) + 0.5, jnp.float32)
    ref = np.zeros((2, 24, 28, 3), np.float32)
    ref[0, 5, 6, 0] = ref[1, 15, 20, 2] = 1.0
    margins = C.fixed_margins(3)

    def loss(img, sal):
        boxes, _ = C.boxes_from_maps(img * 0 + jnp.asarray(ref), margins)
        logits, _ = C.fine_on_canvas(functools.partial(_conv_fn, params), img * sal,
                                     boxes, ((12, 12), (24, 28)), margin=3)
        return jnp.sum(jax.nn.sigmoid(logits) * jnp.arange(3.0))

    gi, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(img, sal)
    for g in (np.asarray(gi), np.asarray(gs)):
        for i, (r0, r1, c0, c1) in enumerate([(2, 9, 3, 10), (12, 19, 17, 24)]):
            inside = np.zeros((24, 28), bool)
            inside[r0:r1, c0:c1] = True
            assert np.all(np.abs(g[i]).max(-1)[inside] > 0)
            assert np.all(g[i][~inside] == 0)


@pytest.mark.parametrize("box", [(2, 9, 3, 10), (0, 40, 0, 44)])
def test_remat_full_canvas_same_gradients_fewer_saved_bytes(box):
    """remat_full recomputes the full canvas's forward in its backward: the
    loss and the gradients (parameters and image) equal the saved-residual
    run's, whether a small canvas (first box) or the full one (second) is
    taken; and the forward switch no longer returns the full canvas's
    residuals (which every other branch fills with zeros)."""
    rng = np.random.default_rng(7)
    params = _conv_params(2)
    img = jnp.asarray(rng.random((2, 40, 44, 3)), jnp.float32)
    boxes = jnp.asarray([box, box], jnp.int32)
    canvases = ((12, 12), (24, 24), (40, 44))

    def loss(params, img, remat):
        logits, _ = C.fine_on_canvas(functools.partial(_conv_fn, params), img, boxes,
                                     canvases, remat_full=remat)
        return jnp.sum(jax.nn.sigmoid(logits) * jnp.arange(3.0))

    fns = {r: jax.jit(jax.value_and_grad(functools.partial(loss, remat=r), argnums=(0, 1)))
           for r in (False, True)}
    (v0, g0), (v1, g1) = fns[False](params, img), fns[True](params, img)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    saved = {r: _forward_switch_output_elements(functools.partial(loss, remat=r), params, img)
             for r in (False, True)}
    # Without remat the forward switch returns every canvas's residuals, the
    # full canvas's among them (at least one 40 x 44 x 4 activation a sample).
    assert saved[False] - saved[True] >= 2 * 40 * 44 * 4, saved


def _forward_switch_output_elements(f, *args) -> int:
    """Elements returned by the first `cond` (the forward switch) in the
    jaxpr of value_and_grad(f)."""
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(*args).jaxpr

    def find(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "cond":
                return eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                hit = find(sub)
                if hit is not None:
                    return hit
        return None
    eqn = find(jaxpr)
    assert eqn is not None, "no switch in the gradient's jaxpr"
    return sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)


def test_fine_on_canvas_under_pmap_picks_per_device():
    """Under pmap each device switches to its own canvas."""
    fn = functools.partial(_conv_fn, _conv_params(2))
    img = jnp.ones((2, 1, 20, 20, 3), jnp.float32)
    boxes = jnp.array([[[0, 5, 0, 5]], [[0, 20, 0, 20]]], jnp.int32)
    f = jax.pmap(lambda im, bx: C.fine_on_canvas(fn, im, bx, ((8, 8), (20, 20))),
                 devices=jax.devices()[:2])
    out, info = f(img, boxes)
    assert list(np.asarray(info["canvas_index"])) == [0, 1]
    single, _ = C.fine_on_canvas(fn, img[0], boxes[0], ((8, 8), (20, 20)))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(single), atol=1e-6)


# --------------------------------------------------------------------------
# FCN-8s through the canvas (only when the model module exists)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["reference", "pad32"])
def test_fcn8s_through_canvas_with_valid_hw_is_exact(variant):
    """FCN8s(width=1/16) through `fine_on_canvas(pass_hw=True)` with
    `valid_hw=crop_hw` vs FCN8s on the variable-size crop: equal inside each
    box (atol 1e-5) with random biases (std 0.1), the fill value outside.

    Without valid_hw the canvas run differs: with nonzero biases the deep
    layers (a receptive field of ~400 px) see the bias response of the
    canvas's zero region where the variable-size network sees zero padding
    (measured at width 1/16 on the 30 x 41 box: 5.8 % of max |logit| for
    "reference", 47 % for "pad32"; asserted: above 0.5 %).
    """
    fcn8s = pytest.importorskip("stnjax.models.fcn8s")
    model = fcn8s.FCN8s(width=1 / 16, variant=variant)
    # He-normal kernels and random biases drawn here from the parameter
    # shapes (model.init would compile the whole network once more).
    rng = np.random.default_rng(6)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)
        if "bias" in jax.tree_util.keystr(p) else
        jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype),
        shapes)
    apply = jax.jit(model.apply)
    img = rng.random((2, 64, 64, 3)).astype(np.float32)
    boxes = np.array([[9, 9 + 30, 20, 20 + 41], [30, 64, 3, 20]], np.int32)  # 30x41, 34x17
    run = jax.jit(lambda im, bx: C.fine_on_canvas(
        lambda c, hw: model.apply(params, c, valid_hw=hw), im, bx, ((48, 48),), pass_hw=True))
    out, info = run(jnp.asarray(img), jnp.asarray(boxes))
    out = np.asarray(out)
    assert int(info["overflow_count"]) == 0
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        var = np.asarray(apply(params, jnp.asarray(img[i:i + 1, r0:r1, c0:c1])))[0]
        np.testing.assert_allclose(out[i, r0:r1, c0:c1], var, atol=1e-5, rtol=0)
        outside = np.ones((64, 64), bool)
        outside[r0:r1, c0:c1] = False
        assert np.all(out[i][outside] == C.FILL)
        if i == 0:  # the same canvas without valid_hw: not the variable-size result
            crop, _, _, _ = C.crop_to_canvas(jnp.asarray(img[0]), jnp.asarray(boxes[0]), (48, 48))
            plain = np.asarray(apply(params, crop[None]))[0, :r1 - r0, :c1 - c0]
            assert np.abs(plain - var).max() > 5e-3 * np.abs(var).max()


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_input_errors():
    img = jnp.zeros((20, 20, 3))
    box = jnp.array([0, 5, 0, 5], jnp.int32)
    fn = lambda x: x
    with pytest.raises(InputError, match="image: expected rank 3"):
        C.crop_to_canvas(jnp.zeros((1, 20, 20, 3)), box, (8, 8))
    with pytest.raises(InputError, match="image: expected dtype"):
        C.crop_to_canvas(jnp.zeros((20, 20, 3), jnp.int32), box, (8, 8))
    bad = np.zeros((20, 20, 3), np.float32)
    bad[3, 3, 1] = np.nan
    with pytest.raises(InputError, match="image: 1 NaN"):
        C.crop_to_canvas(bad, box, (8, 8))
    with pytest.raises(InputError, match="image: 1 NaN"):
        C.fine_on_canvas(fn, bad[None], box[None], ((8, 8),))
    with pytest.raises(InputError, match="box: expected dtype"):
        C.crop_to_canvas(img, jnp.array([0.0, 5, 0, 5]), (8, 8))
    with pytest.raises(InputError, match="box: box .* not a half-open"):
        C.crop_to_canvas(img, jnp.array([0, 25, 0, 5], jnp.int32), (8, 8))
    with pytest.raises(InputError, match="margins: expected shape"):
        C.box_from_map(img, jnp.array([1, 2, 3], jnp.int32))
    with pytest.raises(InputError, match="ref: expected rank 3"):
        C.box_from_map(img[None], C.fixed_margins(2))
    with pytest.raises(InputError, match=r"canvas \(16, 40\) cannot hold a box with margin 20"):
        C.fine_on_canvas(fn, jnp.zeros((1, 64, 64, 3)), box[None], ((16, 40), (64, 64)),
                         margin=20)
    with pytest.raises(InputError, match="cannot hold a box with margin 10"):
        C.canvases_for((100, 100), [16], margin=10)
    with pytest.raises(InputError, match="canvases: must be sorted by area"):
        C.select_canvas(jnp.zeros((1, 2), jnp.int32), ((32, 32), (16, 16)))
    with pytest.raises(InputError, match="boxes: expected shape"):
        C.fine_on_canvas(fn, jnp.zeros((2, 20, 20, 3)), box[None], ((8, 8),))
    with pytest.raises(InputError, match="fn: expected logits"):
        C.fine_on_canvas(lambda x: x[:, :4], jnp.zeros((1, 20, 20, 3)), box[None], ((8, 8),))
