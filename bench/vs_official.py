"""The joint training step of stnjax beside the official PyTorch RSTN, interleaved.

  python -m bench.vs_official --official=../shared/peer/OrganSegRSTN_PyTorch \\
      --torch_python=/path/to/torch-env/bin/python --out=bench/vs_official.json

One run, the same CPU, the same full-width FCN-8s (reference variant,
float32), batch 1, the same mode (J), the same synthetic slice and label: the
coarse score bias is -20 in both, so both coarse maps are empty and J crops
by the label box (a 100 x 80 box at 512, scaled to --size) with random
margins, as `bench/train_step.py`. The official step runs in a worker
process (`bench/official_worker.py`) under a Python that has torch, so that
neither torch nor the official code is a dependency of stnjax; each process
computes only while the other waits, and the timed calls alternate A/B after
--warmup untimed calls of each (stnjax's first call also compiles; that time
is reported apart). Reported: per-call times, medians, and the ratio
stnjax / official (below 1 = stnjax faster). The worker inherits this
process's memory settings (`launch/hugepages.py`: huge pages, and tcmalloc
where installed; STNJAX_MALLOC=glibc for glibc on both sides), so both
sides run with the same allocator; the JSON records which.

A path that does not hold the official `OrganSegRSTN/model.py`, or a Python
without torch, is an error naming what is missing, before anything is timed.
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

_OFFICIAL = flags.DEFINE_string("official", "../shared/peer/OrganSegRSTN_PyTorch",
                                "Folder of the official PyTorch RSTN (holds OrganSegRSTN/model.py).")
_TORCH_PY = flags.DEFINE_string("torch_python", sys.executable,
                                "Python interpreter that has torch, for the official side.")
_SIZE = flags.DEFINE_integer("size", 256, "Slice side.")
_WIDTH = flags.DEFINE_float("width", 1.0, "stnjax's FCN width (1 = the official network; "
                            "the official side is always full width).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads on the official side.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls of each side.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls of each side after set-up.")
_MODE = flags.DEFINE_enum("mode", "J", ["S", "I", "J"], "Training mode.")
_CONV_GRAD = flags.DEFINE_enum("conv_grad", "custom", ["custom", "taps", "xla"],
                               "stnjax's convolution gradients (FCN8s.conv_grad); 'xla' is "
                               "the formulation before session 4's fix, 'taps' the one "
                               "before session 12's Winograd, for an A/B.")
_PMAP = flags.DEFINE_bool("pmap", False, "stnjax as a one-device pmap instead of the jitted "
                          "step the loop runs on one device (slower on CPU, see placement.py).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


class OfficialWorker:
    """The official step in a subprocess; `step()` returns its seconds."""

    def __init__(self, python: str, official: str, size: int, threads: int, mode: str):
        model_py = os.path.join(official, "OrganSegRSTN", "model.py")
        if not os.path.isfile(model_py):
            raise app.UsageError(f"--official={official!r}: no official code there "
                                 f"({model_py} does not exist)")
        check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
        if check.returncode != 0:
            raise app.UsageError(
                f"--torch_python={python!r}: cannot import torch there (install a CPU build in "
                f"a separate environment, see ../shared/peer/README.md): "
                f"{check.stderr.strip().splitlines()[-1] if check.stderr.strip() else 'failed'}")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_worker.py")
        self.proc = subprocess.Popen(
            [python, worker, "--official", official, "--size", str(size), "--batch", "1",
             "--threads", str(threads), "--mode", mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self._read()
        if not line.startswith("ready "):
            raise RuntimeError(f"official worker did not start: {line}")
        self.info = json.loads(line[len("ready "):])

    def _read(self) -> str:
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("official worker exited without an answer")
        if line.startswith("error "):
            raise RuntimeError(f"official worker: {line[len('error '):]}")
        return line

    def step(self) -> tuple[float, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        _, dt, loss = self._read().split()
        return float(dt), float(loss)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _stnjax_step(size: int, width: float, mode: str, conv_grad: str, pmap: bool = False):
    """(call, first-call seconds): a zero-argument function running one step
    of `build_stnjax_step` and blocking on it; it returns the step's loss."""
    from bench.synthetic import blocking_call, build_stnjax_step

    fn, state, batch, place = build_stnjax_step(size, width, mode, conv_grad, pmap)
    call = blocking_call(fn, state, batch, place)
    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


def _timed(fn) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, loss


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    official = OfficialWorker(_TORCH_PY.value, _OFFICIAL.value, _SIZE.value, _THREADS.value,
                              _MODE.value)
    try:
        call, first_s = _stnjax_step(_SIZE.value, _WIDTH.value, _MODE.value, _CONV_GRAD.value,
                                     _PMAP.value)
        print(f"stnjax first call (compile + run): {first_s:.1f} s", flush=True)
        for _ in range(_WARMUP.value):
            call()
            official.step()
        rows = []
        for i in range(_STEPS.value):
            t_s, loss_s = _timed(call)
            t_o, loss_o = official.step()
            rows.append({"call": i, "stnjax_s": t_s, "official_s": t_o,
                         "stnjax_loss": loss_s, "official_loss": loss_o})
            print(f"  call {i}: stnjax {t_s:8.2f} s   official {t_o:8.2f} s", flush=True)
    finally:
        official.close()
    med_s = statistics.median(r["stnjax_s"] for r in rows)
    med_o = statistics.median(r["official_s"] for r in rows)
    # The median of the interleaved pairs' ratios: robust to a slow drift of
    # the machine's speed during the run.
    pair = statistics.median(r["stnjax_s"] / r["official_s"] for r in rows)
    print(f"\n{_MODE.value} step, batch 1, {_SIZE.value} x {_SIZE.value}, float32, stnjax width "
          f"{_WIDTH.value:g} ({_CONV_GRAD.value} conv gradients), "
          f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)")
    print(f"median: stnjax {med_s:.2f} s, official {med_o:.2f} s, "
          f"stnjax / official = {med_s / med_o:.2f} (median of the pairs' ratios {pair:.2f})")
    out = {"bench": "vs_official", "mode": _MODE.value, "size": _SIZE.value, "batch": 1,
           "width": _WIDTH.value, "conv_grad": _CONV_GRAD.value, "pmap": _PMAP.value,
           "dtype": "float32",
           "stnjax_first_call_s": first_s, "median_stnjax_s": med_s, "median_official_s": med_o,
           "ratio_stnjax_over_official": med_s / med_o, "median_pair_ratio": pair, "rows": rows,
           "official": official.info, "jax": jax.__version__, "cpus": os.cpu_count(),
           # Both processes run with these (the worker inherits them): launch/hugepages.py.
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
           "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "device": jax.devices()[0].device_kind}
    if _OUT.value:
        from stnjax.fileio import atomic_write_text
        atomic_write_text(_OUT.value, json.dumps(out, indent=2) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
