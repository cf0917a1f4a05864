"""The full-width J step with two or more fine-crop canvas sets, interleaved in one process.

  python -m bench.ab_canvases --size=256 --calls=6 --sets="128,192,256" --sets="96,128,160,192,224,256"

Static shapes put each fine crop into the smallest canvas of `model.canvases`
that holds it (stnjax/models/crop.py), so the fine FCN-8s runs on the
canvas, not on the crop: the official code runs it on the crop itself. This
measures what a finer canvas set buys on `bench/synthetic.py`'s J batch (a
50 x 40 label box at 256, random margins as in training) against what it
costs to compile (one `lax.switch` branch per canvas, each a whole fine FCN
forward and backward). Prints each set's first call (compile + run), the
median step and the median of pair ratios against the first set. The losses
differ from the second step on: dropout masks are drawn in the canvas's
shape, so another canvas draws other masks.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from launch import hugepages

_SIZE = flags.DEFINE_integer("size", 256, "Slice side.")
_CALLS = flags.DEFINE_integer("calls", 6, "Timed calls of each set.")
_SETS = flags.DEFINE_multi_string("sets", ["128,192,256", "96,128,160,192,224,256"],
                                  "Canvas sides, comma-separated; give the flag once per set.")


def main(argv):
    del argv
    from bench.synthetic import blocking_call, build_stnjax_step

    sets = [tuple(int(s) for s in v.split(",")) for v in _SETS.value]

    calls = []
    for cv in sets:
        call = blocking_call(*build_stnjax_step(_SIZE.value, 1.0, "J", "custom", canvases=cv))
        t = time.perf_counter()
        call()
        print(f"canvases {cv}: first call {time.perf_counter() - t:.1f} s", flush=True)
        calls.append(call)
    times = [[] for _ in sets]
    for _ in range(_CALLS.value):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t)
    for i, cv in enumerate(sets):
        ratios = [a / b for a, b in zip(times[i], times[0])]
        print(f"canvases {cv}: median {statistics.median(times[i]):.3f} s, "
              f"median of pair ratios {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
