"""Recurrent fine-stage training (train.unroll_rounds): mode J over R rounds.

Round r > 1 must read its saliency input and crop box from round r-1's fine
map (p >= 0.5, the same margins, the label's box when the map is empty),
under stop_gradient; the loss is lam * L_coarse + (1 - lam) * mean_r L_fine,r.
Checked against NumPy boxes and against the pieces called by hand, on a
1/32-width RSTN and 32 x 32 slices (one canvas: the whole slice).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch.configs import smoke
from launch.configs.common import stagewise_baseline
from stnjax.checks import InputError
from stnjax.models.rstn import RSTN
from stnjax.train import state as st
from stnjax.train import steps
from stnjax.train.losses import joint_loss
from stnjax.train.spec import TrainSpec

H = W = 32
B = 3
K = 3
LAM = 1.0 / 3.0
BCE = 0.5  # the phantom recipe's cross-entropy term: fine regions enter the loss


def _rstn():
    c = smoke.get_config()
    c.model.dropout_rate = 0.0
    c.model.canvases = ()  # the full slice only
    c.model.margin = K
    c.model.prob_fixed_margin = 1.0  # margins K on all sides: boxes predictable
    c.model.remat_full_canvas = False  # the same values, a smaller program
    return RSTN.from_config(c.model)


def _params(rstn, seed=0):
    """Host-drawn params; the last saliency layer random (not the reference's
    zero start) so that the saliency depends on its input map."""
    shapes = jax.eval_shape(lambda k: rstn.init_params(k, (H, W)), st.init_key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        scale = 0.01 if path[-1].key == "bias" else np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return (rng.normal(size=s.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _shift_fine_head(params, shift):
    fine = dict(params["fine"])
    fine["score_pool3"] = dict(fine["score_pool3"], bias=fine["score_pool3"]["bias"] + shift)
    return dict(params, fine=fine)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((B, H, W, 3), dtype=np.float32)
    label = np.zeros((B, H, W, 3), np.float32)
    for b in range(B):
        r, c = 6 + 4 * b, 8 + 3 * b
        label[b, r:r + 7, c:c + 6, :] = 1.0
        image[b, r:r + 7, c:c + 6, :] += 0.5
    hw = np.full((B, 2), (H, W), np.int32)
    hw[1] = (H, 27)  # a narrower slice padded to the bucket: boxes clamp to it
    return {"image": image, "label": label, "hw": hw, "weight": np.ones(B, np.float32),
            "index": np.arange(B, dtype=np.int32)}


def _np_box(ref, hw, k=K):
    """[r0, r1, c0, c1] of ref (H, W, C) >= 0.5 within hw, margin k; None if empty."""
    act = np.asarray(ref).max(-1) >= 0.5
    act[hw[0]:, :] = False
    act[:, hw[1]:] = False
    if not act.any():
        return None
    rows, cols = np.nonzero(act.any(1))[0], np.nonzero(act.any(0))[0]
    return (max(rows[0] - k, 0), min(rows[-1] + k + 1, hw[0]),
            max(cols[0] - k, 0), min(cols[-1] + k + 1, hw[1]))


def _region(box):
    out = np.zeros((H, W), bool)
    out[box[0]:box[1], box[2]:box[3]] = True
    return out


@pytest.fixture(scope="module")
def setup():
    rstn = _rstn()
    fwd = jax.jit(lambda p, b, k: rstn.forward_j_rounds(p, b, k, 2))
    return rstn, fwd, _batch(), jax.random.key(5)


def _hand_round(rstn, params, batch, prev, boxes):
    """Round 2 from the pieces: image x g(prev), cropped by boxes (NumPy)."""
    fine_in = batch["image"] * rstn.saliency_weights(params, prev, batch["hw"])
    logits, _ = rstn.fine_logits(params, fine_in, jnp.asarray(boxes, jnp.int32),
                                 jnp.ones(B, bool))
    return jax.nn.sigmoid(logits)


@pytest.mark.parametrize("shift", [0.0, 30.0, -30.0])
def test_second_round_reads_the_first_rounds_map(setup, shift):
    """Round 2's box is round 1's map's box (p >= 0.5, margin K; the label's
    when that map is empty), its saliency input round 1's map. shift on the
    fine head: 0 random maps; +30 round 1 is ~1 on its whole box, so round 2
    is that box grown by K; -30 round 1 is empty everywhere (fallback)."""
    rstn, fwd, batch, key = setup
    params = _shift_fine_head(_params(rstn), shift)
    r1, r2 = jax.tree.map(np.asarray, fwd(params, batch, key))
    np.testing.assert_array_equal(r1.coarse_prob, r2.coarse_prob)
    want_boxes, fallback = [], []
    for b in range(B):
        box = _np_box(r1.fine_prob[b], batch["hw"][b])
        fallback.append(box is None)
        want_boxes.append(box or _np_box(batch["label"][b], batch["hw"][b]))
        np.testing.assert_array_equal(r2.fine_region[b], _region(want_boxes[b]), err_msg=str(b))
        if shift > 0:  # the whole first box is organ: the second is it plus K
            rows = np.nonzero(r1.fine_region[b].any(1))[0]
            cols = np.nonzero(r1.fine_region[b].any(0))[0]
            hw = batch["hw"][b]
            assert want_boxes[b] == (max(rows[0] - K, 0), min(rows[-1] + K + 1, hw[0]),
                                     max(cols[0] - K, 0), min(cols[-1] + K + 1, hw[1]))
    assert fallback == [shift < 0] * B
    np.testing.assert_array_equal(r2.stats["fallback"], np.float32(fallback))
    hand = _hand_round(rstn, params, batch, r1.fine_prob, want_boxes)
    np.testing.assert_allclose(r2.fine_prob, hand, rtol=1e-5, atol=1e-6)
    if shift == 0:  # round 2 is not round 1 again
        assert np.abs(np.asarray(r2.fine_prob) - np.asarray(r1.fine_prob)).max() > 1e-3


def _valid(batch):
    return ((np.arange(H)[None, :, None] < batch["hw"][:, :1, None])
            & (np.arange(W)[None, None, :] < batch["hw"][:, 1:, None]))


@pytest.fixture(scope="module")
def gradients(setup):
    """One jitted program (its round-1 work is shared, which keeps the
    compilation short) computing, at the same params and step key:
    the unroll_rounds = 1 step (SGD at rate 1: the update is the gradient)
    and today's J step written out by hand (forward_j, joint_loss, grad);
    the unrolled R = 2 objective and the hand-built loss with round 2's
    saliency input and box as constants (`prev`, `boxes` from a forward
    run first)."""
    rstn, fwd, batch, _ = setup
    params = _params(rstn, seed=2)
    state = {"params": params, "opt_state": optax.sgd(1.0).init(params),
             "rng": st.init_key(0), "step": jnp.int32(7)}
    # Round 1's map at the step's key (step 7).
    prev = np.asarray(fwd(params, batch, jax.random.fold_in(st.init_key(0), 7))[0].fine_prob)
    boxes = np.asarray([_np_box(prev[b], batch["hw"][b]) or
                        _np_box(batch["label"][b], batch["hw"][b]) for b in range(B)])
    region2 = np.stack([_region(b) for b in boxes])
    kw = dict(valid=_valid(batch), weight=batch["weight"], lam=LAM, bce_weight=BCE)
    step1 = steps.make_step(rstn, "J", optax.sgd(1.0), lam=LAM, axis_name=None,
                            bce_weight=BCE, unroll_rounds=1)
    unrolled = steps.make_objective(rstn, "J", 2, lam=LAM, axis_name=None, bce_weight=BCE)

    def today(p, key):
        out = rstn.forward_j(p, batch, key)
        return joint_loss(out.coarse_prob, out.fine_prob, batch["label"],
                          fine_region=out.fine_region, **kw)

    def hand(p, key, prev, boxes, region2):
        out1 = rstn.forward_j(p, batch, key)
        f2 = _hand_round(rstn, p, batch, prev, boxes)
        l1, m1 = joint_loss(out1.coarse_prob, out1.fine_prob, batch["label"],
                            fine_region=out1.fine_region, **kw)
        l2, m2 = joint_loss(out1.coarse_prob, f2, batch["label"], fine_region=region2, **kw)
        return (l1 + l2) / 2, (m1["loss_fine"][0], m2["loss_fine"][0])

    @jax.jit
    def run(state, prev, boxes, region2):
        p = state["params"]
        # The step's own key, computed alike in every part (so XLA can share
        # the identical round-1 forwards).
        key = jax.random.fold_in(state["rng"], state["step"])
        return (step1(state, batch), jax.value_and_grad(today, has_aux=True)(p, key),
                jax.value_and_grad(unrolled, has_aux=True)(p, batch, key),
                jax.value_and_grad(hand, has_aux=True)(p, key, prev, boxes, region2))

    return params, jax.tree.map(np.asarray, run(state, prev, boxes, region2))


def test_one_round_is_todays_step(gradients):
    """unroll_rounds = 1: the step is today's J step, bit for bit: the same
    loss metrics and the same update (the gradient)."""
    params, ((new, metrics), ((_, m_ref), g_ref), _, _) = gradients
    assert not any(k.startswith("loss_fine_r") or k.endswith("_r2") for k in metrics)
    for k, v in m_ref.items():
        np.testing.assert_array_equal(metrics[k], v, err_msg=k)
    for p0, p1, g in zip(jax.tree.leaves(params), jax.tree.leaves(new["params"]),
                         jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(p1, p0 - g)


def test_round_two_inputs_carry_no_gradient(gradients):
    """The unrolled objective and its gradient equal the hand-built loss
    lam L_c + (1 - lam) (L_f1 + L_f2) / 2 (cross-entropy terms alike) with
    round 2's saliency input and box held constant: no gradient reaches any
    network through round 2's inputs. (Without the stop_gradient, round 2's
    input depends on the coarse net through round 1's saliency and the
    gradients differ by ~2e-3 relative, 20x the tolerance: checked once by
    mutation.)"""
    _, (_, _, ((loss, (metrics, stats)), g), ((loss_h, (lf1, lf2)), g_h)) = gradients
    np.testing.assert_allclose(loss, loss_h, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_fine_r1"][0], lf1, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_fine_r2"][0], lf2, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_fine"][0], (lf1 + lf2) / 2, rtol=1e-6)
    assert set(stats) >= {"fallback", "box_area", "fallback_r2", "box_area_r2"}
    for net in ("coarse", "saliency", "fine"):
        for a, b in zip(jax.tree.leaves(g[net]), jax.tree.leaves(g_h[net])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=net)


def _record(**train):
    """The smoke config as a record (a stored config.json may hold any JSON value)."""
    rec = smoke.get_config().to_dict()
    rec["train"].update(train)
    return rec


@pytest.mark.parametrize("value", [0, -1, 2.5, "2", True, None])
def test_bad_unroll_rounds_names_the_field(value):
    with pytest.raises(InputError, match=r"train\.unroll_rounds"):
        TrainSpec.from_config(_record(unroll_rounds=value) if value is not None else
                              _record(unroll_rounds=2, stages="S:4,I:4"))
    with pytest.raises(InputError, match=r"train\.unroll_rounds"):
        steps.fine_rounds("J", value if value is not None else 0)


def test_unroll_rounds_applies_to_j_only():
    assert [steps.fine_rounds(m, 3) for m in ("S", "I", "J", "C", "F", "CF")] == [1, 1, 3, 1, 1, 1]
    spec = TrainSpec.from_config(_record(unroll_rounds=2))
    assert spec.loop.unroll_rounds == 2
    old = _record()
    del old["train"]["unroll_rounds"]  # a config written before the field
    assert TrainSpec.from_config(old).loop.unroll_rounds == 1
    c = smoke.get_config()
    c.train.unroll_rounds = 2
    # The baseline has no J stage: it trains as without the option.
    assert TrainSpec.from_config(stagewise_baseline(c)).loop.unroll_rounds == 1
