"""The training step after the speed fix: the same update, compiled once.

* One J step (the fine network inside the canvas `lax.switch`, two canvases)
  with the written-out convolution gradients (`FCN8s.conv_grad="custom"`,
  the default) gives the parameters and momentum of XLA's own gradients
  (`"xla"`, the formulation before the fix) to float32 rounding (J has every
  path S and I have, and the saliency and crop besides; tests/test_layers.py
  checks each convolution form on its own).
* A step compiles once per (mode, bucket): counted with JAX's own
  backend-compile events while S runs on two buckets and J on one, twice
  each (the second time on the first one's output state, as the loop does).
  This test and the next use XLA's own convolution gradients, which
  compile in about two thirds of the time; what they check does not depend
  on the convolution form.
* The one-device placement (a jitted step, no device axis) gives the update
  of a one-device pmap and compiles once too (mode S: the placement does not
  depend on the mode, and S compiles in a fraction of J's time);
  `placement_for` picks it only for one local device on one host.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax._src import dispatch, monitoring

from launch.configs import smoke
from stnjax.checks import InputError
from stnjax.models.rstn import RSTN
from stnjax.train import state as st
from stnjax.train import steps
from stnjax.train.placement import OneDevice, Pmapped, placement_for
from stnjax.train.schedule import parse_stages

SPEC = steps.OptimizerSpec(parse_stages("S:2,I:2,J:4"), 1e-3, 2, 0.99, 5e-4, (1.0, 2.0, 10.0, 20.0))


def _rstn(conv_grad="custom", canvases=(16, 32)):
    c = smoke.get_config()
    c.model.canvases = canvases  # two canvases: the fine net runs inside lax.switch
    rstn = RSTN.from_config(c.model)
    return dataclasses.replace(rstn, fcn=rstn.fcn.clone(conv_grad=conv_grad))


def _params(rstn, hw=(32, 32)):
    shapes = jax.eval_shape(lambda k: rstn.init_params(k, hw), st.init_key(0))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        scale = 0.05 if path[-1].key == "bias" else np.sqrt(2.0 / np.prod(s.shape[:-1]))
        return (rng.normal(size=s.shape) * scale).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _batch(h=32, w=32, b=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((b, h, w, 3), dtype=np.float32)
    label = np.zeros((b, h, w, 3), np.float32)
    label[0, 8:14, 6:12] = 1.0
    label[1, 3:9, 10:20] = 1.0
    return {"image": image, "label": label, "hw": np.full((b, 2), (h, w), np.int32),
            "weight": np.ones((b,), np.float32)}


def _step(rstn, mode, params, batch, start_step):
    dev = (jax.local_devices()[0],)
    fn = steps.pmapped_step(rstn, mode, SPEC, 1.0 / 3.0, dev)
    state = dict(st.init_train_state(params, SPEC.optimizer(), seed=0), step=np.int32(start_step))
    new, metrics = fn(st.replicate(state, dev), steps.shard_batch(batch, 1))
    return st.unreplicate(new), steps.first_replica(metrics)


@pytest.mark.parametrize("mode,start", [("J", 4)])
def test_custom_conv_gradients_give_the_same_update(mode, start):
    params = _params(_rstn())
    batch = _batch()
    got, m_got = _step(_rstn("custom"), mode, params, batch, start)
    want, m_want = _step(_rstn("xla"), mode, params, batch, start)
    np.testing.assert_allclose(m_got["loss"][0], m_want["loss"][0], rtol=1e-5)
    assert float(m_got["stat_box_area"][0]) == float(m_want["stat_box_area"][0]) > 0
    before = jax.tree.leaves(params)
    paths = jax.tree_util.tree_flatten_with_path(got["params"])[0]
    for (path, a), b, p0, va, vb in zip(paths, jax.tree.leaves(want["params"]), before,
                                        jax.tree.leaves(got["opt_state"]["velocity"]),
                                        jax.tree.leaves(want["opt_state"]["velocity"])):
        # The momentum after one step from zero is the update itself (lr x the
        # decayed gradient): compared relative to its largest entry.
        vscale = max(float(np.abs(np.asarray(vb)).max()), 1e-30)
        err = float(np.abs(np.asarray(va) - np.asarray(vb)).max()) / vscale
        assert err < 1e-4, (jax.tree_util.keystr(path), err)
        # The parameters: the same, up to the rounding of p + update.
        ulp = 4 * np.finfo(np.float32).eps * float(np.abs(p0).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=ulp + 1e-4 * vscale, err_msg=jax.tree_util.keystr(path))


def test_one_compilation_per_mode_and_bucket():
    """Each step runs twice, the second time on the first one's output state
    (as the loop does), over two devices: a state whose sharding differs from
    the step's outputs would compile the program a second time."""
    names = []

    def listen(event, duration, **kw):
        # pmap lowers through jit of a wrapper named _fun; helper jits have their own names.
        if event == dispatch.BACKEND_COMPILE_EVENT and kw.get("fun_name") == "jit(_fun)":
            names.append(kw["fun_name"])

    devs = tuple(jax.local_devices()[:2])
    assert len(devs) == 2, "conftest fakes 8 CPU devices"
    monitoring.register_event_duration_secs_listener(listen)
    try:
        # A fresh function object: no reuse. XLA's convolution gradients
        # compile in two thirds of the time, and placement does not depend
        # on them.
        rstn = dataclasses.replace(_rstn("xla"), margin=2)
        params = _params(rstn)
        for mode, start, hw in (("S", 0, (32, 32)), ("S", 0, (32, 24)), ("J", 4, (32, 32))):
            fn = steps.pmapped_step(rstn, mode, SPEC, 1.0 / 3.0, devs)
            state = st.replicate(
                dict(st.init_train_state(params, SPEC.optimizer(), seed=0),
                     step=np.int32(start)), devs)
            for rep in range(2):
                state, _ = fn(state, steps.shard_batch(_batch(*hw, seed=rep), len(devs)))
            assert int(st.unreplicate(state)["step"]) == start + 2
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert len(names) == 3, names


def _run_twice(place, rstn, mode, params, start):
    state = place.put_state(dict(st.init_train_state(params, SPEC.optimizer(), seed=0),
                                 step=np.int32(start)))
    fn = place.step(rstn, mode, SPEC, 1.0 / 3.0)
    for rep in range(2):
        state, metrics = fn(state, place.put_batch(_batch(seed=rep)))
    return place.host_state(state), place.host_metrics(metrics)


def test_one_device_jit_equals_one_device_pmap_and_compiles_once():
    names = []

    def listen(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT and kw.get("fun_name") == "jit(step)":
            names.append(kw["fun_name"])

    # A fresh function object: no reuse; one canvas and XLA's convolution
    # gradients, the cheapest step to compile twice (the placement is what
    # is tested).
    rstn = dataclasses.replace(_rstn("xla", canvases=(32,)), margin=3)
    params = _params(rstn)
    dev = jax.local_devices()[:1]
    monitoring.register_event_duration_secs_listener(listen)
    try:
        one, m_one = _run_twice(placement_for(dev, process_count=1), rstn, "S", params, 0)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert names == ["jit(step)"], names
    ref, m_ref = _run_twice(placement_for(dev, process_count=1, force_pmap=True),
                            rstn, "S", params, 0)
    assert int(one["step"]) == int(ref["step"]) == 2
    for k, (s, c) in m_ref.items():
        np.testing.assert_allclose(m_one[k][0], s, rtol=1e-5, atol=1e-6, err_msg=k)
        assert float(m_one[k][1]) == float(c), k
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one["params"]),
                            jax.tree.leaves(ref["params"])):
        scale = float(np.abs(b).max()) + 1e-6
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_placement_for_picks_jit_only_for_one_local_device_on_one_host():
    devs = jax.local_devices()
    assert isinstance(placement_for(devs[:1], process_count=1), OneDevice)
    two = placement_for(devs[:2], process_count=1)
    assert isinstance(two, Pmapped) and two.pmap_devices == tuple(devs[:2])
    assert isinstance(placement_for(devs[:1], process_count=1, force_pmap=True), Pmapped)
    hosts = placement_for(devs[:1], process_count=2)  # pmap spans every global device
    assert isinstance(hosts, Pmapped) and hosts.pmap_devices == tuple(jax.devices())
    with pytest.raises(InputError, match="devices"):
        placement_for([], process_count=1)
    batch = _batch()
    flat, sharded = OneDevice(devs[0]).put_batch(batch, global_offset=4), two.put_batch(batch)
    np.testing.assert_array_equal(flat["index"], [4, 5])
    assert sharded["image"].shape == (2, 1, 32, 32, 3) and flat["image"].shape == (2, 32, 32, 3)
