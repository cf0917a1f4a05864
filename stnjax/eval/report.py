"""The text reports of an evaluation: the paper-style summary, the sweep table.

Numbers come from `stnjax.eval.summaries` (summaries, sweeps); this module
only lays them out and writes summary.json / summary.txt. Text prints DSC in
percent with two decimals, as the paper and the reference logs do ("DSC
84.50 +- 4.97 % (max 91.02, min 62.81)"), and mean inter-iteration DSC as a
fraction with four decimals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from stnjax import fileio
from stnjax.checks import InputError
from stnjax.eval.records import threshold_key
from stnjax.eval.summaries import (SUMMARY_JSON, SUMMARY_TXT, GroupSummary, Stats, Summary,
                                   ThresholdRow, method_name)

_STD_NOTE = "(std: population std over cases, as np.std in the PyTorch reference)"

def _pct(s: Stats) -> str:
    if s.n == 0:
        return "n/a"
    return (f"{100 * s.mean:.2f} +- {100 * s.std:.2f} % "
            f"(max {100 * s.max:.2f}, min {100 * s.min:.2f})")


_METRIC_ORDER = ("dsc", "jaccard", "hd95_mm", "surface_dice")
_METRIC_NAMES = {"dsc": "DSC", "jaccard": "Jaccard", "hd95_mm": "HD95",
                 "surface_dice": "surface Dice"}


def _stats(r: ThresholdRow) -> Stats:
    return Stats(r.mean, r.std, r.max, r.min, r.n)


def _metric(name: str, s: Stats, n_cases: int) -> str:
    label = _METRIC_NAMES.get(name, name)
    if s.n == 0:
        return f"{label} n/a"
    if name.endswith("_mm"):
        text = f"{label} {s.mean:.2f} +- {s.std:.2f} mm"
    elif name in ("dsc", "jaccard", "surface_dice"):
        text = f"{label} {100 * s.mean:.2f} +- {100 * s.std:.2f} %"
    else:
        text = f"{label} {s.mean:.4g} +- {s.std:.4g}"
    return text + (f" ({s.n}/{n_cases} finite)" if s.n < n_cases else "")


def _folds(folds: Sequence[int]) -> str:
    return ("fold " if len(folds) == 1 else "folds ") + ", ".join(map(str, folds))


def _row_time(r: ThresholdRow) -> str:
    return f"{r.mean_time_s:9.1f} s" if r.mean_time_s is not None else "        -  "


def _opt(v: float | None, scale: float, width: int) -> str:
    """A right-aligned number with 2 decimals (scaled), or "-" for None."""
    return f"{'-':>{width}}" if v is None else f"{scale * v:{width}.2f}"


def format_threshold_table(rows: Sequence[ThresholdRow], title: str = "") -> str:
    """A table of ThresholdRows (one summary group or a sweep)."""
    lines = [title] if title else []
    w = max([10] + [len(r.method) for r in rows])  # method names of variants are longer
    lines.append(f"  {'method':<{w}}     t    DSC %    std    min    max  converged  rounds  "
                 "time/case")
    for r in rows:
        star = " *" if r.inexact else ""
        lines.append(
            f"  {r.method:<{w}} {threshold_key(r.t):>5}  {100 * r.mean:6.2f} {100 * r.std:6.2f} "
            f"{100 * r.min:6.2f} {100 * r.max:6.2f}  {r.converged:4d}/{r.n:<4d}  "
            f"{r.mean_rounds:6.2f} {_row_time(r)}{star}")
    if any(r.inexact for r in rows):
        lines.append("  * some cases stopped early before reaching t: their result is read "
                     "from rounds filled in, not run (column 'inexact' of the CSV)")
    return "\n".join(lines)


def _format_group(g: GroupSummary, main_t: float) -> list[str]:
    m = g.main
    L = [f"== {method_name(g.method)} ({g.method}): {g.n_cases} case{'s' * (g.n_cases != 1)}, "
         f"{_folds(g.folds)}, "
         f"R = {g.num_rounds} rounds ==",
         f"t = {threshold_key(main_t)}: DSC {_pct(_stats(m))}; "
         f"converged {m.converged}/{m.n}, mean rounds {m.mean_rounds:.2f}",
         f"Coarse (round 0): DSC {_pct(g.coarse)}"]
    if g.inter_at:
        L.append(f"Mean inter-iteration DSC after rounds {', '.join(map(str, g.inter_at))}: "
                 + ", ".join(f"{v:.4f}" for v in g.inter_at.values()))
    diag = g.round_diagnostics
    head = "Per round:\n  round   DSC %    std    min    max  inter-DSC"
    L.append(head + ("   vol mL  prec %  recall %" if diag else ""))
    for r, s in enumerate(g.per_round):
        inter = "        -" if r == 0 else f"{g.inter_mean[r]:9.4f}"
        line = (f"  {r:5d}  {100 * s.mean:6.2f} {100 * s.std:6.2f} {100 * s.min:6.2f} "
                f"{100 * s.max:6.2f}  {inter}")
        if diag:
            line += (f"  {_opt(diag['volume_ml'][r], 1, 7)}  {_opt(diag['precision'][r], 100, 6)}"
                     f"  {_opt(diag['recall'][r], 100, 8)}")
        L.append(line)
    L.append(format_threshold_table(g.thresholds, "Stopping threshold t:"))
    for key, ms in g.metrics.items():
        names = sorted(ms, key=lambda k: (_METRIC_ORDER + (k,)).index(k))
        L.append(f"Full metrics at t = {key}: "
                 + "; ".join(_metric(k, ms[k], g.n_cases) for k in names))
    if g.oracle:
        L.append("Oracles: " + "; ".join(f"{k} {_pct(s)}" for k, s in g.oracle.items()))
    t = g.time
    L.append(f"Time per case: coarse {t['coarse_s']:.1f} s, rounds {t['rounds_s']:.1f} s "
             f"({t['per_round_s']:.2f} s per round, {g.mean_rounds_run:.2f} rounds run), "
             f"total {t['total_s']:.1f} s")
    return L


def _format_summary(summary: Summary) -> str:
    """The summary as printed text: per method a headline at the main t, the
    coarse result, inter-DSC after rounds 1/2/3/5/10, a per-round table, a
    threshold table, full metrics, oracles and times; a per-fold table when
    several folds are present; and the paired method comparisons."""
    out: list[str] = []
    main_t = summary.main_threshold
    for g in summary.groups:
        if g.fold is None:
            out += _format_group(g, main_t) + [""]
            folds = [f for f in summary.groups if f.method == g.method and f.fold is not None]
            if folds:
                out.append(f"Per fold ({method_name(g.method)}, t = {threshold_key(main_t)}):")
                for f in folds:
                    out.append(f"  fold {f.fold}: {f.n_cases:3d} cases, DSC {_pct(_stats(f.main))}"
                               f", coarse {100 * f.coarse.mean:.2f} %, converged "
                               f"{f.main.converged}/{f.n_cases}, rounds {f.main.mean_rounds:.2f}")
                out.append("")
    for c in summary.comparisons:
        p = f", Wilcoxon p = {c.p_wilcoxon:.3g}" if c.p_wilcoxon is not None else ""
        out.append(
            f"{method_name(c.method)} vs {method_name(c.baseline)} at t = {threshold_key(c.t)}: "
            f"better on {c.n_better}/{c.n_paired} cases (worse {c.n_worse}, tied {c.n_tied}), "
            f"mean difference {100 * c.mean_diff:+.2f}, largest gain {100 * c.largest_gain:+.2f} "
            f"(case {c.largest_gain_case[1]}, fold {c.largest_gain_case[0]}), largest loss "
            f"{100 * c.largest_loss:+.2f} (case {c.largest_loss_case[1]}, fold "
            f"{c.largest_loss_case[0]}){p}"
            + (f"; {c.n_unpaired} cases without a partner" if c.n_unpaired else ""))
    out.append(_STD_NOTE)
    return "\n".join(out) + "\n"




# ---------------------------------------------------------------- reports
def format_summary(summary: Summary) -> str:
    """The paper-style text of a summary."""
    return _format_summary(summary)


def format_sweep(rows: Sequence[ThresholdRow]) -> str:
    """The sweep table as printed text (DSC in percent)."""
    return format_threshold_table(rows, "Convergence study (result read from the history "
                                              "at each stopping threshold t):")


def write_summary(summary: Summary, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Writes out_dir/summary.json (all numbers, fractions) and
    out_dir/summary.txt (`format_summary`) atomically; returns the paths."""
    if not isinstance(summary, Summary):
        raise InputError(f"write_summary: expected a Summary, got {type(summary).__name__}")
    out = Path(out_dir)
    texts = {out / SUMMARY_JSON: json.dumps(summary.to_dict(), indent=1, allow_nan=False) + "\n",
             out / SUMMARY_TXT: format_summary(summary)}
    fileio.atomic_write(texts, "write_summary")
    return out / SUMMARY_JSON, out / SUMMARY_TXT
