"""Training steps: 8 devices vs 1 device, one real step per mode.

The model is a real RSTN at 1/32 width on 32 x 32 slices. Parameters are
drawn on the host (NumPy) from the model's own parameter shapes: the model's
jitted He init costs a long RNG compile on CPU and is exercised by the
training-run tests instead.
"""

import jax
import numpy as np
import pytest

from launch.configs import smoke
from stnjax.models.rstn import RSTN
from stnjax.train import state as st
from stnjax.train import steps
from stnjax.train.schedule import parse_stages

H = W = 32
B = 8


def _rstn(dropout=0.5):
    c = smoke.get_config()
    c.model.dropout_rate = dropout
    # One canvas (the full 32 x 32 slice): the canvas is chosen per device
    # batch, so with several canvases 8 devices and 1 device could pick
    # different ones and crop with different zero padding.
    c.model.canvases = (W,)
    return RSTN.from_config(c.model)


def _params(rstn, seed=0):
    shapes = jax.eval_shape(lambda k: rstn.init_params(k, (H, W)), st.init_key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        scale = 0.01 if name == "bias" else np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return (rng.normal(size=s.shape) * scale).astype(np.float32)

    p = jax.tree_util.tree_map_with_path(leaf, shapes)
    # The reference saliency start: last layer zero weights, bias (1, 1.5, 2).
    last = sorted(p["saliency"])[-1]
    p["saliency"][last]["kernel"][:] = 0
    p["saliency"][last]["bias"][:] = (1.0, 1.5, 2.0)
    return p


def _batch(seed=0, pad_last=True):
    rng = np.random.default_rng(seed)
    image = rng.random((B, H, W, 3), dtype=np.float32)
    label = np.zeros((B, H, W, 3), np.float32)
    for b in range(B):
        r, c = rng.integers(2, 18, size=2)
        label[b, r:r + 8 + b % 3, c:c + 6, :] = 1.0
        image[b, r:r + 8, c:c + 6, :] += 0.5
    hw = np.full((B, 2), (H, W), np.int32)
    hw[1, 1] = 28  # a narrower slice padded to the bucket
    weight = np.ones((B,), np.float32)
    if pad_last:
        weight[-1] = 0.0  # a padding slot of the global batch
    return {"image": image, "label": label, "hw": hw, "weight": weight,
            "case_index": np.arange(B, dtype=np.int32), "slice_index": np.zeros(B, np.int32)}


SPEC = steps.OptimizerSpec(parse_stages("S:2,I:2,J:4"), 1e-3, 2, 0.99, 5e-4, (1.0, 2.0, 10.0, 20.0))


def _run(rstn, mode, params, batch, n_dev, n_steps=1, start_step=0):
    devices = tuple(jax.local_devices()[:n_dev])
    fn = steps.pmapped_step(rstn, mode, SPEC, 1.0 / 3.0, devices)
    state = st.init_train_state(params, SPEC.optimizer(), seed=0)
    state = dict(state, step=np.int32(start_step))
    state = st.replicate(state, devices)
    out = []
    for _ in range(n_steps):
        state, metrics = fn(state, steps.shard_batch(batch, n_dev))
        out.append(steps.first_replica(metrics))
    return st.unreplicate(state), out


def test_eight_devices_equal_one_device():
    assert jax.local_device_count() == 8, "conftest sets 8 fake CPU devices"
    rstn = _rstn()
    params = _params(rstn)
    batch = _batch()
    # Mode J at steps 4, 5 (J starts at 4): predicted boxes, dropout and
    # random margins all come from per-sample keys of the global index.
    s8, m8 = _run(rstn, "J", params, batch, 8, n_steps=2, start_step=4)
    s1, m1 = _run(rstn, "J", params, batch, 1, n_steps=2, start_step=4)
    # Tolerance: float32 sums in a different order (psum of 8 partial
    # gradients vs one batched sum). The momentum buffers (lr * (g + wd * w)
    # after two steps) agree to 2e-4 relative, with an absolute floor of
    # 1e-4 of the leaf's largest entry for entries near zero; the parameter
    # updates the same, plus 2 float32 ulps of the parameters' magnitude
    # (the updates are ~1e-5 of it, so p + u rounds).
    for a, b in zip(jax.tree.leaves(s8["opt_state"]["velocity"]),
                    jax.tree.leaves(s1["opt_state"]["velocity"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4 * np.abs(b).max())
    for a, b, p0 in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"]),
                        jax.tree.leaves(params)):
        d = np.abs(b - p0).max()
        np.testing.assert_allclose(a - p0, b - p0, rtol=2e-4,
                                   atol=1e-4 * d + 2.4e-7 * np.abs(p0).max())
    for a, b in zip(m8, m1):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The padded slot does not count: 7 real examples per step.
    assert m1[0]["loss"][1] == pytest.approx(7.0)
    assert int(s8["step"]) == int(s1["step"]) == 6
    # The updates are not trivially zero.
    moved = max(np.abs(a - p0).max() for a, p0 in zip(jax.tree.leaves(s1["params"]),
                                                       jax.tree.leaves(params)))
    assert moved > 1e-6


def _changed(before, after):
    return {net: [bool(np.any(np.asarray(a) != np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(before[net]), jax.tree.leaves(after[net]))]
            for net in before}


@pytest.mark.parametrize("mode", ["J", "F"])
def test_one_step_per_mode(mode):
    """One step: finite loss, trained networks change, frozen ones do not.

    J reuses the one-device program of the test above (same shapes); F is the
    stage-wise baseline's fine stage (coarse and saliency frozen). S and I are
    checked on real phantom data by the training-run tests (test_train_run).
    """
    rstn = _rstn()
    params = _params(rstn, seed=1)
    batch = _batch(seed=1)
    new, (metrics,) = _run(rstn, mode, params, batch, 1, start_step=4)
    loss = metrics["loss"][0] / metrics["loss"][1]
    assert np.isfinite(loss) and 0.0 < loss < 1.0
    lam = 1.0 / 3.0
    coarse = metrics["loss_coarse"][0] / metrics["loss_coarse"][1]
    fine = metrics["loss_fine"][0] / metrics["loss_fine"][1]
    np.testing.assert_allclose(loss, lam * coarse + (1 - lam) * fine, rtol=1e-5)
    trained = steps.MODE_TRAINABLE[mode] or ("coarse", "saliency", "fine")
    changed = _changed(params, new["params"])
    for net, flags in changed.items():
        if net in trained:
            assert any(flags), f"{mode}: {net} did not change"
            kernels = [f for f, path in zip(flags, jax.tree_util.tree_flatten_with_path(
                params[net])[0]) if path[0][-1].key == "kernel"]
            assert all(kernels), f"{mode}: a kernel of {net} did not change (weight decay)"
        else:
            assert not any(flags), f"{mode}: frozen {net} changed"
            assert not any(np.any(v) for v in jax.tree.leaves(new["opt_state"]["velocity"][net]))
    assert set(changed) == {"coarse", "saliency", "fine"}
    for leaf in jax.tree.leaves(new["params"]):
        assert leaf.dtype == np.float32
    assert int(new["step"]) == 5 and int(new["opt_state"]["count"]) == 1
    assert metrics["stat_overflow"][0] == 0.0


def test_stagewise_modes_share_the_s_forward():
    # The stage-wise baseline crops the raw image by the label box (the S
    # forward) and never trains the saliency module.
    assert steps.MODE_FORWARD["C"] == steps.MODE_FORWARD["F"] == "forward_stagewise"
    for m in ("C", "F", "CF"):
        assert "saliency" not in steps.MODE_TRAINABLE[m]
    rstn = _rstn()
    assert rstn.forward_stagewise == rstn.forward_s


def test_shard_batch_indices_and_errors():
    batch = _batch()
    out = steps.shard_batch(batch, 4, global_offset=16)
    assert out["image"].shape == (4, 2, H, W, 3)
    np.testing.assert_array_equal(out["index"].ravel(), np.arange(16, 24))
    np.testing.assert_array_equal(out["image"].reshape(B, H, W, 3), batch["image"])
    from stnjax.checks import InputError
    with pytest.raises(InputError, match="not a multiple of the 3 local devices"):
        steps.shard_batch(batch, 3)
    with pytest.raises(InputError, match="missing key 'weight'"):
        steps.shard_batch({k: v for k, v in batch.items() if k != "weight"}, 1)
