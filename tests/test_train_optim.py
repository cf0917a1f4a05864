"""The Caffe SGD rule and the stage schedule against plain NumPy versions."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from stnjax.checks import InputError
from stnjax.train import optim, schedule


def _params(rng):
    return {
        "coarse": {"conv1": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                             "bias": rng.normal(size=(4,)).astype(np.float32)}},
        "saliency": {"s1": {"kernel": rng.normal(size=(3, 3, 3, 3)).astype(np.float32),
                            "bias": rng.normal(size=(3,)).astype(np.float32)}},
        "fine": {"conv1": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                           "bias": rng.normal(size=(4,)).astype(np.float32)}},
    }


def _numpy_caffe(params, grads_per_step, lrs, mults, wd, mom, trainable):
    """Caffe SGDSolver written out leaf by leaf in float64."""
    w = {k: {l: {n: np.asarray(a, np.float64) for n, a in d.items()} for l, d in net.items()}
         for k, net in params.items()}
    v = {k: {l: {n: np.zeros_like(a) for n, a in d.items()} for l, d in net.items()}
         for k, net in w.items()}
    for g, lr in zip(grads_per_step, lrs):
        for net in w:
            if net not in trainable:
                continue
            for layer in w[net]:
                for name in w[net][layer]:
                    group = (0 if net == "coarse" else 2) + (name == "bias")
                    d = wd if name == "kernel" else 0.0
                    v[net][layer][name] = (mom * v[net][layer][name]
                                           + lr * mults[group] * (g[net][layer][name]
                                                                  + d * w[net][layer][name]))
                    w[net][layer][name] = w[net][layer][name] - v[net][layer][name]
    return w


@pytest.mark.parametrize("trainable", [None, ("coarse", "fine")])
def test_caffe_sgd_matches_numpy_across_a_rate_change(trainable):
    rng = np.random.default_rng(0)
    params = _params(rng)
    stages = schedule.parse_stages("S:2,I:1,J:4")
    sched = schedule.make_lr_schedule(stages, base_lr=0.05, j_halving_every=2)
    mults, wd, mom = (1.0, 2.0, 10.0, 20.0), 5e-2, 0.9
    tx = optim.caffe_sgd(sched, momentum=mom, weight_decay=wd, lr_mult=mults,
                         trainable=trainable)
    state = tx.init(params)
    grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
                 for _ in range(7)]
    p = jax.tree.map(jnp.asarray, params)
    update = jax.jit(tx.update)
    for g in grads_seq:
        u, state = update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    lrs = [0.05, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025]  # J starts at 3, halves at 5
    want = _numpy_caffe(params, grads_seq, lrs, mults, wd, mom,
                        ("coarse", "saliency", "fine") if trainable is None else trainable)
    for net in want:
        for layer in want[net]:
            for name in want[net][layer]:
                np.testing.assert_allclose(np.asarray(p[net][layer][name]),
                                           want[net][layer][name], rtol=2e-5, atol=2e-6)
    assert int(state["count"]) == 7
    if trainable is not None:
        # The frozen saliency: params and momentum buffer untouched.
        np.testing.assert_array_equal(np.asarray(p["saliency"]["s1"]["kernel"]),
                                      params["saliency"]["s1"]["kernel"])
        assert not np.any(np.asarray(state["velocity"]["saliency"]["s1"]["kernel"]))


def test_caffe_rule_differs_from_optax_sgd_after_a_rate_change():
    # Documented difference: optax.sgd scales the whole buffer by the new rate.
    import optax
    w0 = {"coarse": {"c": {"kernel": np.ones((2,), np.float32)}}}
    g = {"coarse": {"c": {"kernel": np.ones((2,), np.float32)}}}
    lrs = {0: 1.0, 1: 0.5}
    tx = optim.caffe_sgd(lambda c: jnp.where(c < 1, 1.0, 0.5), momentum=0.9,
                         weight_decay=0.0, lr_mult=(1, 1, 1, 1))
    sgd = optax.sgd(optax.piecewise_constant_schedule(1.0, {1: 0.5}), momentum=0.9)
    s1, s2, p1, p2 = tx.init(w0), sgd.init(w0), w0, w0
    for _ in lrs:
        u1, s1 = tx.update(g, s1, p1)
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = sgd.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
    # Caffe: v1 = 1, v2 = 0.9 + 0.5 = 1.4 -> w = 1 - 2.4; optax: 1 - 1 - 0.5 * 1.9.
    np.testing.assert_allclose(np.asarray(p1["coarse"]["c"]["kernel"]), -1.4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p2["coarse"]["c"]["kernel"]), -0.95, rtol=1e-6)


def test_groups_and_bad_leaves():
    params = _params(np.random.default_rng(1))
    groups = optim.param_groups(params)
    assert groups["coarse"]["conv1"] == {"kernel": 0, "bias": 1}
    assert groups["saliency"]["s1"] == {"kernel": 2, "bias": 3}
    assert groups["fine"]["conv1"] == {"kernel": 2, "bias": 3}
    with pytest.raises(InputError, match="other/x/kernel"):
        optim.param_groups({"other": {"x": {"kernel": np.zeros(1)}}})
    with pytest.raises(InputError, match="coarse/x/mean"):
        optim.param_groups({"coarse": {"x": {"mean": np.zeros(1)}}})
    # A norm layer's scale (FCN8s norm="group") goes with the biases.
    assert optim.param_groups({"fine": {"n": {"scale": np.zeros(1)}}})["fine"]["n"] == {
        "scale": 3}
    with pytest.raises(InputError, match="lr_mult"):
        optim.caffe_sgd(lambda c: 1.0, lr_mult=(1, 2, 3))


def test_schedule_boundaries_reference():
    stages = schedule.parse_stages("S:10000,I:30000,J:40000")
    assert [(s.mode, s.start, s.end) for s in stages] == [
        ("S", 0, 10000), ("I", 10000, 40000), ("J", 40000, 80000)]
    assert schedule.total_steps(stages) == 80000
    lr = lambda s: schedule.lr_at(stages, 1e-5, 10000, s)  # noqa: E731
    # Caffe multistep: steps at 50K / 60K / 70K (J starts at 40K).
    for step, want in [(0, 1e-5), (39999, 1e-5), (40000, 1e-5), (49999, 1e-5),
                       (50000, 5e-6), (59999, 5e-6), (60000, 2.5e-6),
                       (70000, 1.25e-6), (79999, 1.25e-6)]:
        assert lr(step) == pytest.approx(want, rel=1e-6), step
    assert schedule.stage_at(stages, 9999).mode == "S"
    assert schedule.stage_at(stages, 10000).mode == "I"
    assert schedule.stage_at(stages, 79999).mode == "J"
    with pytest.raises(InputError, match="outside"):
        schedule.stage_at(stages, 80000)
    # The traced schedule agrees with the host one.
    f = jax.jit(schedule.make_lr_schedule(stages, 1e-5, 10000))
    np.testing.assert_allclose(np.asarray(f(jnp.int32(65000))), 2.5e-6, rtol=1e-6)


def test_schedule_bad_specs():
    with pytest.raises(InputError, match="train.stages"):
        schedule.parse_stages("S:10,X:5")
    with pytest.raises(InputError, match="appears twice"):
        schedule.parse_stages("S:10,S:5")
    with pytest.raises(InputError, match="length 0"):
        schedule.parse_stages("S:0")
    with pytest.raises(InputError, match="cannot parse"):
        schedule.parse_stages("S10")
    with pytest.raises(InputError, match="not a mode of method 'stagewise'"):
        schedule.parse_stages("S:10", method="stagewise")
    st = schedule.parse_stages("C:8,F:6", method="stagewise")
    assert [(s.mode, s.start, s.end) for s in st] == [("C", 0, 8), ("F", 8, 14)]
    assert schedule.lr_at(st, 1e-5, 2, 13) == pytest.approx(1e-5)  # no J: fixed


def test_grouped_adam_matches_numpy_and_keeps_frozen_slots():
    """grouped_adam: Adam with the rate groups, kernel-only L2 decay in the
    gradient, bias correction by the global count; frozen networks keep
    their moments and get no update."""
    rng = np.random.default_rng(1)
    params = _params(rng)
    mults, wd, lr, b1, b2, eps = (1.0, 2.0, 10.0, 20.0), 1e-2, 1e-3, 0.9, 0.999, 1e-8
    tx = optim.grouped_adam(lambda c: jnp.float32(lr), weight_decay=wd, lr_mult=mults,
                            trainable=("coarse", "fine"))
    state = tx.init(params)
    p = jax.tree.map(jnp.asarray, params)
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    m = jax.tree.map(np.zeros_like, w)
    v = jax.tree.map(np.zeros_like, w)
    for t in range(1, 4):
        g = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params)
        u, state = jax.jit(tx.update)(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        for net in ("coarse", "fine"):
            for layer, d in w[net].items():
                for name in d:
                    group = (0 if net == "coarse" else 2) + (name == "bias")
                    ge = g[net][layer][name] + (wd if name == "kernel" else 0.0) * d[name]
                    m[net][layer][name] = b1 * m[net][layer][name] + (1 - b1) * ge
                    v[net][layer][name] = b2 * v[net][layer][name] + (1 - b2) * ge ** 2
                    mh = m[net][layer][name] / (1 - b1 ** t)
                    vh = v[net][layer][name] / (1 - b2 ** t)
                    d[name] = d[name] - lr * mults[group] * mh / (np.sqrt(vh) + eps)
    for net in ("coarse", "fine"):
        for layer, d in w[net].items():
            for name, ref in d.items():
                np.testing.assert_allclose(np.asarray(p[net][layer][name]), ref,
                                           rtol=1e-5, atol=1e-6)
    # The frozen saliency network: unchanged, and its moments still zero.
    np.testing.assert_array_equal(np.asarray(p["saliency"]["s1"]["kernel"]),
                                  params["saliency"]["s1"]["kernel"])
    assert not np.any(np.asarray(state["mu"]["saliency"]["s1"]["kernel"]))
