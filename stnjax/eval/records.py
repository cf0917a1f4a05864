"""Per-case evaluation records and their files (cases.json, cases.csv).

Host-side only (NumPy, no JAX). The inference writes one `CaseRecord` per
test case with the DSC of every round 0..R and the inter-iteration DSC of
every round 1..R (reference section 4.3); the stopping rule
(`result_at_threshold`, at the end of this module) reads the result at a
threshold from such a history, and `stnjax.eval.summaries` builds summaries
and sweeps on it.

File formats: `cases.json` (the exact record, source of truth) and
`cases.csv` (one flat row per case, with the result at each report
threshold read by `result_at_threshold`). Both are written
atomically (`stnjax.fileio`); a failing writer leaves no file behind.

Conventions: DSC values are fractions in [0, 1]. A threshold t must be > 0;
t in (0, 1] is a stopping threshold, t > 1 reads the last round R. Keys of
thresholds in JSON and CSV are `threshold_key(t)` ("0.90", "0.995").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from stnjax import fileio
from stnjax.checks import InputError

REPORT_THRESHOLDS = (0.90, 0.95, 0.98, 0.99)
#: The fields of a CaseRecord that say how and where a case ran, not what
#: it gave: wall-clock times (they vary from run to run) and the device and
#: process (they vary with the device and process count). Every other field
#: is the same bits for a case on any device of any process (cohort
#: inference, tests/test_experiment.py).
RUN_FIELDS = ("time_coarse_s", "time_rounds_s", "time_loop_s", "device", "process")
CASES_JSON, CASES_CSV = "cases.json", "cases.csv"
_FORMAT, _VERSION = "stnjax.cases", 1


# ---------------------------------------------------------------- thresholds
def check_threshold(t: Any, name: str = "threshold") -> float:
    """Returns `t` as a float; `InputError` unless t > 0 (t > 1: never stop)."""
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number, got {t!r}") from None
    if math.isnan(v) or v <= 0.0:
        raise InputError(
            f"{name}: a stopping threshold must lie in (0, 1] (or above 1, "
            f"meaning 'never stop, read round R'); got {t!r}")
    return v


def threshold_key(t: Any) -> str:
    """The string form of a threshold used in JSON keys and CSV columns:
    two decimals when exact ("0.90", "0.99"), else the shortest repr
    ("0.995")."""
    v = check_threshold(t)
    s = f"{v:.2f}"
    return s if float(s) == v else repr(v)


# ---------------------------------------------------------------- the record
def _plain(x: Any) -> Any:
    """NumPy scalars/arrays and tuples -> plain JSON-able Python values."""
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _num(v: Any, where: str, lo: float = -math.inf, hi: float = math.inf,
         finite: bool = True) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected a number, got {v!r}") from None
    if finite and not math.isfinite(f):
        raise InputError(f"{where}: expected a finite number, got {f}")
    if math.isfinite(f) and not lo <= f <= hi:
        raise InputError(f"{where}: {f} is outside [{lo}, {hi}]")
    return f


def _int(v: Any, where: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, (bool, float)) or not isinstance(v, (int, np.integer)):
        raise InputError(f"{where}: expected an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        raise InputError(f"{where}: {v} is outside [{lo}, {hi}]")
    return v


@dataclass
class CaseRecord:
    """The evaluation of one test case by one method.

    Fields (R = number of coarse-to-fine rounds, the same for all cases of
    a method):
      case_id, fold, method: identity; method e.g. "rstn" or "stagewise".
      gt_voxels: voxels in the ground-truth mask. spacing: mm per axis (3).
      dsc_rounds: R+1 DSCs; [0] = round 0 (fused coarse mask), [r] = round
        r. Rounds that were not run hold the previous round's value (the
        producer fills them: a skipped round keeps its mask).
      inter_dsc: R+1 values; [0] is None (unused), [r] = DSC(mask_{r-1},
        mask_r), 1 when both are empty.
      rounds_run: rounds actually computed (R unless stopped early).
      time_coarse_s, time_rounds_s: seconds, the coarse stage and each round,
        measured one by one (`infer.per_round_timing`); empty when the
        rounds ran as one jitted loop, whose total is then time_loop_s.
      time_loop_s: the rounds' total when they ran as one loop (0 otherwise).
      metrics_at: threshold key ("0.99") -> {"dsc", "jaccard", "hd95_mm",
        "surface_dice", "round"} where full metrics were computed.
      oracle: optional {"strong", "weak", "gt_crop"} -> DSC. extra: any
        JSON-able values (NumPy values are converted).
      device, process: where the case ran ("cpu:3", `jax.process_index()`;
        "" and 0 in records written before cohort inference). Like the
        times, they do not take part in any result: a case gives the same
        record on any device and process but for these and the times.
    Construction validates and normalises (floats, tuples, keys); bad values
    raise `InputError` naming the case and field.
    """

    case_id: str
    fold: int
    method: str
    gt_voxels: int
    spacing: tuple[float, float, float]
    dsc_rounds: list[float]
    inter_dsc: list[float | None]
    rounds_run: int
    time_coarse_s: float
    time_rounds_s: list[float]
    time_loop_s: float = 0.0
    metrics_at: dict[str, dict[str, float]] = field(default_factory=dict)
    oracle: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    process: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.case_id, str) or not self.case_id:
            raise InputError(f"CaseRecord.case_id: expected a non-empty str, got {self.case_id!r}")
        w = f"CaseRecord(case_id={self.case_id!r}, method={self.method!r})"
        if not isinstance(self.method, str) or not self.method:
            raise InputError(f"{w}.method: expected a non-empty str")
        self.fold = _int(self.fold, f"{w}.fold")
        if not isinstance(self.device, str):
            raise InputError(f"{w}.device: expected a str, got {self.device!r}")
        self.process = _int(self.process, f"{w}.process")
        self.gt_voxels = _int(self.gt_voxels, f"{w}.gt_voxels")
        sp = list(_plain(self.spacing)) if self.spacing is not None else []
        if len(sp) != 3:
            raise InputError(f"{w}.spacing: expected 3 values, got {self.spacing!r}")
        self.spacing = tuple(_num(s, f"{w}.spacing", 1e-9) for s in sp)
        d = _plain(self.dsc_rounds)
        if not isinstance(d, list) or len(d) < 2:
            raise InputError(f"{w}.dsc_rounds: expected R+1 >= 2 values, got {self.dsc_rounds!r}")
        self.dsc_rounds = [_num(v, f"{w}.dsc_rounds[{i}]", 0, 1) for i, v in enumerate(d)]
        n = len(d)
        i_ = _plain(self.inter_dsc)
        if not isinstance(i_, list) or len(i_) != n:
            raise InputError(
                f"{w}.inter_dsc: expected {n} values (same as dsc_rounds), "
                f"got {0 if not isinstance(i_, list) else len(i_)}")
        self.inter_dsc = [None] + [_num(v, f"{w}.inter_dsc[{r}]", 0, 1)
                                   for r, v in enumerate(i_[1:], 1)]
        self.rounds_run = _int(self.rounds_run, f"{w}.rounds_run", 0, n - 1)
        self.time_coarse_s = _num(self.time_coarse_s, f"{w}.time_coarse_s", 0)
        self.time_rounds_s = [_num(v, f"{w}.time_rounds_s", 0)
                              for v in _plain(list(self.time_rounds_s))]
        self.time_loop_s = _num(self.time_loop_s, f"{w}.time_loop_s", 0)
        ma = {}
        for k, m in dict(self.metrics_at or {}).items():
            key = threshold_key(check_threshold(k, f"{w}.metrics_at key"))
            if not isinstance(m, Mapping) or "round" not in m:
                raise InputError(f"{w}.metrics_at[{key}]: expected a dict with a 'round'")
            ma[key] = {str(mk): (_int(mv, f"{w}.metrics_at[{key}].round", 0, n - 1)
                                 if mk == "round" else
                                 _num(mv, f"{w}.metrics_at[{key}].{mk}", finite=False))
                       for mk, mv in m.items()}
        self.metrics_at = ma
        if self.oracle is not None:
            self.oracle = {str(k): _num(v, f"{w}.oracle[{k}]", 0, 1)
                           for k, v in dict(self.oracle).items()}
        self.extra = _plain(dict(self.extra or {}))
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputError(f"{w}.extra: not JSON-serialisable ({e})") from None

    @property
    def time_total_s(self) -> float:
        """Seconds of the coarse stage and all rounds run."""
        return self.time_coarse_s + sum(self.time_rounds_s) + self.time_loop_s

    def time_until(self, k: int) -> float | None:
        """Seconds of the coarse stage and rounds 1..k; None when not
        measured (the rounds ran as one loop that went on past round k)."""
        if len(self.time_rounds_s) >= k:
            return self.time_coarse_s + sum(self.time_rounds_s[:k])
        if self.time_loop_s and k == self.rounds_run:
            return self.time_coarse_s + self.time_loop_s
        return None

    @property
    def num_rounds(self) -> int:
        """R, the number of coarse-to-fine rounds in the history."""
        return len(self.dsc_rounds) - 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite metric values become "nan"/"inf"."""
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["metrics_at"] = {k: {mk: _enc(mv) for mk, mv in m.items()}
                           for k, m in self.metrics_at.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "CaseRecord":
        """Inverse of `to_dict`; unknown or missing fields are an error."""
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, Mapping):
            raise InputError(f"{where}: expected an object, got {type(d).__name__}")
        if set(d) - names:
            raise InputError(f"{where}: unknown fields {sorted(set(d) - names)}")
        required = names - {"metrics_at", "oracle", "extra", "device", "process",
                            "time_loop_s"}
        if required - set(d):
            raise InputError(f"{where}: missing fields {sorted(required - set(d))}")
        return cls(**d)


def without_run_fields(record: CaseRecord) -> CaseRecord:
    """The record with its `RUN_FIELDS` blanked: what two runs of the same
    case must agree on."""
    return replace(record, time_coarse_s=0.0, time_rounds_s=[], time_loop_s=0.0, device="",
                   process=0)


def _enc(v: Any) -> Any:
    """Non-finite floats -> "nan"/"inf"/"-inf" so the JSON stays standard."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def to_jsonable(x: Any) -> Any:
    x = _plain(x)
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_jsonable(v) for v in x]
    return _enc(x)


# ------------------------------------------------------------- validation
def check_records(records: Iterable[CaseRecord], what: str) -> list[CaseRecord]:
    """A non-empty list of CaseRecords, one round count per method, no
    duplicate (method, fold, case)."""
    recs = list(records)
    if not recs:
        raise InputError(f"{what}: no records (empty list)")
    seen: dict[tuple, None] = {}
    rounds: dict[str, dict[int, list[str]]] = {}
    for k, r in enumerate(recs):
        if not isinstance(r, CaseRecord):
            raise InputError(f"{what}: item {k} is a {type(r).__name__}, not a CaseRecord")
        key = (r.method, r.fold, r.case_id)
        if key in seen:
            raise InputError(f"{what}: duplicate record for method {r.method!r}, "
                             f"fold {r.fold}, case {r.case_id!r}")
        seen[key] = None
        rounds.setdefault(r.method, {}).setdefault(r.num_rounds, []).append(r.case_id)
    for m, by_r in rounds.items():
        if len(by_r) > 1:
            desc = "; ".join(f"R={n}: cases {ids[:5]}{'...' if len(ids) > 5 else ''}"
                             for n, ids in sorted(by_r.items()))
            raise InputError(f"{what}: records of method {m!r} have unequal round "
                             f"counts ({desc}); evaluate them with the same max_rounds")
    return recs


# ------------------------------------------------------------- CSV cells
def _fmt(v: Any) -> str:
    """CSV cell: repr for floats (exact round trip), "" for None."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(to_jsonable(v), allow_nan=False, sort_keys=True)
    return str(v)


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV text with a header row: one line per row, `_fmt` cells ("" when missing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


# ------------------------------------------------------- records on disk
def _base_columns(recs: Sequence[CaseRecord]) -> list[str]:
    R = max(r.num_rounds for r in recs)
    nt = max(len(r.time_rounds_s) for r in recs)
    cols = ["case_id", "fold", "method", "gt_voxels", "spacing_0", "spacing_1", "spacing_2",
            "rounds_run", "time_coarse_s", "time_loop_s", "time_total_s", "device", "process"]
    cols += [f"dsc_r{r}" for r in range(R + 1)] + [f"inter_r{r}" for r in range(1, R + 1)]
    cols += [f"time_r{r}" for r in range(1, nt + 1)]
    return cols


def records_csv_text(records: Sequence[CaseRecord],
                     thresholds: Sequence[float] = REPORT_THRESHOLDS) -> str:
    """One row per case. Columns: identity, spacing_0..2, times, dsc_r0..R,
    inter_r1..R, time_r1..; read from the history by the stopping rule for
    each t in `thresholds` and in metrics_at: dsc_t<t>, rounds_t<t>,
    converged_t<t> (0/1); the producer's full metrics: <metric>_at<t>
    (e.g. hd95_mm_at0.99, round_at0.99); oracle_<name>; extra_<key> (JSON)."""
    recs = check_records(records, "records_csv_text")
    keys = sorted({threshold_key(t) for t in thresholds}
                  | {k for r in recs for k in r.metrics_at}, key=float)
    cols = _base_columns(recs)
    cols += [f"{c}_t{k}" for k in keys for c in ("dsc", "rounds", "converged")]
    for k in keys:
        names = {m for r in recs for m in r.metrics_at.get(k, {})}
        cols += [f"{m}_at{k}" for m in sorted(names)]
    cols += [f"oracle_{k}" for k in sorted({k for r in recs for k in (r.oracle or {})})]
    cols += [f"extra_{k}" for k in sorted({k for r in recs for k in r.extra})]
    rows = []
    for r in recs:
        row: dict[str, Any] = {"case_id": r.case_id, "fold": r.fold, "method": r.method,
                               "gt_voxels": r.gt_voxels, "rounds_run": r.rounds_run,
                               "time_coarse_s": r.time_coarse_s, "time_loop_s": r.time_loop_s,
                               "time_total_s": r.time_total_s,
                               "device": r.device, "process": r.process}
        row.update({f"spacing_{a}": s for a, s in enumerate(r.spacing)})
        row.update({f"dsc_r{i}": v for i, v in enumerate(r.dsc_rounds)})
        row.update({f"inter_r{i}": v for i, v in enumerate(r.inter_dsc) if i})
        row.update({f"time_r{i}": v for i, v in enumerate(r.time_rounds_s, 1)})
        for k in keys:
            res = result_at_threshold(r, float(k))
            row.update({f"dsc_t{k}": res.dsc, f"rounds_t{k}": res.round,
                        f"converged_t{k}": res.converged})
            row.update({f"{m}_at{k}": v for m, v in r.metrics_at.get(k, {}).items()})
        row.update({f"oracle_{k}": v for k, v in (r.oracle or {}).items()})
        row.update({f"extra_{k}": _extra_text(v) for k, v in r.extra.items()})
        rows.append(row)
    return csv_text(cols, rows)


_AT_COLUMN = re.compile(r"^(.+)_at(\d+(?:\.\d*)?|inf)$")


def _extra_text(v: Any) -> str:
    """Strings stay readable; anything else (and a string that would parse
    as JSON) is JSON, so `_extra_cell` gets the value back exactly."""
    if isinstance(v, str):
        try:
            json.loads(v)
        except ValueError:
            return v
    return json.dumps(v)


def _extra_cell(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def records_from_csv(path: str | os.PathLike) -> list[CaseRecord]:
    """Rebuilds CaseRecords from `records_csv_text` output (derived columns
    such as dsc_t<t> are ignored; extra values are parsed as JSON when they
    parse, else kept as strings)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for n, row in enumerate(rows, 2):
        where = f"{path}, line {n}"
        try:
            cells = {k: v for k, v in row.items() if v not in ("", None)}
            R = sum(1 for k in cells if k.startswith("dsc_r")) - 1
            nt = sum(1 for k in cells if k.startswith("time_r"))
            ma: dict[str, dict[str, Any]] = {}
            for k, v in cells.items():
                hit = _AT_COLUMN.match(k)
                if hit and not k.startswith(("extra_", "oracle_")):
                    m, key = hit.groups()
                    ma.setdefault(key, {})[m] = int(v) if m == "round" else float(v)
            oracle = {k[7:]: float(v) for k, v in cells.items() if k.startswith("oracle_")}
            extra = {k[6:]: _extra_cell(v) for k, v in cells.items() if k.startswith("extra_")}
            out.append(CaseRecord(
                case_id=cells["case_id"], fold=int(cells["fold"]), method=cells["method"],
                gt_voxels=int(cells["gt_voxels"]),
                spacing=[float(cells[f"spacing_{a}"]) for a in range(3)],
                dsc_rounds=[float(cells[f"dsc_r{i}"]) for i in range(R + 1)],
                inter_dsc=[None] + [float(cells[f"inter_r{i}"]) for i in range(1, R + 1)],
                rounds_run=int(cells["rounds_run"]), time_coarse_s=float(cells["time_coarse_s"]),
                time_rounds_s=[float(cells[f"time_r{i}"]) for i in range(1, nt + 1)],
                time_loop_s=float(cells.get("time_loop_s", 0.0)),
                metrics_at=ma,
                oracle=oracle or None, extra=extra, device=cells.get("device", ""),
                process=int(cells.get("process", 0))))
        except (KeyError, ValueError) as e:
            raise InputError(f"{where}: bad or missing cell ({e})") from None
    if not out:
        raise InputError(f"{path}: no records")
    return out


def records_json_text(records: Sequence[CaseRecord]) -> str:
    """The cases.json text: {"format", "version", "records": [to_dict(), ...]}."""
    recs = check_records(records, "records_json_text")
    doc = {"format": _FORMAT, "version": _VERSION, "records": [r.to_dict() for r in recs]}
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def write_records(records: Sequence[CaseRecord], out_dir: str | os.PathLike,
                  thresholds: Sequence[float] = REPORT_THRESHOLDS) -> tuple[Path, Path]:
    """Writes out_dir/cases.json (exact) and out_dir/cases.csv (flat, with
    dsc/rounds/converged at each of `thresholds`), atomically: both texts are
    built before anything is written, and on error neither file appears.
    Returns the two paths."""
    out = Path(out_dir)
    texts = {out / CASES_JSON: records_json_text(records),
             out / CASES_CSV: records_csv_text(records, thresholds)}
    fileio.atomic_write(texts, "write_records")
    return out / CASES_JSON, out / CASES_CSV


def _read_json_records(path: Path) -> list[CaseRecord]:
    try:
        doc = fileio.read_json(path, "records")
    except ValueError as e:
        raise InputError(str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise InputError(f"{path}: not a {_FORMAT} file (no 'format': {_FORMAT!r})")
    if doc.get("version") != _VERSION:
        raise InputError(f"{path}: version {doc.get('version')!r}, expected {_VERSION}")
    return [CaseRecord.from_dict(d, f"{path}, record {i}") for i, d in enumerate(doc["records"])]


def read_records(*paths: str | os.PathLike) -> list[CaseRecord]:
    """Reads records from cases.json / .csv files or folders (a folder: its
    cases.json, else every cases.json below it, sorted). Several paths are
    concatenated; duplicate (method, fold, case) and mixed round counts
    within a method are an error."""
    if not paths:
        raise InputError("read_records: no path given")
    recs: list[CaseRecord] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = [p / CASES_JSON] if (p / CASES_JSON).is_file() else sorted(p.rglob(CASES_JSON))
            if not files:
                raise InputError(f"read_records: no {CASES_JSON} in or below {p}")
        elif p.is_file():
            files = [p]
        else:
            raise InputError(f"read_records: {p} does not exist")
        for f in files:
            recs += records_from_csv(f) if f.suffix == ".csv" else _read_json_records(f)
    return check_records(recs, f"read_records({', '.join(map(str, paths))})")


# ------------------------------------------------------- the stopping rule
class ThresholdResult(NamedTuple):
    """The result of one case at threshold t: DSC, the round it is read
    from, and whether the inter-iteration DSC reached t by then."""
    dsc: float
    round: int
    converged: bool


def stack_histories(records: Sequence[CaseRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(N, R+1) float64 DSC and inter-DSC arrays ([:, 0] of inter is NaN)."""
    d = np.array([r.dsc_rounds for r in records], np.float64)
    i = np.array([[np.nan] + r.inter_dsc[1:] for r in records], np.float64)
    return d, i


def read_at(dsc: np.ndarray, inter: np.ndarray, t: float):
    """Vectorised rule over (N, R+1) histories -> (dsc, round, converged)."""
    hit = inter[:, 1:] >= t                      # (N, R); NaN never hits
    converged = hit.any(axis=1)
    rounds = np.where(converged, hit.argmax(axis=1) + 1, dsc.shape[1] - 1)
    return dsc[np.arange(len(dsc)), rounds], rounds, converged


def result_at_threshold(record: CaseRecord, t: float) -> ThresholdResult:
    """The reference rule (section 4.3): the DSC of the first round r >= 1
    whose inter-iteration DSC is >= t; if none is, round R, not converged.
    t > 1 therefore always reads round R.

    Unlike the reference, which marks "not yet set" with a DSC of 0 and so
    lets a later round overwrite a crossing round whose DSC is exactly 0,
    the first crossing is kept whatever its DSC.
    """
    t = check_threshold(t, "t")
    d, i = stack_histories([record])
    v, r, c = read_at(d, i, t)
    return ThresholdResult(float(v[0]), int(r[0]), bool(c[0]))


def threshold_is_exact(record: CaseRecord, t: float) -> bool:
    """False when the result at t depends on rounds that were filled in,
    not run: the case stopped early (rounds_run < R) before reaching t."""
    res = result_at_threshold(record, t)
    return record.rounds_run == record.num_rounds or res.round <= record.rounds_run
