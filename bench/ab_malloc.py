"""The J step under glibc and under tcmalloc, interleaved (launch/hugepages.py).

  python -m bench.ab_malloc --size=256 --calls=8

The allocator is chosen when a process starts, so each side is a worker
process of its own (this script with --worker, started once with
STNJAX_MALLOC=glibc and once with the default, which preloads tcmalloc
where it is installed), building `bench/synthetic.py`'s full-width J step
and timing one call per request; the timed calls alternate between the
two, so a drift of the machine's speed moves both alike. Prints each side's
allocator, median, the median of the pair ratios (tcmalloc / glibc) and
the losses, which must be the same bits (the allocator does not change
the arithmetic). No tcmalloc installed: an error saying so.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from launch import hugepages

_SIZE = flags.DEFINE_integer("size", 256, "Slice side.")
_CALLS = flags.DEFINE_integer("calls", 8, "Timed calls of each side.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: run as a worker process.")


def _worker() -> None:
    """Builds the step, prints `ready <allocator>`, then `<seconds> <loss>` per `step` line."""
    from bench.synthetic import blocking_call, build_stnjax_step

    call = blocking_call(*build_stnjax_step(_SIZE.value, 1.0, "J", "custom"))
    call()  # compile and warm up
    print("ready", hugepages.allocator(), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = call()
        print(f"{time.perf_counter() - t0} {loss!r}", flush=True)


def _start(malloc: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, STNJAX_MALLOC=malloc)
    env.pop("LD_PRELOAD", None)
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.Popen([sys.executable, "-m", "bench.ab_malloc", "--worker",
                             f"--size={_SIZE.value}"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"worker ({malloc}) did not start")
    return proc, line[1]


def _step(proc: subprocess.Popen) -> tuple[float, str]:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    seconds, loss = proc.stdout.readline().split()
    return float(seconds), loss


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        return _worker()
    if hugepages.find_tcmalloc({}) is None:
        raise app.UsageError("no tcmalloc installed (libtcmalloc_minimal.so.4): nothing to "
                             "compare; on Debian/Ubuntu: apt-get install libtcmalloc-minimal4")
    sides = {name: _start(name) for name in ("glibc", "auto")}  # one after the other
    rows = []
    try:
        for _ in range(_CALLS.value):
            rows.append({name: _step(proc) for name, (proc, _) in sides.items()})
    finally:
        for proc, _ in sides.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    out = {name: {"allocator": alloc,
                  "median_s": statistics.median(r[name][0] for r in rows),
                  "losses": [r[name][1] for r in rows]} for name, (_, alloc) in sides.items()}
    out["median_pair_ratio_auto_over_glibc"] = statistics.median(
        r["auto"][0] / r["glibc"][0] for r in rows)
    out["same_losses"] = out["auto"]["losses"] == out["glibc"]["losses"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # a worker gets its side's allocator here
    app.run(main)
