"""Synthetic inputs shared by the training-step benchmarks.

The label box and the coarse bias of -20 (an empty coarse map, so J crops
by the label box) are what `bench/train_step.py` and `bench/vs_official.py`
(and its official worker) use, so their figures compare.
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
