"""A/B of the step's speed settings (sessions 8 and 12), in one process, interleaved.

  python -m bench.ab_step --size=256 --calls=10
  python -m bench.ab_step --variants=taps,new --calls=8

Builds the full-width J step of `bench/synthetic.py` (what
`bench/vs_official.py` times) once per variant and times them in turn, so a
drift of the machine's speed moves every variant alike:

- old: one row a loop iteration (`conv.ROW_UNROLL` = 1) and the full
  canvas's residuals saved (`RSTN.remat_full_canvas` off);
- unroll: only the first of the two changes; remat: only the second;
- taps: both, with the convolutions' session-8 forms (`FCN8s.conv_grad=
  "taps"`, the defaults until session 12);
- new: the library's defaults (both, and Winograd for the 3 x 3 layers
  where it pays on CPU, `FCN8s.conv_grad="custom"`).

Prints each variant's first call (compile + run), median and median of the
pair ratios against the first variant given, and the loss of each (equal:
the session-8 settings do not change the arithmetic; Winograd changes it
at float32 rounding).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from absl import app, flags

from launch import hugepages

_SIZE = flags.DEFINE_integer("size", 256, "Slice side.")
_WIDTH = flags.DEFINE_float("width", 1.0, "FCN width.")
_CALLS = flags.DEFINE_integer("calls", 10, "Timed calls of each variant.")
_VARIANTS = flags.DEFINE_list("variants", ["old", "new"],
                              "From old, unroll, remat, taps, new.")

# (rows an iteration or None = the default, remat_full_canvas, FCN8s.conv_grad)
_SETTINGS = {"old": (1, False, "taps"), "unroll": (None, False, "taps"),
             "remat": (1, True, "taps"), "taps": (None, True, "taps"),
             "new": (None, True, "custom")}


def _variant_step(name: str):
    """A zero-argument blocking call of the step under variant `name`; returns its loss."""
    from bench.synthetic import blocking_call, build_stnjax_step
    from stnjax.models import conv
    from stnjax.models import rstn as rstn_lib
    from stnjax.train import steps as stp

    unroll, remat, conv_grad = _SETTINGS[name]
    default_unroll = conv.ROW_UNROLL
    conv.ROW_UNROLL = default_unroll if unroll is None else unroll
    original = rstn_lib.RSTN.from_config
    rstn_lib.RSTN.from_config = classmethod(
        lambda cls, m: dataclasses.replace(original.__func__(cls, m), remat_full_canvas=remat))
    stp.jitted_step.cache_clear()
    try:
        call = blocking_call(*build_stnjax_step(_SIZE.value, _WIDTH.value, "J", conv_grad))
        t0 = time.perf_counter()
        loss = call()  # traced now, under this variant's settings
        print(f"{name}: first call {time.perf_counter() - t0:.1f} s, loss {loss:.7f}", flush=True)
    finally:
        conv.ROW_UNROLL = default_unroll
        rstn_lib.RSTN.from_config = original
    return call


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    bad = [v for v in _VARIANTS.value if v not in _SETTINGS]
    if bad or len(_VARIANTS.value) < 2:
        raise app.UsageError(f"--variants: expected two or more of {sorted(_SETTINGS)}, "
                             f"got {_VARIANTS.value}")
    calls = {v: _variant_step(v) for v in _VARIANTS.value}
    times = {v: [] for v in calls}
    for i in range(_CALLS.value):
        for v, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[v].append(time.perf_counter() - t0)
        print(f"  call {i}: " + "  ".join(f"{v} {t[-1]:.2f} s" for v, t in times.items()),
              flush=True)
    base = _VARIANTS.value[0]
    for v, t in times.items():
        pair = statistics.median(a / b for a, b in zip(t, times[base]))
        print(f"{v}: median {statistics.median(t):.2f} s, median of pair ratios vs {base} "
              f"{pair:.3f}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
