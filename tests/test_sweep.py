"""Tests of the convergence study: stnjax.eval.summaries.sweep, stnjax.eval.plots and
the `python -m launch.sweep` command (records from stnjax.eval.records)."""

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stnjax.eval import summaries
from stnjax.eval import records
from stnjax.eval import report
from stnjax.eval import plots
from stnjax.checks import InputError

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def histories(rng, n, R, method, folds=(0,)):
    out = []
    for i in range(n):
        d = np.clip(0.55 + np.cumsum(rng.uniform(-0.02, 0.05, R + 1)), 0, 1)
        inter = np.r_[np.nan, np.clip(1 - 0.4 * rng.uniform(0.1, 0.9, R) ** np.arange(1, R + 1)
                                      + rng.normal(0, 0.01, R), 0, 1)]
        out.append(records.CaseRecord(
            f"{i:04d}", folds[i % len(folds)], method, gt_voxels=500, spacing=(1, 1, 2),
            dsc_rounds=d, inter_dsc=inter, rounds_run=R, time_coarse_s=1.0,
            time_rounds_s=[0.2] * R))
    return out


def two_methods(seed=0):
    rng = np.random.default_rng(seed)
    return histories(rng, 12, 10, "rstn") + histories(rng, 12, 10, "stagewise")


def test_sweep_monotone_and_consistent():
    recs = two_methods()
    ts = list(np.round(np.linspace(0.5, 1.0, 26), 4)) + [1.5]
    rows = summaries.sweep(recs, ts)
    assert [r.method for r in rows] == ["rstn"] * 27 + ["stagewise"] * 27
    for m in ("rstn", "stagewise"):
        rs = [r for r in rows if r.method == m]
        assert [r.t for r in rs] == sorted(ts)
        rounds = np.array([r.mean_rounds for r in rs])
        conv = np.array([r.converged for r in rs])
        assert np.all(np.diff(rounds) >= 0), "rounds used must not drop as t grows"
        assert np.all(np.diff(conv) <= 0), "cases converged must not grow with t"
        mine = [r for r in recs if r.method == m]
        last = rs[-1]                     # t > 1: every case runs all R rounds
        assert (last.converged, last.mean_rounds) == (0, 10.0)
        assert last.mean == pytest.approx(np.mean([r.dsc_rounds[-1] for r in mine]))
        # Each row equals the per-case rule averaged by hand.
        for r in rs[::5]:
            vals = [records.result_at_threshold(c, r.t) for c in mine]
            assert r.mean == pytest.approx(np.mean([v.dsc for v in vals]))
            assert r.std == pytest.approx(np.std([v.dsc for v in vals]))
            assert r.converged == sum(v.converged for v in vals)
        # The same rows as the summary's threshold table.
        g = summaries.summarize(recs, thresholds=(0.9, 0.96)).group(m)
        for t in (0.9, 0.96):
            assert [x for x in g.thresholds if x.t == t][0] == [x for x in rs if x.t == t][0]


def test_sweep_flags_early_stopped_cases():
    # Stopped at round 2 (inter 0.96); rounds 3..4 are filled copies.
    stopped = records.CaseRecord("a", 0, "rstn", 10, (1, 1, 1), [0.6, 0.7, 0.72, 0.72, 0.72],
                                [None, 0.9, 0.96, 1.0, 1.0], 2, 1.0, [0.1, 0.1])
    full = records.CaseRecord("b", 0, "rstn", 10, (1, 1, 1), [0.6, 0.7, 0.75, 0.8, 0.81],
                             [None, 0.9, 0.94, 0.97, 0.991], 4, 1.0, [0.1] * 4)
    rows = {r.t: r for r in summaries.sweep([stopped, full], [0.9, 0.95, 0.99])}
    assert (rows[0.9].inexact, rows[0.95].inexact, rows[0.99].inexact) == (0, 0, 1)
    assert rows[0.95].mean_time_s == pytest.approx(((1.2) + (1.3)) / 2)
    assert rows[0.99].mean_time_s is None          # case a never ran round 3
    assert "*" in report.format_sweep(list(rows.values()))


def test_sweep_errors():
    with pytest.raises(InputError, match="empty"):
        summaries.sweep([], [0.9])
    with pytest.raises(InputError):
        summaries.sweep(two_methods(), [0.9, 0.0])
    with pytest.raises(InputError, match="no thresholds"):
        summaries.sweep(two_methods(), [])


def test_write_sweep_csv(tmp_path):
    rows = summaries.sweep(two_methods(), [0.9, 0.99, 2.0])
    path = summaries.write_sweep_csv(rows, tmp_path / "s" / "sweep.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    for g, r in zip(got, rows):
        assert (g["method"], float(g["t"]), float(g["mean_dsc"]), int(g["converged"]),
                float(g["mean_rounds"])) == (r.method, r.t, r.mean, r.converged, r.mean_rounds)


def check_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def test_plots_two_methods_and_one(tmp_path):
    recs = two_methods(1)
    rows = summaries.sweep(recs, [0.8, 0.9, 0.95, 0.99, 1.5])
    paths = plots.write_plots(recs, rows, tmp_path / "two")
    assert sorted(p.name for p in paths) == [
        "comparison_rstn_vs_stagewise.png", "inter_dsc.png", "round_dsc.png", "sweep.png"]
    for p in paths:
        check_png(p)
    one = [r for r in recs if r.method == "stagewise"]
    paths = plots.write_plots(one, summaries.sweep(one, [0.9, 0.99]), tmp_path / "one")
    assert sorted(p.name for p in paths) == ["inter_dsc.png", "round_dsc.png", "sweep.png"]
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".")]


def test_cli(tmp_path):
    recs = two_methods(2)
    # Two evaluation workdirs, one per method, with per-fold subfolders.
    records.write_records([r for r in recs if r.method == "rstn"],
                         tmp_path / "wd_rstn" / "eval" / "fold0")
    records.write_records([r for r in recs if r.method == "stagewise"], tmp_path / "wd_c2f")
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "launch.sweep",
           f"--records={tmp_path / 'wd_rstn'},{tmp_path / 'wd_c2f' / 'cases.json'}",
           "--thresholds=0.80:0.95:0.05,0.98,0.99,0.995", f"--out={out}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "rstn" in res.stdout and "stagewise" in res.stdout and "0.995" in res.stdout
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["t"]) for r in rows][:3] == [
        ("rstn", "0.8"), ("rstn", "0.85"), ("rstn", "0.9")]
    assert len(rows) == 2 * 7
    for name in ("sweep.png", "round_dsc.png", "inter_dsc.png",
                 "comparison_rstn_vs_stagewise.png"):
        check_png(out / name)
    # Bad input: a clear message and a failing exit code, nothing written.
    bad = subprocess.run([sys.executable, "-m", "launch.sweep", f"--records={tmp_path / 'x'}",
                          f"--out={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_labels_name_evaluations_for_the_sweep():
    """infer.label (launch.evaluate --label) names the method of an
    evaluation's records, so two evaluations that differ in any setting can
    be swept side by side; unsafe names are refused."""
    from launch.configs import smoke
    from stnjax.eval.spec import EvalSpec
    spec = EvalSpec.from_config(smoke.get_config())
    a = spec.with_inference(label="rounds10")
    b = spec.with_inference(max_rounds=5, label="rounds5")
    assert (spec.method, a.method, b.method) == ("rstn", "rounds10", "rounds5")
    assert b.record["infer"]["label"] == "rounds5" and b.record["infer"]["max_rounds"] == 5
    for bad in ("a/b", "../x", ".hidden", "-x", "x y", "x" * 65):
        with pytest.raises(InputError, match="infer.label"):
            spec.with_inference(label=bad)
    recs = [r for r in two_methods(2) if r.method == "rstn"]
    with pytest.raises(InputError, match="duplicate record for method 'rstn'"):
        summaries.sweep(recs + recs, [0.9, 0.99])
    labelled = ([dataclasses.replace(r, method=a.method) for r in recs]
                + [dataclasses.replace(r, method=b.method) for r in recs])
    rows = summaries.sweep(labelled, [0.9, 0.99])
    assert sorted({r.method for r in rows}) == ["rounds10", "rounds5"]


def test_overlay_slices_go_through_the_label_first():
    """The overlay's three slices cross the organ (the label's largest
    slices; a prediction elsewhere does not move them); none found: middle."""
    from stnjax.eval import plots

    label, pred = np.zeros((20, 30, 10), bool), np.zeros((20, 30, 10), bool)
    label[4:7, 10:12, 2:4] = True
    label[5, 10:20, 3] = True  # the most voxels: row 5, column 10..11, slice 3
    pred[15:19, 25:29, 7:9] = True
    assert plots.organ_slices([label, pred], label.shape) == (5, 10, 3)
    assert plots.organ_slices([np.zeros_like(label), pred], label.shape) == (15, 25, 7)
    assert plots.organ_slices([np.zeros_like(label)], label.shape) == (10, 15, 5)
