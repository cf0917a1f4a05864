"""Benchmark of the joint training step (mode J): ms/step and examples/s.

  python -m bench.train_step --out=bench/train_step.json          # 512 x 512, full width
  python -m bench.train_step --small --out=/tmp/train_step.json   # tiny, on CPU

Measures the step the training loop runs on one device
(`stnjax.train.placement.OneDevice`: the jitted step, state donated, Caffe SGD update included) on a
synthetic batch already on the device, for each compute dtype and batch size:
compile, `--warmup` steps, then `--steps` timed steps closed by
`block_until_ready`. Batch sizes that run out of memory are reported and
skipped.

The fine crop: an untrained coarse net's >= 0.5 map covers most of the slice,
so J would crop the whole slice. Training in J crops around the pancreas, so
the coarse score bias is set to -20 here: its map is empty and J falls back to
the label box (reference 2.4), a 100 x 80 organ box plus the random margins
(0..40 per side), which lands in the 192 or 256 canvas as a real J step does.
`--crop=full` instead makes every box the whole slice (the worst case).

Anchor (issue 4): on one H100 the official PyTorch RSTN takes 32.1 ms/step in
float32 (TF32 convolutions) and 27.2 ms/step with bfloat16 autocast, batch 1,
512 x 512; the target is at least twice its examples/s.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from bench.synthetic import init_params as _init_params
from bench.synthetic import j_batch as _batch
from launch import hugepages

_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes for a CPU run.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_BATCHES = flags.DEFINE_list("batches", [], "Batch sizes (default 1,4,8; --small: 1,2).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps (default 20; --small: 3).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_SIZE = flags.DEFINE_integer("size", 0, "Slice side (default 512; --small: 64).")
_CROP = flags.DEFINE_enum("crop", "label", ["label", "full"], "Fine crop (see above).")
_VARIANT = flags.DEFINE_string("variant", "reference", "FCN-8s variant: reference or pad32.")
_POOL = flags.DEFINE_enum(
    "pool", "reshape", ["reshape", "window"],
    "Max pooling: reshape + max with an elementwise gradient (the code's) or the "
    "reduce_window form whose gradient is XLA's select-and-scatter (an ablation; the "
    "results are bit-identical).")

_CONV_GRAD = flags.DEFINE_enum(
    "conv_grad", "custom", ["custom", "taps", "xla"],
    "Convolution gradients: written out (stnjax.models.conv.conv2d, the code's), the same "
    "without Winograd ('taps', before session 12) or XLA's own (the formulation before "
    "session 4's fix; 10-100x slower inside the canvas switch on CPU).")

_PMAP = flags.DEFINE_bool("pmap", False, "A one-device pmap instead of the jitted step "
                          "(what the loop ran before; slower on CPU, see placement.py).")

PYTORCH_MS = {"float32": 32.1, "bfloat16": 27.2}  # official RSTN, H100, batch 1


def _measure(rstn, params, spec, dtype, b, size, crop, steps, warmup):
    import jax
    import numpy as np
    from stnjax.train import state as st
    from stnjax.train.placement import placement_for

    place = placement_for(jax.local_devices()[:1], force_pmap=_PMAP.value)
    state = place.put_state(st.init_train_state(params, spec.optimizer(), seed=0))
    batch = jax.device_put(place.put_batch(_batch(b, size, crop)))
    fn = place.step(rstn, "J", spec, 1.0 / 3.0)
    t0 = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / steps
    m = place.host_metrics(metrics)
    loss = float(m["loss"][0] / m["loss"][1])
    box = float(m["stat_box_area"][0] / m["stat_box_area"][1])
    return {"dtype": dtype, "batch": b, "ms_per_step": 1e3 * dt, "examples_per_s": b / dt,
            "compile_s": compile_s, "loss": loss, "mean_box_area": box,
            "fallback": float(m["stat_fallback"][0]), "finite": bool(np.isfinite(loss))}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from launch.configs.common import base_config
    from stnjax.models.rstn import RSTN
    from stnjax.train import steps as stp

    if _POOL.value == "window":
        from stnjax.models import fcn8s
        fcn8s.max_pool_ceil = fcn8s.max_pool_ceil_window  # read when the step is traced
    small = _SMALL.value
    size = _SIZE.value or (64 if small else 512)
    batches = [int(b) for b in _BATCHES.value] or ([1, 2] if small else [1, 4, 8])
    steps = _STEPS.value or (3 if small else 20)
    c = base_config()
    c.model.width = 1.0 / 16.0 if small else 1.0
    c.model.variant = _VARIANT.value
    c.train.stages = "J:1000000"
    spec = stp.OptimizerSpec.from_config(c.train)
    device = jax.local_devices()[0]
    rows = []
    params = None
    for dtype in _DTYPES.value:
        c.model.dtype = dtype
        rstn = RSTN.from_config(c.model)
        rstn = dataclasses.replace(rstn, fcn=rstn.fcn.clone(conv_grad=_CONV_GRAD.value))
        params = params if params is not None else _init_params(rstn)
        for b in batches:
            try:
                rows.append(_measure(rstn, params, spec, dtype, b, size, _CROP.value, steps,
                                     _WARMUP.value))
            except Exception as e:  # noqa: BLE001 - out of memory: report and skip larger
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                rows.append({"dtype": dtype, "batch": b, "error": "out of memory"})
                break
            print(f"  {dtype:9s} batch {b:3d}: {rows[-1]['ms_per_step']:8.2f} ms/step "
                  f"{rows[-1]['examples_per_s']:8.2f} ex/s (compile {rows[-1]['compile_s']:.1f} s)",
                  flush=True)
    print(f"\nJ step, {size} x {size}, width {c.model.width:g}, variant {c.model.variant}, "
          f"pool {_POOL.value}, conv_grad {_CONV_GRAD.value}, crop {_CROP.value}, device {device.device_kind} ({jax.default_backend()})")
    print(f"{'dtype':9s} {'batch':>5s} {'ms/step':>9s} {'ex/s':>9s} {'vs PyTorch':>10s}")
    best = {}
    for r in rows:
        if "error" in r:
            print(f"{r['dtype']:9s} {r['batch']:5d} {'OOM':>9s}")
            continue
        ref = 1e3 / PYTORCH_MS[r["dtype"]]
        ratio = r["examples_per_s"] / ref if not small and size == 512 else None
        r["vs_pytorch_batch1"] = ratio
        shown = f"{ratio:9.2f}x" if ratio is not None else f"{'-':>10s}"
        print(f"{r['dtype']:9s} {r['batch']:5d} {r['ms_per_step']:9.2f} "
              f"{r['examples_per_s']:9.2f} {shown}")
        if r["examples_per_s"] > best.get(r["dtype"], {}).get("examples_per_s", 0):
            best[r["dtype"]] = r
    out = {"bench": "train_step", "mode": "J", "size": size, "width": c.model.width,
           "variant": c.model.variant, "pool": _POOL.value, "conv_grad": _CONV_GRAD.value,
           "crop": _CROP.value, "steps": steps,
           "warmup": _WARMUP.value, "device": device.device_kind,
           "backend": jax.default_backend(), "jax": jax.__version__,
           "pytorch_ms_per_step_batch1": PYTORCH_MS, "rows": rows,
           "best_batch": {k: v["batch"] for k, v in best.items()}}
    if _OUT.value:
        from stnjax.fileio import atomic_write_text
        atomic_write_text(_OUT.value, json.dumps(out, indent=2) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
