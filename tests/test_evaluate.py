"""Tests of stnjax.eval.summaries (the stopping rule, summaries) and stnjax.eval.records
(record validation, records on disk).

Independent references: hand-built histories, plain-loop NumPy versions of
every summary number, and the PyTorch reference's published fold-0 per-case
table (reference section 5.3).
"""

import csv
import json
import math
import os

import numpy as np
import pytest

from stnjax.eval import summaries
from stnjax.eval import records
from stnjax.eval import report
from stnjax.checks import InputError


def rec(dsc, inter, case="0001", method="rstn", fold=0, rounds_run=None, **kw):
    """A CaseRecord from a DSC history and inter-DSC history (inter[0] unused)."""
    R = len(dsc) - 1
    base = dict(gt_voxels=1000, spacing=(0.8, 0.8, 2.5), time_coarse_s=2.0,
                time_rounds_s=[0.5] * R)
    base.update(kw)
    return records.CaseRecord(case, fold, method, dsc_rounds=list(dsc), inter_dsc=list(inter),
                             rounds_run=R if rounds_run is None else rounds_run, **base)


def random_records(rng, n, R=10, method="rstn", folds=(0, 1)):
    out = []
    for i in range(n):
        d = np.clip(0.6 + np.cumsum(rng.uniform(-0.01, 0.04, R + 1)), 0, 1)
        decay = rng.uniform(0.2, 1, R) ** np.arange(1, R + 1)
        inter = np.r_[np.nan, np.clip(1 - 0.3 * decay, 0, 1)]
        out.append(rec(d, inter, case=f"{i:04d}", method=method, fold=folds[i % len(folds)],
                       time_rounds_s=list(rng.uniform(0.1, 1.0, R)),
                       time_coarse_s=float(rng.uniform(1, 3))))
    return out


def loop_rule(dsc, inter, t):
    """The reference rule written as a plain loop (no sentinel)."""
    for r in range(1, len(dsc)):
        if inter[r] >= t:
            return dsc[r], r, True
    return dsc[-1], len(dsc) - 1, False


# ------------------------------------------------------------- the rule
HIST_D = [0.70, 0.75, 0.80, 0.82, 0.83, 0.84]
HIST_I = [None, 0.80, 0.92, 0.96, 0.995, 0.999]


@pytest.mark.parametrize("t,expect", [
    (0.80, (0.75, 1, True)),      # crossing at round 1 (>=, equality counts)
    (0.90, (0.80, 2, True)),      # first crossing, not the last
    (0.95, (0.82, 3, True)),
    (0.99, (0.83, 4, True)),
    (0.9995, (0.84, 5, False)),   # never crosses: round R, not converged
    (1.0, (0.84, 5, False)),
    (1.5, (0.84, 5, False)),      # t > 1: all rounds
])
def test_result_at_threshold_hand_built(t, expect):
    r = rec(HIST_D, HIST_I)
    got = records.result_at_threshold(r, t)
    assert tuple(got) == expect
    assert (got.dsc, got.round, got.converged) == expect


def test_result_at_threshold_round_with_zero_dsc_is_kept():
    # The reference's 0 sentinel would overwrite round 2 (DSC 0) with the
    # next crossing round 3; the first crossing must be kept.
    r = rec([0.5, 0.3, 0.0, 0.4, 0.45], [None, 0.5, 0.95, 0.97, 0.99])
    assert tuple(records.result_at_threshold(r, 0.9)) == (0.0, 2, True)
    # An empty mask: the next round compares empty with empty -> inter 1.
    r = rec([0.3, 0.0, 0.0], [None, 0.0, 1.0])
    assert tuple(records.result_at_threshold(r, 0.99)) == (0.0, 2, True)
    assert tuple(records.result_at_threshold(r, 1.0)) == (0.0, 2, True)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), "abc", None])
def test_bad_thresholds(bad):
    r = rec(HIST_D, HIST_I)
    with pytest.raises(InputError, match="t"):
        records.result_at_threshold(r, bad)
    with pytest.raises(InputError):
        summaries.summarize([r], thresholds=(0.9, bad))


def test_exactness_of_early_stopped_records():
    # Stopped at round 2 (inter 0.96 >= 0.95); rounds 3..5 filled.
    r = rec([0.7, 0.8, 0.82, 0.82, 0.82, 0.82], [None, 0.9, 0.96, 1, 1, 1], rounds_run=2)
    assert records.threshold_is_exact(r, 0.95) and records.threshold_is_exact(r, 0.9)
    assert not records.threshold_is_exact(r, 0.99)
    assert records.threshold_is_exact(rec(HIST_D, HIST_I), 0.99999)


def test_threshold_key_and_parse():
    assert records.threshold_key(0.9) == "0.90" and records.threshold_key(0.995) == "0.995"
    assert summaries.parse_thresholds("0.9:0.99:0.03,0.995, 0.9") == (0.9, 0.93, 0.96, 0.99, 0.995)
    with pytest.raises(InputError, match="stop < start"):
        summaries.parse_thresholds("0.99:0.9:0.01")
    with pytest.raises(InputError):
        summaries.parse_thresholds("0.9,zero")


# ------------------------------------------------------------- summaries
def test_summarize_against_numpy():
    rng = np.random.default_rng(3)
    recs = random_records(rng, 9)
    ts = (0.90, 0.95, 0.98, 0.99)
    s = summaries.summarize(recs, thresholds=ts, main_threshold=0.99)
    D = np.array([r.dsc_rounds for r in recs])
    I = np.array([[np.nan] + r.inter_dsc[1:] for r in recs])
    g = s.group("rstn")
    assert g.n_cases == 9 and g.num_rounds == 10 and g.folds == (0, 1)
    for t in ts:
        res = [loop_rule(d, i, t) for d, i in zip(D, I)]
        v = np.array([x[0] for x in res])
        row = [r for r in g.thresholds if r.t == t][0]
        np.testing.assert_allclose([row.mean, row.std, row.min, row.max],
                                   [v.mean(), np.std(v, ddof=0), v.min(), v.max()], rtol=1e-12)
        assert row.converged == sum(x[2] for x in res)
        assert row.mean_rounds == pytest.approx(np.mean([x[1] for x in res]))
        times = [rc.time_coarse_s + sum(rc.time_rounds_s[:x[1]]) for rc, x in zip(recs, res)]
        assert row.mean_time_s == pytest.approx(np.mean(times))
    assert g.main.t == 0.99 and g.main.mean == [r for r in g.thresholds if r.t == 0.99][0].mean
    # Population std, not the sample std.
    v99 = np.array([loop_rule(d, i, 0.99)[0] for d, i in zip(D, I)])
    assert g.main.std != pytest.approx(np.std(v99, ddof=1), rel=1e-6)
    np.testing.assert_allclose([s_.mean for s_ in g.per_round], D.mean(0))
    np.testing.assert_allclose([s_.std for s_ in g.per_round], D.std(0))
    assert (g.coarse.mean, g.coarse.max, g.coarse.min) == pytest.approx(
        (D[:, 0].mean(), D[:, 0].max(), D[:, 0].min()))
    assert list(g.inter_at) == [1, 2, 3, 5, 10]
    np.testing.assert_allclose(list(g.inter_at.values()), I[:, [1, 2, 3, 5, 10]].mean(0))
    assert g.time["coarse_s"] == pytest.approx(np.mean([r.time_coarse_s for r in recs]))
    assert g.time["per_round_s"] == pytest.approx(
        sum(sum(r.time_rounds_s) for r in recs) / (9 * 10))
    # Per-fold groups hold each fold's cases.
    for f in (0, 1):
        idx = [k for k, r in enumerate(recs) if r.fold == f]
        gf = s.group("rstn", f)
        assert gf.n_cases == len(idx)
        assert gf.coarse.mean == pytest.approx(D[idx, 0].mean())


def test_summarize_short_histories_and_one_fold():
    recs = random_records(np.random.default_rng(0), 4, R=4, folds=(2,))
    s = summaries.summarize(recs)
    g = s.group("rstn")
    assert list(g.inter_at) == [1, 2, 3]
    assert s.group("rstn", 2) is g          # one fold: the group is that fold
    assert [x.fold for x in s.groups] == [None]


# The PyTorch reference's fold-0 per-case table (reference section 5.3):
# R0 / R1 / R3 / R10 DSC and the inter-DSC of round 1.
PT_FD0 = np.array([
    [.7382, .8198, .8475, .8477, .8424], [.7198, .7344, .7322, .7309, .9393],
    [.7358, .8284, .8429, .8429, .8294], [.7086, .7600, .7602, .7557, .8438],
    [.8252, .8752, .8836, .8876, .8953], [.8336, .8859, .8893, .8930, .8944],
    [.7670, .8703, .8945, .8944, .8419], [.8567, .8936, .9017, .9061, .9227],
    [.4204, .5054, .5837, .6366, .7797], [.8724, .8940, .8930, .8908, .9302],
    [.7077, .8383, .8690, .8742, .8188], [.7453, .7944, .8146, .8189, .8945],
    [.8230, .8698, .8839, .8877, .9045], [.4563, .6831, .7844, .8320, .6865],
    [.7714, .8659, .9016, .9063, .8682], [.7713, .8543, .8736, .8803, .8801],
    [.8629, .8855, .8895, .8910, .9302], [.8004, .8178, .8207, .8228, .9202],
    [.7986, .8493, .8719, .8820, .9067], [.8355, .8554, .8547, .8548, .9194]])


def pt_records():
    # A compressed history: "rounds" 0..3 hold the published R0, R1, R3, R10.
    return [rec(row[:4], [None, row[4], 0.5, 0.5], case=f"{i + 1:04d}")
            for i, row in enumerate(PT_FD0)]


def test_reference_fold0_table():
    s = summaries.summarize(pt_records(), main_threshold=2.0)   # t > 1: the last round
    g = s.group("rstn")
    pct = lambda x: round(100 * x, 2)                     # noqa: E731
    assert pct(g.coarse.mean) == 75.25 and pct(g.coarse.std) == 11.62
    assert (pct(g.coarse.max), pct(g.coarse.min)) == (87.24, 42.04)
    assert [pct(x.mean) for x in g.per_round] == [75.25, 81.90, 83.96, 84.68]
    assert (pct(g.main.mean), pct(g.main.std), pct(g.main.min)) == (84.68, 6.68, 63.66)
    assert round(g.inter_at[1], 4) == 0.8724
    text = report.format_summary(s)
    assert "DSC 84.68 +- 6.68 % (max 90.63, min 63.66)" in text
    assert "Coarse (round 0): DSC 75.25 +- 11.62 % (max 87.24, min 42.04)" in text
    assert "population std" in text


def test_paired_comparison():
    a = [rec([0.7, v], [None, 1.0], case=c) for c, v in
         [("01", 0.80), ("02", 0.90), ("03", 0.70), ("04", 0.85), ("05", 0.6)]]
    b = [rec([0.7, v], [None, 1.0], case=c, method="stagewise") for c, v in
         [("01", 0.75), ("02", 0.70), ("03", 0.74), ("04", 0.85), ("06", 0.6)]]
    s = summaries.summarize(a + b)
    assert [g.method for g in s.groups] == ["rstn", "stagewise"]
    (c,) = s.comparisons
    assert (c.method, c.baseline, c.n_paired, c.n_unpaired) == ("rstn", "stagewise", 4, 2)
    assert (c.n_better, c.n_worse, c.n_tied) == (2, 1, 1)
    assert c.largest_gain == pytest.approx(0.20) and c.largest_gain_case == (0, "02")
    assert c.largest_loss == pytest.approx(-0.04) and c.largest_loss_case == (0, "03")
    assert c.mean_diff == pytest.approx((0.05 + 0.20 - 0.04 + 0) / 4)
    assert 0 < c.p_wilcoxon <= 1
    assert "better on 2/4 cases" in report.format_summary(s)


def test_metrics_oracles_and_nonfinite():
    recs = [rec(HIST_D, HIST_I, case=f"{i}", oracle={"strong": 0.9 + i / 100},
                metrics_at={0.99: {"dsc": 0.83, "jaccard": 0.7, "round": 4,
                                   "hd95_mm": [5.0, math.inf, 7.0][i]}}) for i in range(3)]
    g = summaries.summarize(recs).group("rstn")
    assert g.metrics["0.99"]["hd95_mm"].n == 2
    assert g.metrics["0.99"]["hd95_mm"].mean == pytest.approx(6.0)
    assert g.oracle["strong"].mean == pytest.approx(0.91)
    assert "HD95 6.00 +- 1.00 mm (2/3 finite)" in report.format_summary(summaries.summarize(recs))


# -------------------------------------------------------------- bad input
def test_bad_record_sets():
    with pytest.raises(InputError, match="empty"):
        summaries.summarize([])
    a = rec(HIST_D, HIST_I, case="1")
    b = rec(HIST_D[:3], HIST_I[:3], case="2")
    with pytest.raises(InputError, match="unequal round counts"):
        summaries.summarize([a, b])
    # Different methods may use different round counts.
    summaries.summarize([a, rec(HIST_D[:3], HIST_I[:3], case="2", method="stagewise")])
    with pytest.raises(InputError, match="duplicate"):
        summaries.summarize([a, rec(HIST_D, HIST_I, case="1")])
    with pytest.raises(InputError, match="not a CaseRecord"):
        summaries.sweep([a, {"case_id": "x"}], [0.9])


@pytest.mark.parametrize("change,match", [
    (dict(dsc=[0.7, 1.2]), r"dsc_rounds\[1\]"),
    (dict(dsc=[0.7, float("nan")]), "finite"),
    (dict(inter=[None, 0.5, 0.6]), "inter_dsc"),
    (dict(rounds_run=3), "rounds_run"),
    (dict(spacing=(1.0, 1.0)), "spacing"),
    (dict(fold=1.5), "fold"),
    (dict(metrics_at={"0.99": {"dsc": 0.8}}), "round"),
    (dict(metrics_at={"-1": {"round": 1}}), "metrics_at"),
    (dict(extra={"f": object()}), "extra"),
])
def test_bad_records(change, match):
    kw = dict(dsc=[0.7, 0.8], inter=[None, 0.9])
    kw.update(change)
    with pytest.raises(InputError, match=match):
        rec(kw.pop("dsc"), kw.pop("inter"), **kw)


# --------------------------------------------------------- files on disk
def mixed_records():
    rng = np.random.default_rng(7)
    recs = random_records(rng, 3) + random_records(rng, 2, R=5, method="stagewise")
    recs[0] = rec(np.float32([0.7, 0.8, 0.85]), np.array([np.nan, 0.9, 0.97]),
                  case="0100", method="rstn_z", fold=np.int64(1),
                  oracle={"strong": 0.93, "weak": 0.88},
                  metrics_at={"0.99": {"dsc": 0.85, "jaccard": 0.74, "hd95_mm": 3.25,
                                       "surface_dice": 0.9, "round": 2}},
                  extra={"compiles": np.int64(2), "bucket": [128, 128, 64], "note": "12",
                         "device": "cpu"}, time_rounds_s=np.array([0.25, 0.5]))
    recs[0].metrics_at["0.99"]["hd95_mm"] = math.inf
    return recs


def canon(recs):
    """Exact, order-independent text of records (NaN/inf compare equal)."""
    return json.dumps([r.to_dict() for r in recs], sort_keys=True)


def test_json_and_csv_round_trip(tmp_path):
    recs = mixed_records()
    pj, pc = records.write_records(recs, tmp_path / "out")
    json.loads(pj.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    back = records.read_records(tmp_path / "out")
    assert canon(back) == canon(recs)
    assert back[1:] == recs[1:]
    assert math.isinf(back[0].metrics_at["0.99"]["hd95_mm"])
    assert back[0].extra == {"compiles": 2, "bucket": [128, 128, 64], "note": "12",
                             "device": "cpu"}
    from_csv = records.read_records(pc)
    assert canon(from_csv) == canon(recs)
    assert from_csv[1:] == recs[1:]
    with open(pc, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs)
    for row, r in zip(rows, recs):
        for t in ("0.90", "0.99"):
            res = records.result_at_threshold(r, float(t))
            assert float(row[f"dsc_t{t}"]) == res.dsc and int(row[f"rounds_t{t}"]) == res.round
            assert row[f"converged_t{t}"] == str(int(res.converged))
        assert [float(row[f"dsc_r{k}"]) for k in range(r.num_rounds + 1)] == r.dsc_rounds
    assert rows[0]["inter_r1"] == "0.9" and rows[0]["hd95_mm_at0.99"] == "inf"
    # A folder tree (several workdirs) is searched for cases.json.
    records.write_records(recs[:1], tmp_path / "tree" / "a")
    records.write_records(recs[1:], tmp_path / "tree" / "b" / "fold0")
    assert len(records.read_records(tmp_path / "tree")) == len(recs)


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        records.read_records(tmp_path / "nope")
    with pytest.raises(InputError, match="no cases.json"):
        records.read_records(tmp_path)
    (tmp_path / "x.json").write_text('{"records": []}')
    with pytest.raises(InputError, match="not a stnjax.cases"):
        records.read_records(tmp_path / "x.json")
    records.write_records(mixed_records(), tmp_path / "a")
    with pytest.raises(InputError, match="duplicate"):
        records.read_records(tmp_path / "a", tmp_path / "a" / "cases.csv")


def test_atomic_writes_leave_nothing_on_failure(tmp_path, monkeypatch):
    recs = mixed_records()
    out = tmp_path / "out"
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):      # the second file fails while being written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="cannot write .*cases.csv: No space"):
        records.write_records(recs, out)
    assert not out.exists()          # no temporaries, not even the new folder
    out.mkdir()
    calls["n"] = 0
    with pytest.raises(OSError, match="No space"):
        records.write_records(recs, out)
    assert os.listdir(out) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    # A failure while building the text: nothing is created, an existing
    # result stays as it was.
    records.write_records(recs[:2], out)
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    monkeypatch.setattr(records, "records_csv_text", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        records.write_records(recs, out)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    # An output path that is a file is a clear error naming it.
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write"):
        report.write_summary(summaries.summarize(recs), tmp_path / "file" / "sub")


def test_write_summary(tmp_path):
    recs = mixed_records()
    s = summaries.summarize(recs)
    pj, pt = report.write_summary(s, tmp_path)
    doc = json.loads(pj.read_text())
    assert [g["method"] for g in doc["groups"]][:1] == ["rstn"]
    assert doc["groups"][0]["main"]["mean"] == pytest.approx(s.group("rstn").main.mean)
    assert pt.read_text() == report.format_summary(s)
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "summary.txt"]


def test_rounds_run_as_one_loop_have_no_made_up_per_round_times(tmp_path):
    """A case whose rounds ran as one jitted loop records the loop's total,
    not an even split: no time_r<k> columns, the total in time_loop_s; its
    time at t is known only when the loop stopped at the round read there.
    Records written before the field existed read back with 0."""
    looped = rec([0.5, 0.6, 0.7, 0.7], [None, 0.8, 0.995, 1.0], case="0001", rounds_run=2,
                 time_rounds_s=[], time_loop_s=3.0)
    stepped = rec([0.5, 0.6, 0.7, 0.7], [None, 0.8, 0.995, 1.0], case="0002")
    assert looped.time_total_s == 5.0 and stepped.time_total_s == 3.5
    assert [looped.time_until(k) for k in (0, 1, 2)] == [2.0, None, 5.0]
    assert [stepped.time_until(k) for k in (0, 1, 2, 3)] == [2.0, 2.5, 3.0, 3.5]
    _, pc = records.write_records([looped, stepped], tmp_path)
    with open(pc, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["time_loop_s"] for r in rows] == ["3.0", "0.0"]
    assert [r["time_total_s"] for r in rows] == ["5.0", "3.5"]
    assert rows[0]["time_r1"] == "" and rows[1]["time_r1"] == "0.5"
    assert records.read_records(pc) == [looped, stepped]
    old = looped.to_dict()
    del old["time_loop_s"]
    assert records.CaseRecord.from_dict(old).time_loop_s == 0.0
    at_99, at_999 = summaries.sweep([looped], (0.99, 0.999))
    assert at_99.mean_time_s == 5.0  # the loop stopped at round 2, read at round 2
    assert at_999.mean_time_s is None  # read at round 3, past the loop's end: unknown
