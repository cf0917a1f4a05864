"""Where one training step's time goes: a jax.profiler trace joined to the optimized HLO.

  python -m bench.profile_step --size=256 --calls=3 --out=/tmp/profile.json

Builds the step `bench/vs_official.py` times (engine: `bench/profiling.py`) (the one-device jitted step,
full width, batch 1, mode --mode, the same synthetic batch), compiles it,
runs --warmup untimed calls, then traces --calls calls. Every leaf thunk of
the trace is matched by name to an instruction of the optimized HLO, and its
time is summed three ways:

- by kind: the XLA:CPU operation (`ynn_fusion` = YNNPACK products and
  convolutions with their fused epilogues; `loop_fusion` / `input_fusion` =
  elementwise and reduction kernels; copy, slice, concatenate, pad,
  transpose, dynamic-(update-)slice, broadcast, ...);
- by source: forward or backward (`transpose(` in its op_name), coarse or
  fine network (the fine one runs in the canvas switch), and the layer named
  in the op_name ("other": outside the FCNs, e.g. the optimizer's update);
- the top --top instructions.

Per-call milliseconds are printed; --out writes them as JSON, with every
instruction's time (`instructions`) for a closer look.
Thunks inside loops (the row-loop kernel gradients) appear once per
iteration and are summed. Times are wall time of each thunk on this host,
so two thunks XLA runs concurrently both count.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from bench.profiling import profile
from launch import hugepages

_SIZE = flags.DEFINE_integer("size", 256, "Slice side.")
_WIDTH = flags.DEFINE_float("width", 1.0, "FCN width.")
_MODE = flags.DEFINE_enum("mode", "J", ["S", "I", "J"], "Training mode.")
_CALLS = flags.DEFINE_integer("calls", 3, "Traced calls.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before the trace.")
_TOP = flags.DEFINE_integer("top", 25, "Instructions listed.")
_OUT = flags.DEFINE_string("out", "", "Write the tables as JSON here.")


def _print(t: dict) -> None:
    print(f"traced thunks: {t['total_ms']:.0f} ms per call")
    for title, key in (("by kind", "by_kind_ms"), ("by source", "by_source_ms")):
        print(f"\n{title}:")
        for k, v in t[key].items():
            if v >= 1.0:
                print(f"  {v:9.1f} ms  {k}")
    print("\ntop instructions:")
    for r in t["top"]:
        print(f"  {r['ms']:9.1f} ms  {r['kind']:<14} {r['name']:<26} {r['op_name'][-80:]}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CALLS.value < 1:
        raise app.UsageError(f"--calls={_CALLS.value}: expected at least 1")
    import jax

    from bench.synthetic import build_stnjax_step

    fn, state, batch, _ = build_stnjax_step(_SIZE.value, _WIDTH.value, _MODE.value, "custom")
    compiled = fn.lower(state, batch).compile()
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    for _ in range(_WARMUP.value):
        call()
    t = profile(call, compiled.as_text(), _CALLS.value, _TOP.value)
    t.update(mode=_MODE.value, size=_SIZE.value, width=_WIDTH.value, calls=_CALLS.value,
             jax=jax.__version__, device=jax.devices()[0].device_kind, cpus=os.cpu_count())
    _print(t)
    if _OUT.value:
        from stnjax.fileio import atomic_write_text
        atomic_write_text(_OUT.value, json.dumps(t, indent=1) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
