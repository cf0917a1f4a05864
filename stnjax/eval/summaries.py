"""Summaries over cases, comparisons and threshold sweeps (the numbers, not their text).

Host-side only (NumPy, no JAX). The inference writes one
`records.CaseRecord` per test case with the DSC of every round 0..R and the
inter-iteration DSC of every round 1..R (reference section 4.3: all rounds
are recorded, and the result at a stopping threshold t is *read* from that
history). Everything here is computed from those histories, so a sweep over
t never reruns the networks.

Conventions:
- DSC values are fractions in [0, 1]; printed text shows percent.
- Standard deviations are population std (`np.std`, ddof=0), as the
  PyTorch reference prints (reference section 4.6).
- Means over several folds pool the cases (the paper's 82-case means), not
  the fold means. Per-fold groups are added when more than one fold is
  present.
- A threshold t must be > 0. t in (0, 1] is a stopping threshold; t > 1
  can never be reached, so it reads the last round R ("run all rounds").

The stopping rule itself lives with the records (`stnjax.eval.records`),
the text of a summary in `stnjax.eval.report` (which writes summary.json
and summary.txt), the figures in `stnjax.eval.plots`. `sweep.csv` is written
here; every file is written atomically (`stnjax.fileio`): a failing writer
leaves no file behind.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from stnjax import fileio
from stnjax.checks import InputError
from stnjax.eval.records import (REPORT_THRESHOLDS, CaseRecord, check_records, check_threshold,
                                 csv_text, read_at, result_at_threshold, stack_histories,
                                 to_jsonable)

MAIN_THRESHOLD = 0.99
INTER_REPORT_ROUNDS = (1, 2, 3, 5, 10)
SUMMARY_JSON, SUMMARY_TXT, SWEEP_CSV = "summary.json", "summary.txt", "sweep.csv"
METHOD_NAMES = {"rstn": "RSTN", "stagewise": "Stage-wise (C2F)",
                "rstn-sal-mask": "RSTN, saliency of the previous mask (paper)",
                "rstn-sal-coarse": "RSTN, saliency of the round-0 coarse map"}


# ---------------------------------------------------------------- thresholds
def parse_thresholds(text: str) -> tuple[float, ...]:
    """Parses "0.8,0.85,0.9" or ranges "0.80:0.99:0.01" (start:stop:step,
    stop included) into a sorted tuple of unique thresholds."""
    out: list[float] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) != 3:
                raise InputError(f"thresholds: range {part!r} is not start:stop:step")
            a, b, s = (check_threshold(x, f"thresholds ({part!r})") for x in bits)
            if b < a:
                raise InputError(f"thresholds: range {part!r} has stop < start")
            n = int(math.floor((b - a) / s + 1e-9))
            out.extend(round(a + i * s, 10) for i in range(n + 1))
        else:
            out.append(check_threshold(part, "thresholds"))
    if not out:
        raise InputError(f"thresholds: no threshold in {text!r}")
    return tuple(sorted(set(out)))


# ---------------------------------------------------------------- methods
def method_order(methods: Iterable[str]) -> list[str]:
    """"rstn" first, then the others alphabetically."""
    return sorted(set(methods), key=lambda m: (m != "rstn", m))


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


# ---------------------------------------------------------------- summaries
@dataclass(frozen=True)
class Stats:
    """Mean, population std, max, min over n values (fractions)."""
    mean: float
    std: float
    max: float
    min: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        v = np.asarray(values, np.float64)
        if v.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(float(v.mean()), float(v.std()), float(v.max()), float(v.min()), int(v.size))


@dataclass(frozen=True)
class ThresholdRow:
    """The result of a group of cases at one threshold t."""
    method: str
    t: float
    n: int
    mean: float
    std: float
    min: float
    max: float
    converged: int        # cases whose inter-DSC reached t
    mean_rounds: float    # mean round the result is read from
    inexact: int          # cases whose result needs rounds not run (early stop)
    mean_time_s: float | None  # coarse + rounds up to the result; None if unknown


def _threshold_row(recs: list[CaseRecord], t: float) -> ThresholdRow:
    d, i = stack_histories(recs)
    v, rounds, conv = read_at(d, i, t)
    run = np.array([r.rounds_run for r in recs])
    exact = (run == d.shape[1] - 1) | (rounds <= run)
    times = [r.time_until(int(k)) for r, k in zip(recs, rounds)]
    times = [x for x in times if x is not None]
    s = Stats.of(v)
    return ThresholdRow(recs[0].method, t, s.n, s.mean, s.std, s.min, s.max,
                        int(conv.sum()), float(rounds.mean()), int((~exact).sum()),
                        float(np.mean(times)) if len(times) == len(recs) else None)


@dataclass(frozen=True)
class GroupSummary:
    """All numbers for one method over one fold (or all folds: fold None)."""
    method: str
    fold: int | None
    folds: tuple[int, ...]               # the folds its cases come from
    n_cases: int
    num_rounds: int
    main: ThresholdRow                   # at the main threshold
    coarse: Stats                        # round 0
    per_round: list[Stats]               # rounds 0..R
    inter_mean: list[float | None]       # rounds 0..R, [0] None
    inter_at: dict[int, float]           # mean inter-DSC after rounds 1,2,3,5,10 (<= R)
    thresholds: list[ThresholdRow]
    metrics: dict[str, dict[str, Stats]]  # threshold key -> metric -> Stats of finite values
    oracle: dict[str, Stats]
    time: dict[str, float]               # mean seconds per case: coarse, rounds, total; per_round
    mean_rounds_run: float
    # Per round 0..R, means over the cases that hold the value (records'
    # extra["rounds"], `runs.round_diagnostics`): volume_ml, precision,
    # recall; {} for records without diagnostics.
    round_diagnostics: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Paired per-case comparison of `method` against `baseline` at t."""
    method: str
    baseline: str
    t: float
    n_paired: int
    n_unpaired: int
    n_better: int
    n_worse: int
    n_tied: int
    mean_diff: float
    largest_gain: float
    largest_gain_case: tuple[int, str]    # (fold, case_id)
    largest_loss: float                   # min difference (negative if any case is worse)
    largest_loss_case: tuple[int, str]
    p_wilcoxon: float | None


@dataclass(frozen=True)
class Summary:
    """Output of `summarize`: per-method groups (all folds first, then each
    fold when there are several) and paired comparisons; `to_dict` is the
    JSON form (fractions; non-finite values as "nan"/"inf")."""
    thresholds: tuple[float, ...]
    main_threshold: float
    groups: list[GroupSummary]
    comparisons: list[Comparison]

    def group(self, method: str, fold: int | None = None) -> GroupSummary:
        """The group of `method` over all folds (fold None) or one fold."""
        for g in self.groups:
            if g.method == method and (g.fold == fold or (g.fold is None and g.folds == (fold,))):
                return g
        raise KeyError(f"no summary group for method {method!r}, fold {fold}")

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def _group(recs: list[CaseRecord], fold: int | None, ts: tuple[float, ...],
           main_t: float) -> GroupSummary:
    d, i = stack_histories(recs)
    R = d.shape[1] - 1
    inter_mean = [None] + [float(x) for x in i[:, 1:].mean(axis=0)]
    metrics: dict[str, dict[str, Stats]] = {}
    for key in sorted({k for r in recs for k in r.metrics_at}, key=float):
        names = sorted({m for r in recs for m in r.metrics_at.get(key, {})} - {"round"})
        metrics[key] = {m: Stats.of([r.metrics_at[key][m] for r in recs
                                     if m in r.metrics_at.get(key, {})
                                     and math.isfinite(r.metrics_at[key][m])])
                        for m in names}
    oracle = {k: Stats.of([r.oracle[k] for r in recs if r.oracle and k in r.oracle])
              for k in sorted({k for r in recs for k in (r.oracle or {})})}
    t_round = sum(r.time_total_s - r.time_coarse_s for r in recs)
    n_round = sum(r.rounds_run for r in recs)
    time = {"coarse_s": float(np.mean([r.time_coarse_s for r in recs])),
            "rounds_s": t_round / len(recs),
            "total_s": float(np.mean([r.time_total_s for r in recs])),
            "per_round_s": t_round / n_round if n_round else math.nan}
    return GroupSummary(
        method=recs[0].method, fold=fold, folds=tuple(sorted({r.fold for r in recs})),
        n_cases=len(recs), num_rounds=R,
        main=_threshold_row(recs, main_t), coarse=Stats.of(d[:, 0]),
        per_round=[Stats.of(d[:, r]) for r in range(R + 1)], inter_mean=inter_mean,
        inter_at={r: inter_mean[r] for r in INTER_REPORT_ROUNDS if r <= R},
        thresholds=[_threshold_row(recs, t) for t in ts], metrics=metrics,
        oracle=oracle, time=time,
        mean_rounds_run=float(np.mean([r.rounds_run for r in recs])),
        round_diagnostics=_round_diagnostics(recs, R))


DIAGNOSTICS = ("volume_ml", "precision", "recall")


def _round_diagnostics(recs: list[CaseRecord], R: int) -> dict[str, list[float | None]]:
    """Per-round means of the diagnostics the records hold (None where no
    case has a value); {} when none has them."""
    held = [r.extra["rounds"] for r in recs if isinstance(r.extra.get("rounds"), dict)]
    if not held:
        return {}
    out = {}
    for name in DIAGNOSTICS:
        cols = [[h[name][k] for h in held if k < len(h.get(name, [])) and h[name][k] is not None]
                for k in range(R + 1)]
        out[name] = [float(np.mean(c)) if c else None for c in cols]
    return out


def compare(records: Sequence[CaseRecord], method: str, baseline: str,
            t: float = MAIN_THRESHOLD) -> Comparison:
    """Pairs the cases of `method` and `baseline` by (fold, case_id) and
    compares their DSC at t ("better on 67/82 cases, largest gain +17.60,
    largest loss -3.85"). p_wilcoxon: two-sided Wilcoxon signed-rank test
    (None with fewer than 2 non-tied pairs)."""
    t = check_threshold(t, "t")
    recs = check_records(records, "compare")
    at = {m: {(r.fold, r.case_id): result_at_threshold(r, t).dsc
              for r in recs if r.method == m} for m in (method, baseline)}
    for m in (method, baseline):
        if not at[m]:
            raise InputError(f"compare: no records of method {m!r}")
    keys = sorted(set(at[method]) & set(at[baseline]))
    if not keys:
        raise InputError(f"compare: methods {method!r} and {baseline!r} share no case")
    diff = np.array([at[method][k] - at[baseline][k] for k in keys])
    p = None
    if np.count_nonzero(diff) >= 2:
        from scipy.stats import wilcoxon
        p = float(wilcoxon(diff).pvalue)
    g, lo = int(diff.argmax()), int(diff.argmin())
    return Comparison(method, baseline, t, len(keys),
                      len(set(at[method]) ^ set(at[baseline])),
                      int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum()),
                      float(diff.mean()), float(diff[g]), keys[g], float(diff[lo]),
                      keys[lo], p)


def summarize(records: Sequence[CaseRecord],
              thresholds: Sequence[float] = REPORT_THRESHOLDS,
              main_threshold: float = MAIN_THRESHOLD) -> Summary:
    """Paper-style summary of per-case records, per method (all folds
    pooled, and per fold when several are present), plus paired comparisons
    of the first method ("rstn" if present) against every other one.

    Args:
      records: CaseRecords of one or several methods and folds; the round
        count must agree within a method.
      thresholds: the t values of the threshold table (the main one is added).
      main_threshold: the t of the headline result (0.99 in the paper).
    """
    recs = check_records(records, "summarize")
    main_t = check_threshold(main_threshold, "main_threshold")
    ts = tuple(sorted({check_threshold(t, "thresholds") for t in thresholds} | {main_t}))
    groups: list[GroupSummary] = []
    methods = method_order(r.method for r in recs)
    for m in methods:
        mine = [r for r in recs if r.method == m]
        groups.append(_group(mine, None, ts, main_t))
        folds = sorted({r.fold for r in mine})
        if len(folds) > 1:
            groups += [_group([r for r in mine if r.fold == f], f, ts, main_t) for f in folds]
    comps = []
    for b in methods[1:]:
        try:
            comps.append(compare(recs, methods[0], b, main_t))
        except InputError:      # no shared case: nothing to pair
            pass
    return Summary(ts, main_t, groups, comps)


# ------------------------------------------------------------------ sweeps
def sweep(records: Sequence[CaseRecord], thresholds: Sequence[float]) -> list[ThresholdRow]:
    """The convergence study: one `ThresholdRow` per (method, t), read from
    the recorded histories (no inference). Methods in `method_order`, t
    ascending. Rows with `inexact > 0` rely on rounds a stopped-early run
    did not compute."""
    recs = check_records(records, "sweep")
    ts = sorted({check_threshold(t, "thresholds") for t in thresholds})
    if not ts:
        raise InputError("sweep: no thresholds")
    return [_threshold_row([r for r in recs if r.method == m], t)
            for m in method_order(r.method for r in recs) for t in ts]


_SWEEP_COLUMNS = ("method", "t", "n", "mean_dsc", "std_dsc", "min_dsc", "max_dsc",
                  "converged", "mean_rounds", "inexact", "mean_time_s")


def sweep_csv_text(rows: Sequence[ThresholdRow]) -> str:
    return csv_text(_SWEEP_COLUMNS, (
        {"method": r.method, "t": r.t, "n": r.n, "mean_dsc": r.mean, "std_dsc": r.std,
         "min_dsc": r.min, "max_dsc": r.max, "converged": r.converged,
         "mean_rounds": r.mean_rounds, "inexact": r.inexact, "mean_time_s": r.mean_time_s}
        for r in rows))


def write_sweep_csv(rows: Sequence[ThresholdRow], path: str | os.PathLike) -> Path:
    """Writes the sweep table (DSC as fractions) atomically; returns the path."""
    if not rows:
        raise InputError("write_sweep_csv: empty sweep table")
    path = Path(path)
    fileio.atomic_write({path: sweep_csv_text(rows)}, "write_sweep_csv")
    return path
