"""Where a compiled program's time goes: a jax.profiler trace joined to its optimized HLO.

`profile(call, hlo_text, calls, top)` traces `calls` runs of a compiled
program and matches every leaf thunk of the trace by name to an instruction
of the program's optimized HLO (`hlo_index`), then sums the time by XLA
operation kind, by source (forward or backward, coarse or fine network,
layer) and per instruction (`tables`). Used by `bench/profile_step.py`; no
flags here, so tests and other scripts can import it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s+\(")
_META = re.compile(r'op_name="([^"]*)"')
_LAYER = re.compile(r"^(conv\d_\d|fc\d|score\w*|upscore\w*|pool\d|Saliency\w*|saliency\w*)$")
_CONTAINERS = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter",
               "constant", "bitcast"}


def hlo_index(hlo_text: str) -> dict[str, dict]:
    """instruction name -> {'kind', 'op_name'} from optimized HLO text.

    A fusion's kind is its `kind=` attribute's form (loop/input/output fusion)
    or, for YNNPACK fusions, `ynn_fusion`. Instructions without metadata (XLA
    drops it inside loop bodies and on YNNPACK fusions) take their first
    operand's, else that of the while or conditional that calls their
    computation, so the row loops are attributed to their layer."""
    index, comp_of, caller, operands = {}, {}, {}, {}
    comp = ""
    for line in hlo_text.splitlines():
        head = _COMP.match(line)
        if head:
            comp = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        kind = op
        if op == "fusion":
            k = re.search(r"kind=k(\w+)", line)
            kind = "ynn_fusion" if name.startswith("ynn") else (
                f"{k.group(1).lower()}_fusion" if k else "fusion")
        meta = _META.search(line)
        index[name] = {"kind": kind, "op_name": meta.group(1) if meta else ""}
        comp_of[name] = comp
        args = line[m.end():].split(")", 1)[0]
        operands[name] = re.findall(r"%([\w.\-]+)", args)
        for callee in re.findall(r"(?:body|condition|branch_computations|to_apply)=\{?%?([\w.\-]+)",
                                 line):
            caller[callee] = name
        for callee in re.findall(r"branch_computations=\{([^}]*)\}", line):
            for c in callee.split(","):
                caller[c.strip().lstrip("%")] = name
    for name, info in index.items():
        if not info["op_name"]:  # YNNPACK fusions: their operands' (bitcasts, copies)
            info["op_name"] = next((index[o]["op_name"] for o in operands[name]
                                    if o in index and index[o]["op_name"]), "")
        c, seen = comp_of[name], 0
        while not info["op_name"] and c in caller and seen < 20:
            info["op_name"] = index[caller[c]]["op_name"]
            c, seen = comp_of[caller[c]], seen + 1
    return index


def leaf_times(trace_events: list[dict], index: dict[str, dict]) -> dict[str, float]:
    """instruction name -> summed microseconds over the trace's complete events
    whose name is an HLO instruction (containers such as while excluded)."""
    total = collections.Counter()
    for e in trace_events:
        if e.get("ph") != "X":
            continue
        info = index.get(e["name"])
        if info is None or info["kind"] in _CONTAINERS:
            continue
        total[e["name"]] += float(e.get("dur", 0.0))
    return dict(total)


def _source(info: dict) -> str:
    """'<forward|backward> <coarse|fine> <layer or op>' from an op_name: the fine
    network runs inside the canvas switch (`cond/`), the backward is JAX's
    `transpose(`; the optimizer's update is outside both FCNs."""
    op = info["op_name"]
    side = "backward" if "transpose(" in op else "forward"
    parts = [p for p in op.split("/") if p]
    layer = next((p for p in parts if _LAYER.match(p)), None)
    if "FCN8s" not in op and layer is None:
        return f"other: {'/'.join(parts[-2:]) or '?'}"
    # The canvas switch is a cond around the whole fine FCN; the CPU row loops'
    # platform_dependent is a cond inside a layer, after "FCN8s".
    net = "fine" if 0 <= op.find("cond/") < op.find("FCN8s") else "coarse"
    return f"{side} {net} {layer or parts[-1]}"


def tables(times: dict[str, float], index: dict[str, dict], calls: int, top: int) -> dict:
    """Per-call milliseconds by kind, by source and for the top instructions."""
    by_kind, by_source = collections.Counter(), collections.Counter()
    for name, us in times.items():
        by_kind[index[name]["kind"]] += us
        by_source[_source(index[name])] += us
    per = 1e-3 / calls
    return {
        "total_ms": sum(times.values()) * per,
        "by_kind_ms": {k: v * per for k, v in by_kind.most_common()},
        "by_source_ms": {k: v * per for k, v in by_source.most_common()},
        "top": [{"name": n, "ms": us * per, **index[n], "source": _source(index[n])}
                for n, us in collections.Counter(times).most_common(top)],
    }


def profile(call: Callable[[], None], hlo_text: str, calls: int, top: int) -> dict:
    """Runs `call` (one blocking call of the compiled program whose optimized
    HLO is `hlo_text`) `calls` times under jax.profiler and returns `tables`
    plus 'instructions': every traced instruction's per-call time."""
    import jax

    index = hlo_index(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not path:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {tmp}")
        with gzip.open(path[0], "rt") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = leaf_times(events, index)
    t = tables(times, index, calls, top)
    t["instructions"] = tables(times, index, calls, len(times))["top"]
    return t
