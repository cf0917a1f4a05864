"""Synthetic inputs shared by the training-step benchmarks.

The label box and the coarse bias of -20 (an empty coarse map, so J crops
by the label box) are what `bench/train_step.py` and `bench/vs_official.py`
(and its official worker) use, so their figures compare; `build_stnjax_step`
is the step `bench/vs_official.py` times and `bench/profile_step.py` profiles.
"""

from __future__ import annotations


def j_batch(b: int, size: int, crop: str) -> dict:
    """A host batch of b random slices (size x size x 3, NHWC float32) and a
    label box (100 x 80 at 512, scaled; crop="full": the whole slice), valid
    everywhere. NumPy only, so the official worker's torch environment can
    use it too."""
    import numpy as np
    rng = np.random.default_rng(0)
    image = rng.random((b, size, size, 3), dtype=np.float32)
    label = np.zeros((b, size, size, 3), np.float32)
    if crop == "full":
        label[:] = 1.0
    else:
        bh, bw = (size * 100) // 512, (size * 80) // 512
        r0, c0 = size // 2 - bh // 2, size // 2 - bw // 2
        label[:, r0:r0 + bh, c0:c0 + bw, :] = 1.0
    return {"image": image, "label": label, "hw": np.full((b, 2), size, np.int32),
            "weight": np.ones((b,), np.float32)}


def init_params(rstn) -> dict:
    """Float32 params on the host (the same for every dtype and batch)."""
    import jax
    from stnjax.train import state as st
    params = jax.device_get(jax.jit(rstn.init_params, static_argnums=1)(st.init_key(0), (32, 32)))
    # An empty coarse map: J crops by the label box (see the module doc).
    params["coarse"]["score_fr"]["bias"] = params["coarse"]["score_fr"]["bias"] - 20.0
    return params


def build_stnjax_step(size: int, width: float, mode: str, conv_grad: str,
                      pmap: bool = False, canvases: tuple[int, ...] | None = None) -> tuple:
    """(step function, device state, device batch, placement): stnjax's step as
    the training loop runs it on one device (jitted, state donated; `pmap`: a
    one-device pmap), on `j_batch`'s J batch of batch 1, size x size;
    `canvases`: the fine-crop canvas sides (None: the config's default)."""
    import dataclasses

    import jax

    from launch.configs.common import base_config
    from stnjax.models.rstn import RSTN
    from stnjax.train import state as st
    from stnjax.train import steps as stp
    from stnjax.train.placement import placement_for

    c = base_config()
    c.model.width = width
    c.train.stages = f"{mode}:1000000"
    if canvases is not None:
        c.model.canvases = tuple(canvases)
    rstn = RSTN.from_config(c.model)
    rstn = dataclasses.replace(rstn, fcn=rstn.fcn.clone(conv_grad=conv_grad))
    spec = stp.OptimizerSpec.from_config(c.train)
    place = placement_for(jax.local_devices()[:1], force_pmap=pmap)
    tx = spec.optimizer(stp.MODE_TRAINABLE[mode])
    state = place.put_state(st.init_train_state(init_params(rstn), tx, seed=0))
    batch = jax.device_put(place.put_batch(j_batch(1, size, "label")))
    return place.step(rstn, mode, spec, 1.0 / 3.0), state, batch, place


def blocking_call(fn, state, batch, place):
    """A zero-argument function running one step of `fn` on the held state
    (donated and replaced each call), blocking on it; returns the loss."""
    import jax

    holder = {"state": state}

    def call() -> float:
        holder["state"], metrics = fn(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        m = place.host_metrics(metrics)
        return float(m["loss"][0] / m["loss"][1])
    return call
