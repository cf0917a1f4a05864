"""The training step after the speed fix: the same update, compiled once.

* One J step (the fine network inside the canvas `lax.switch`, two canvases)
  with the written-out convolution gradients (`FCN8s.conv_grad="custom"`,
  the default) gives the parameters and momentum of XLA's own gradients
  (`"xla"`, the formulation before the fix) to float32 rounding (J has every
  path S and I have, and the saliency and crop besides; tests/test_layers.py
  checks each convolution form on its own).
* A step compiles once per (mode, bucket): counted with JAX's own
  backend-compile events while S runs on one bucket and J on two, twice each.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax._src import dispatch, monitoring

from launch.configs import smoke
from stnjax.models.rstn import RSTN
from stnjax.train import state as st
from stnjax.train import steps
from stnjax.train.schedule import parse_stages

SPEC = steps.OptimizerSpec(parse_stages("S:2,I:2,J:4"), 1e-3, 2, 0.99, 5e-4, (1.0, 2.0, 10.0, 20.0))


def _rstn(conv_grad="custom"):
    c = smoke.get_config()
    c.model.canvases = (16, 32)  # two canvases: the fine net runs inside lax.switch
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
    return {"image": image, "label": label, "valid": np.ones((b, h, w), bool),
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
    names = []

    def listen(event, duration, **kw):
        # pmap lowers through jit of a wrapper named _fun; helper jits have their own names.
        if event == dispatch.BACKEND_COMPILE_EVENT and kw.get("fun_name") == "jit(_fun)":
            names.append(kw["fun_name"])

    monitoring.register_event_duration_secs_listener(listen)
    try:
        rstn = dataclasses.replace(_rstn(), margin=2)  # a fresh function object: no reuse
        params = _params(rstn)
        for mode, start, hw in (("S", 0, (32, 32)), ("J", 4, (32, 32)), ("J", 4, (32, 24))):
            for rep in range(2):
                _step(rstn, mode, params, _batch(*hw, seed=rep), start)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert len(names) == 3, names
