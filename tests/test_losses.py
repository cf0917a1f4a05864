"""Tests for stnjax.train.losses against a NumPy float64 formula and hand cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.train import losses as L
from stnjax.checks import InputError

EPS = 1e-6


def np_dice(p, y, valid=None, eps=EPS):
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    if valid is not None:
        v = np.asarray(valid, np.float64)[..., None]
        p, y = p * v, y * v
    out = []
    for i in range(p.shape[0]):
        inter = (y[i] * p[i]).sum()
        out.append(1.0 - (2.0 * inter + eps) / (y[i].sum() + p[i].sum() + eps))
    return np.array(out)


def test_soft_dice_hand_cases():
    y = np.zeros((3, 8, 8, 3), np.float32)
    y[:, 2:5, 3:6, 1] = 1.0
    p = y.copy()
    p[1] = 0.0
    p[1, 6:, 6:, 0] = 1.0        # disjoint from the label
    loss = np.asarray(L.soft_dice_loss(jnp.asarray(p), jnp.asarray(y)))
    assert loss.dtype == np.float32 and loss.shape == (3,)
    assert abs(loss[0]) < 1e-7                       # perfect: exactly 0
    assert abs(loss[1] - (1 - EPS / (9 + 4 + EPS))) < 1e-7   # disjoint: ~1
    # empty label and empty prediction: 1 - eps / eps = 0
    empty = L.soft_dice_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)))
    assert abs(float(empty[0])) < 1e-7
    # eps matters: an empty label against a tiny prediction
    tiny = np.zeros((1, 4, 4, 3), np.float32)
    tiny[0, 0, 0, 0] = 1e-6
    want = 1 - EPS / (1e-6 + EPS)                    # = 0.5
    assert abs(float(L.soft_dice_loss(jnp.asarray(tiny), jnp.zeros_like(tiny))[0]) - want) < 1e-3


def test_soft_dice_random_against_numpy_and_valid():
    rng = np.random.default_rng(0)
    p = rng.random((4, 10, 12, 3)).astype(np.float32)
    y = (rng.random((4, 10, 12, 3)) < 0.2).astype(np.float32)
    valid = np.zeros((4, 10, 12), bool)
    for i, (h, w) in enumerate([(10, 12), (6, 12), (10, 5), (3, 4)]):
        valid[i, :h, :w] = True
    got = np.asarray(jax.jit(L.soft_dice_loss)(jnp.asarray(p), jnp.asarray(y)))
    np.testing.assert_allclose(got, np_dice(p, y), rtol=1e-6, atol=1e-7)
    got = np.asarray(L.soft_dice_loss(jnp.asarray(p), jnp.asarray(y), valid=jnp.asarray(valid)))
    np.testing.assert_allclose(got, np_dice(p, y, valid), rtol=1e-6, atol=1e-7)
    # masking equals computing on the unpadded region alone
    alone = np.asarray(L.soft_dice_loss(jnp.asarray(p[3:4, :3, :4]), jnp.asarray(y[3:4, :3, :4])))
    np.testing.assert_allclose(got[3], alone[0], rtol=1e-6)


def test_soft_dice_accumulates_in_float32_from_bfloat16():
    """bfloat16 inputs with 3 x 256 x 256 pixels: float32 sums match the
    float64 formula on the same (bfloat16-rounded) values; a bfloat16 sum would
    be off by whole percent."""
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.random((1, 256, 256, 3)) * 0.3 + 0.1, jnp.bfloat16)
    y = jnp.asarray(rng.random((1, 256, 256, 3)) < 0.5, jnp.bfloat16)
    got = L.soft_dice_loss(p, y)
    assert got.dtype == jnp.float32
    want = np_dice(np.asarray(p, np.float64), np.asarray(y, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    naive = 1 - 2 * jnp.sum(p * y) / (jnp.sum(p) + jnp.sum(y))  # all in bfloat16
    assert abs(float(naive) - want[0]) > 10 * abs(float(got[0]) - want[0])


def _batch(seed, b=4, hw=(8, 10)):
    rng = np.random.default_rng(seed)
    cp = rng.random((b,) + hw + (3,)).astype(np.float32)
    fp = rng.random((b,) + hw + (3,)).astype(np.float32)
    y = (rng.random((b,) + hw + (3,)) < 0.3).astype(np.float32)
    valid = np.ones((b,) + hw, bool)
    valid[:, hw[0] // 2:] = rng.random((b, 1, 1)) < 0.5
    return cp, fp, y, valid


def test_joint_loss_lambda_weights_and_padding():
    cp, fp, y, valid = _batch(2)
    weight = np.array([1, 1, 1, 0], np.float32)       # slot 3 is padding
    cp[3] = 1.0                                       # padded slot content must not count
    lc, lf = np_dice(cp, y, valid), np_dice(fp, y, valid)
    for lam in (1 / 3, 0.0, 1.0):
        loss, m = jax.jit(functools.partial(L.joint_loss, lam=lam))(
            jnp.asarray(cp), jnp.asarray(fp), jnp.asarray(y),
            valid=jnp.asarray(valid), weight=jnp.asarray(weight))
        per = lam * lc + (1 - lam) * lf
        np.testing.assert_allclose(float(loss), per[:3].mean(), rtol=1e-6)
        np.testing.assert_allclose(float(m["loss"][0]), per[:3].sum(), rtol=1e-6)
        assert float(m["loss"][1]) == 3.0
        means = L.mean_metrics(m)
        np.testing.assert_allclose(float(means["loss_coarse"]), lc[:3].mean(), rtol=1e-6)
        np.testing.assert_allclose(float(means["loss_fine"]), lf[:3].mean(), rtol=1e-6)
    # default lambda is the reference's 1/3; all-padding batch gives 0 and NaN means
    loss, m = L.joint_loss(jnp.asarray(cp), jnp.asarray(fp), jnp.asarray(y))
    np.testing.assert_allclose(float(loss), (np_dice(cp, y) / 3 + 2 * np_dice(fp, y) / 3).mean(),
                               rtol=1e-6)
    loss, m = L.joint_loss(jnp.asarray(cp), jnp.asarray(fp), jnp.asarray(y),
                           weight=jnp.zeros(4))
    assert float(loss) == 0.0 and np.isnan(float(L.mean_metrics(m)["loss"]))


def test_sum_count_averaging_over_batches_and_devices():
    """Merged (sum, count) pairs of two uneven padded batches, and psum under
    pmap over 4 devices, equal the mean over the real samples only; with
    axis_name the psum of per-device gradients is the gradient of that mean."""
    cp, fp, y, valid = _batch(3, b=8)
    weight = np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)
    real = weight > 0
    per = np_dice(cp, y, valid) / 3 + 2 * np_dice(fp, y, valid) / 3
    args = [jnp.asarray(a) for a in (cp, fp, y)]
    _, m1 = L.joint_loss(*[a[:4] for a in args], valid=jnp.asarray(valid[:4]),
                         weight=jnp.asarray(weight[:4]))
    _, m2 = L.joint_loss(*[a[4:] for a in args], valid=jnp.asarray(valid[4:]),
                         weight=jnp.asarray(weight[4:]))
    merged = L.mean_metrics(L.merge_metrics(m1, m2))
    np.testing.assert_allclose(float(merged["loss"]), per[real].mean(), rtol=1e-6)

    def step(scale, cp, fp, y, valid, weight):
        def objective(scale):
            return L.joint_loss(cp * scale, fp, y, valid=valid, weight=weight, axis_name="d")
        (loss, m), g = jax.value_and_grad(objective, has_aux=True)(scale)
        return jax.lax.psum(g, "d"), L.psum_metrics(m, "d")

    split = lambda a: jnp.asarray(a).reshape((4, 2) + a.shape[1:])
    g, m = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0, 0, 0, 0),
                    devices=jax.devices()[:4])(
        jnp.float32(0.9), split(cp), split(fp), split(y), split(valid), split(weight))
    means = L.mean_metrics({k: (s[0], c[0]) for k, (s, c) in m.items()})
    per09 = np_dice(cp * np.float32(0.9), y, valid) / 3 + 2 * np_dice(fp, y, valid) / 3
    np.testing.assert_allclose(float(means["loss"]), per09[real].mean(), rtol=1e-6)

    def global_mean(scale):
        lc = L.soft_dice_loss(args[0] * scale, args[2], valid=jnp.asarray(valid))
        lf = L.soft_dice_loss(args[1], args[2], valid=jnp.asarray(valid))
        return jnp.sum((lc / 3 + 2 * lf / 3) * weight) / weight.sum()

    np.testing.assert_allclose(float(g[0]), float(jax.grad(global_mean)(jnp.float32(0.9))),
                               rtol=1e-5)


def test_losses_bad_input():
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(InputError, match="prob: expected rank 4"):
        L.soft_dice_loss(x[0], x[0])
    with pytest.raises(InputError, match="label: expected shape"):
        L.soft_dice_loss(x, x[:, :3])
    with pytest.raises(InputError, match="prob: expected dtype"):
        L.soft_dice_loss(x.astype(jnp.int32), x)
    with pytest.raises(InputError, match="valid: expected shape"):
        L.soft_dice_loss(x, x, valid=jnp.ones((2, 4, 3)))
    with pytest.raises(InputError, match="weight: expected shape"):
        L.joint_loss(x, x, x, weight=jnp.ones(3))
    with pytest.raises(InputError, match="lam: must be in"):
        L.joint_loss(x, x, x, lam=1.5)
    with pytest.raises(InputError, match="keys differ"):
        L.merge_metrics({"a": (1, 1)}, {"b": (1, 1)})


def test_joint_loss_cross_entropy_term_against_numpy():
    """bce_weight adds lam * BCE(coarse over valid pixels) + (1 - lam) *
    BCE(fine over its crop box) to each sample's loss (0 = the reference)."""
    rng = np.random.default_rng(3)
    b, h, w = 2, 6, 5
    pc = rng.uniform(0.01, 0.99, (b, h, w, 3)).astype(np.float32)
    pf = rng.uniform(0.01, 0.99, (b, h, w, 3)).astype(np.float32)
    y = (rng.uniform(size=(b, h, w, 3)) < 0.3).astype(np.float32)
    valid = np.ones((b, h, w), bool)
    valid[:, -1] = False
    region = np.zeros((b, h, w), bool)
    region[0, 1:4, 1:3] = True
    region[1, :, :] = True
    lam, bw = 1 / 3, 0.5
    base, _ = L.joint_loss(pc, pf, y, valid=valid, lam=lam)
    loss, m = L.joint_loss(pc, pf, y, valid=valid, lam=lam, bce_weight=bw,
                           fine_region=jnp.asarray(region))

    def bce(p, y, mask):
        ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        return (ce * mask[..., None]).sum(axis=(1, 2, 3)) / (mask.sum(axis=(1, 2)) * 3)

    extra = lam * bce(pc, y, valid) + (1 - lam) * bce(pf, y, region & valid)
    np.testing.assert_allclose(float(loss), float(base) + bw * extra.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_bce"][0]), extra.sum(), rtol=1e-5)
    with pytest.raises(InputError, match="fine_region"):
        L.joint_loss(pc, pf, y, bce_weight=bw)


def test_joint_loss_organ_free_sample_trains_by_cross_entropy_only():
    """A sample whose label is empty (data.negatives) has Dice terms 0: its
    loss is its cross-entropy alone, it leaves the other sample's loss as it
    is, and its gradient stays bounded where the Dice formula's would grow as
    eps / (sum p)^2 (here 1e-6 / (48 * 1e-4)^2 ~ 0.04 per pixel, rising to
    ~1e6 once sum p reaches 1e-6)."""
    rng = np.random.default_rng(5)
    b, h, w = 2, 4, 4
    pc = rng.uniform(0.01, 0.99, (b, h, w, 3)).astype(np.float32)
    pf = rng.uniform(0.01, 0.99, (b, h, w, 3)).astype(np.float32)
    y = np.zeros((b, h, w, 3), np.float32)
    y[0, 1:3, 1:3, :] = 1.0                       # sample 1: organ-free
    region = np.ones((b, h, w), bool)
    lam, bw = 1 / 3, 0.5

    def bce(p, y):
        return (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean(axis=(1, 2, 3))

    loss, m = L.joint_loss(pc, pf, y, lam=lam, bce_weight=bw, fine_region=jnp.asarray(region))
    dice0 = lam * np_dice(pc[:1], y[:1]) + (1 - lam) * np_dice(pf[:1], y[:1])
    per = [dice0[0] + bw * (lam * bce(pc, y)[0] + (1 - lam) * bce(pf, y)[0]),
           bw * (lam * bce(pc, y)[1] + (1 - lam) * bce(pf, y)[1])]
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_coarse"][0]), np_dice(pc[:1], y[:1])[0], rtol=1e-5)
    assert float(m["loss_coarse"][1]) == 2.0      # the mean over samples, as before
    # Near-empty predictions on the organ-free sample: the gradient is the
    # cross-entropy's (bounded by bw / n_pixels / (1 - p)), no Dice blow-up.
    tiny = np.full((1, h, w, 3), 1e-4, np.float32)
    g = jax.grad(lambda p: L.joint_loss(p, p, jnp.zeros_like(p), bce_weight=bw,
                                        fine_region=jnp.ones((1, h, w), bool))[0])(tiny)
    assert np.all(np.abs(np.asarray(g)) < bw / (h * w * 3) * 1.01)
    assert L.organ_present(jnp.asarray(y)).tolist() == [True, False]
    # The label's pixels outside `valid` do not count as present.
    assert L.organ_present(jnp.asarray(y), jnp.zeros((b, h, w), bool)).tolist() == [False, False]
