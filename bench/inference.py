"""Inference benchmark: coarse slices/s and end-to-end time per case.

  python bench/inference.py                 # 512 x 512, full width (GPU)
  python bench/inference.py --small         # tiny, runs in a minute on CPU
  python bench/inference.py --json=out.json --dtypes=bfloat16 --batch_sizes=16,32

1. Coarse throughput: the coarse FCN-8s (+ sigmoid) on (B, 512, 512, 3)
   batches, per dtype and batch size (after warm-up, block_until_ready).
2. End to end on a synthetic 512 x 512 x 240 phantom: the coarse stage of
   three planes, then the coarse-to-fine loop. The model is untrained, so
   its own masks say nothing about the work a trained model does; the loop
   therefore crops every round by the phantom's pancreas box (the weak
   oracle's crop, `crop_label=True`), which gives every round the work of a
   pancreas-sized crop, and runs all 10 rounds (an upper bound: the paper
   reports 5.22 rounds on average at t = 0.99). Reported: coarse time,
   time per round, and totals for 10 and for 5.22 rounds. Compilation is
   timed separately and excluded.
3. --cohort: cases per second of cohort inference (`stnjax.infer.cohort`:
   one case per device, a loader thread ahead of the devices) on 1, 2, 4,
   ... devices (--cohort_devices), and the idle fraction of each device; the
   same untrained models and phantom cases (--cohort_cases of them, all
   rounds run) for every device count, compilation done before the timing.
   On a CPU the devices are fake (`--xla_force_host_platform_device_count`,
   set here to the largest count unless XLA_FLAGS sets it): they share the
   machine's cores, so the figure says how well the scheduling overlaps,
   not what more chips would give.

  python bench/inference.py --cohort --small --cohort_devices=1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import hugepages  # noqa: E402
from launch.configs.common import base_config  # noqa: E402
from stnjax import infer  # noqa: E402
from stnjax.phantom import volumes as phantom  # noqa: E402
from stnjax.fileio import atomic_write_text  # noqa: E402
from stnjax.models.rstn import RSTN  # noqa: E402
from stnjax.data.preprocess import model_input  # noqa: E402
from stnjax.infer import cohort  # noqa: E402
from stnjax.infer.segmenter import Segmenter  # noqa: E402

PAPER_MEAN_ROUNDS = 5.22


def _time(fn, *args, iters: int) -> float:
    """Seconds per call after one warm-up call (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def make_rstn(width: float, variant: str, dtype: str) -> RSTN:
    cfg = base_config().model
    cfg.width, cfg.variant, cfg.dtype = width, variant, dtype
    return RSTN.from_config(cfg)


def coarse_throughput(width, variant, dtype, size, batch, iters) -> dict:
    rstn = make_rstn(width, variant, dtype)
    params = jax.jit(rstn.init_params, static_argnums=1)(jax.random.key(0), (size, size))
    x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    fn = jax.jit(rstn.coarse_prob)
    t0 = time.perf_counter()
    fn.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    sec = _time(fn, params, x, iters=iters)
    return {"dtype": dtype, "batch": batch, "ms_per_batch": 1e3 * sec,
            "slices_per_s": batch / sec, "compile_s": compile_s}


def end_to_end(width, variant, dtype, shape, batch, rounds) -> dict:
    rstn = make_rstn(width, variant, dtype)
    spec = infer.InferenceSpec(batch_size=batch, max_rounds=rounds)
    keys = jax.random.split(jax.random.key(0), 3)
    init = jax.jit(rstn.init_params, static_argnums=1)
    params = {p: init(k, (64, 64)) for p, k in zip("XYZ", keys)}
    hu, labels, _ = phantom.make_phantom(0, phantom.PhantomConfig(shape=shape))
    label = jnp.asarray(labels == phantom.PANCREAS_ID)
    image = jnp.asarray(model_input(hu))
    extent = jnp.asarray(shape, jnp.int32)

    def coarse(params, image, extent):
        return infer.coarse_probs(rstn, params, image, extent, spec=spec)

    def loop(params, image, extent, probs, label):
        score0, mask0 = infer.fuse(probs, infer.valid_mask(image.shape, extent))
        res = infer.coarse_to_fine(rstn, params, image, extent, score0, mask0,
                                   jnp.float32(2.0), spec=spec, label=label, crop_label=True)
        return res.mask, res.rounds

    t0 = time.perf_counter()
    coarse_c = jax.jit(coarse).lower(params, image, extent).compile()
    probs = jax.block_until_ready(coarse_c(params, image, extent))
    loop_c = jax.jit(loop).lower(params, image, extent, probs, label).compile()
    compile_s = time.perf_counter() - t0
    coarse_s = _time(coarse_c, params, image, extent, iters=2)
    loop_s = _time(loop_c, params, image, extent, probs, label, iters=2)
    ran = int(loop_c(params, image, extent, probs, label)[1])
    per_round = loop_s / ran
    return {"dtype": dtype, "volume": list(shape), "batch": batch,
            "pancreas_voxels": int(label.sum()), "coarse_s": coarse_s,
            "rounds_run": ran, "per_round_s": per_round,
            "total_10_rounds_s": coarse_s + 10 * per_round,
            f"total_{PAPER_MEAN_ROUNDS}_rounds_s": coarse_s + PAPER_MEAN_ROUNDS * per_round,
            "compile_s": compile_s}


def cohort_throughput(width, variant, dtype, shape, n_cases, device_counts, rounds) -> dict:
    """Cases/s and per-device idle fractions of `run_cases` over the first
    n local devices, for each n of `device_counts`."""
    rstn = make_rstn(width, variant, dtype)
    spec = infer.InferenceSpec(planes=("Z",), max_rounds=rounds)
    params = {"Z": jax.jit(rstn.init_params, static_argnums=1)(jax.random.key(0), (64, 64))}
    cases = []
    for i in range(n_cases):
        hu, labels, _ = phantom.make_phantom(i, phantom.PhantomConfig(shape=shape))
        cases.append((hu, labels == phantom.PANCREAS_ID))
    base = Segmenter(rstn, params, spec)
    rows = []
    for n in device_counts:
        segs = [base.on_device(d) for d in jax.local_devices()[:n]]
        for s in segs:  # compiled (first device) or loaded (the others), not timed
            s.segment(cases[0][0], label=cases[0][1])
        run = cohort.run_cases(
            [str(i) for i in range(n_cases)], segs,
            load=lambda k: (model_input(cases[int(k)][0]), cases[int(k)][1]),
            infer=lambda seg, c: seg.segment_image(c[0], label=c[1]),  # all rounds
            finish=lambda k, c, res, dev: None)
        if run.failed:
            raise run.failed[2]
        idle = run.idle_fraction()
        rows.append({"devices": n, "cases": n_cases, "wall_s": run.wall_s,
                     "cases_per_s": n_cases / run.wall_s,
                     "cases_per_device": {d.device: d.cases for d in run.devices},
                     "idle_fraction": idle})
        gain = rows[-1]["cases_per_s"] / rows[0]["cases_per_s"]
        print(f"cohort {n:2d} device(s): {n_cases} cases in {run.wall_s:6.2f} s, "
              f"{n_cases / run.wall_s:6.2f} cases/s (x{gain:.2f}); idle "
              + ", ".join(f"{d} {f:.2f}" for d, f in idle.items()), flush=True)
    return {"dtype": dtype, "volume": list(shape), "rounds": rounds, "planes": "Z",
            "runs": rows}


def _fake_cpu_devices(n: int) -> None:
    """On a CPU, `n` fake devices unless XLA_FLAGS sets a count (before the
    backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes for a CPU")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch_sizes", default="8,16,32")
    ap.add_argument("--variant", default="reference", choices=("reference", "pad32"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip_e2e", action="store_true")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--cohort", action="store_true", help="only the cohort benchmark")
    ap.add_argument("--cohort_devices", default="1,2,4", help="device counts to compare")
    ap.add_argument("--cohort_cases", type=int, default=16)
    ap.add_argument("--cohort_rounds", type=int, default=3)
    a = ap.parse_args()
    if a.cohort:
        counts = [int(n) for n in a.cohort_devices.split(",")]
        _fake_cpu_devices(max(counts))
        if max(counts) > len(jax.local_devices()):
            ap.error(f"--cohort_devices: {max(counts)} > {len(jax.local_devices())} local devices")
        width, shape = (1.0, (512, 512, 240)) if not a.small else (1 / 16, (96, 96, 48))
        r = cohort_throughput(width, a.variant, a.dtypes.split(",")[0], shape, a.cohort_cases,
                              counts, a.cohort_rounds)
        r.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                 jax=jax.__version__, width=width)
        if a.json:
            atomic_write_text(a.json, json.dumps(r, indent=2))
        return
    width, size, shape = (1.0, 512, (512, 512, 240)) if not a.small else \
        (1 / 16, 96, (96, 96, 48))
    dtypes = a.dtypes.split(",")
    batches = [int(b) for b in a.batch_sizes.split(",")]
    if a.small:
        batches, a.iters = [min(b, 8) for b in batches[:1]], 3
    results = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "jax": jax.__version__, "width": width, "variant": a.variant,
               "size": size, "coarse": [], "end_to_end": []}
    for dt in dtypes:
        for b in batches:
            r = coarse_throughput(width, a.variant, dt, size, b, a.iters)
            results["coarse"].append(r)
            print(f"coarse {dt:9s} batch {b:3d}: {r['ms_per_batch']:8.2f} ms/batch "
                  f"{r['slices_per_s']:8.1f} slices/s (compile {r['compile_s']:.1f} s)",
                  flush=True)
    if not a.skip_e2e:
        for dt in dtypes:
            r = end_to_end(width, a.variant, dt, shape, max(batches), 10)
            results["end_to_end"].append(r)
            print(f"end-to-end {dt:9s} {shape}: coarse {r['coarse_s']:.2f} s, "
                  f"{r['per_round_s']:.3f} s/round, total {r['total_10_rounds_s']:.2f} s "
                  f"(10 rounds) / {r[f'total_{PAPER_MEAN_ROUNDS}_rounds_s']:.2f} s "
                  f"({PAPER_MEAN_ROUNDS} rounds), compile {r['compile_s']:.1f} s", flush=True)
    if a.json:
        atomic_write_text(a.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    main()
