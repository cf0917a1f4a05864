"""The figures of an evaluation (PNG): sweep, per-round DSC, comparisons.

The numbers come from `stnjax.eval.records` (per-case records) and
`stnjax.eval.summaries` (summaries, sweeps); this module only draws them
(the text reports: `stnjax.eval.report`).

Figures use Matplotlib's object API with the Agg canvas (no pyplot, no
global backend switch, no display needed) and are written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from stnjax.eval.records import (CaseRecord, check_records, check_threshold, result_at_threshold,
                                 threshold_key)
from stnjax.eval.summaries import (MAIN_THRESHOLD, ThresholdRow, compare, method_name,
                                   method_order)
from stnjax.fileio import atomic_write_figure

_COLORS = {"rstn": "#1f5fa8", "stagewise": "#c8452f"}
_CYCLE = ["#2a9d46", "#8e44ad", "#e08e0b", "#555555"]


def _color(method: str, methods: Sequence[str]) -> str:
    if method in _COLORS:
        return _COLORS[method]
    others = [m for m in methods if m not in _COLORS]
    return _CYCLE[others.index(method) % len(_CYCLE)]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return atomic_write_figure(fig, path)


def plot_sweep(rows: Sequence[ThresholdRow], path: str | os.PathLike) -> Path:
    """Two panels against t: mean DSC (%) and mean rounds used (solid), with
    the share of cases converged (dashed, right axis); one colour per
    method. Rows with t > 1 (never stop) are drawn as dotted horizontal
    lines rather than stretching the t axis."""
    if not rows:
        raise ValueError("plot_sweep: empty sweep table")
    methods = method_order(r.method for r in rows)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_d, ax_r = fig.subplots(1, 2)
    ax_c = ax_r.twinx()
    for m in methods:
        c = _color(m, methods)
        rs = sorted((r for r in rows if r.method == m and r.t <= 1.0), key=lambda r: r.t)
        t = [r.t for r in rs]
        ax_d.plot(t, [100 * r.mean for r in rs], color=c, marker="o", ms=4, label=method_name(m))
        ax_r.plot(t, [r.mean_rounds for r in rs], color=c, marker="o", ms=4,
                  label=f"{method_name(m)}: rounds")
        ax_c.plot(t, [100 * r.converged / r.n for r in rs], color=c, ls="--", lw=1,
                  label=f"{method_name(m)}: converged")
        for r in [r for r in rows if r.method == m and r.t > 1.0][:1]:
            ax_d.axhline(100 * r.mean, color=c, ls=":", lw=1.2,
                         label=f"{method_name(m)}: all rounds (t > 1)")
    ax_d.set(xlabel="stopping threshold t", ylabel="mean DSC (%)",
             title="DSC at the stopping round")
    ax_r.set(xlabel="stopping threshold t", ylabel="mean rounds used",
             title="Rounds used and cases converged")
    ax_r.set_ylim(bottom=0)
    ax_c.set_ylim(0, 105)
    ax_c.set_ylabel("cases converged (%)")
    ax_d.grid(alpha=0.3)
    ax_r.grid(alpha=0.3)
    ax_d.legend(loc="best", fontsize=8)
    h1, l1 = ax_r.get_legend_handles_labels()
    h2, l2 = ax_c.get_legend_handles_labels()
    ax_r.legend(h1 + h2, l1 + l2, loc="center left", fontsize=8)
    return _save(fig, path)


def _per_round(records: Sequence[CaseRecord], path, what: str, title: str, ylabel: str,
               t: float = MAIN_THRESHOLD) -> Path:
    recs = check_records(records, f"plot {Path(path).name}")
    methods = method_order(r.method for r in recs)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    lo = 1.0
    for m in methods:
        mine = [r for r in recs if r.method == m]
        if what == "inter":
            y = np.array([r.inter_dsc[1:] for r in mine]) * 1.0
            x = np.arange(1, y.shape[1] + 1)
        else:
            y = np.array([r.dsc_rounds for r in mine]) * 100.0
            x = np.arange(y.shape[1])
        c = _color(m, methods)
        for row in y:
            ax.plot(x, row, color=c, lw=0.6, alpha=0.25)
        ax.plot(x, y.mean(axis=0), color=c, lw=2.2, marker="o", ms=4,
                label=f"{method_name(m)} mean (n = {len(mine)})")
        lo = min(lo, float(np.percentile(y, 5)))
    if what == "inter":
        if t <= 1.0:
            ax.axhline(t, color="k", ls=":", lw=1, label=f"t = {threshold_key(t)}")
        ax.set_ylim(max(0.0, lo - 0.02), 1.005)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if x[-1] <= 15:
        ax.set_xticks(np.arange(0 if what == "dsc" else 1, x[-1] + 1))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_inter_dsc(records: Sequence[CaseRecord], path: str | os.PathLike,
                   t: float = MAIN_THRESHOLD) -> Path:
    """Inter-iteration DSC against round: thin per-case lines, bold means,
    a dotted line at t (y axis from the 5th percentile; lower outliers are
    cut off)."""
    return _per_round(records, path, "inter", "Inter-iteration DSC per round",
                      "DSC(mask$_{r-1}$, mask$_r$)", check_threshold(t, "t"))


def plot_round_dsc(records: Sequence[CaseRecord], path: str | os.PathLike) -> Path:
    """DSC (%) against round 0..R: thin per-case lines, bold means."""
    return _per_round(records, path, "dsc", "DSC per round (round 0 = coarse)", "DSC (%)")


def plot_comparison(records: Sequence[CaseRecord], path: str | os.PathLike, method: str,
                    baseline: str, t: float = MAIN_THRESHOLD) -> Path:
    """Per-case scatter of DSC at t: baseline on x, method on y, with the
    diagonal; points above it are cases the method improves."""
    c = compare(records, method, baseline, t)
    at = {m: {(r.fold, r.case_id): 100 * result_at_threshold(r, t).dsc
              for r in records if r.method == m} for m in (method, baseline)}
    keys = sorted(set(at[method]) & set(at[baseline]))
    x = np.array([at[baseline][k] for k in keys])
    y = np.array([at[method][k] for k in keys])
    fig = Figure(figsize=(5.2, 5.2), layout="constrained")
    ax = fig.subplots()
    lo = math.floor(min(x.min(), y.min()) / 5) * 5
    hi = max(lo + 5, min(100.0, math.ceil(max(x.max(), y.max()) / 5) * 5))
    ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--")
    better = y > x
    ax.scatter(x[better], y[better], s=18, color=_COLORS.get(method, _CYCLE[0]),
               label=f"{method_name(method)} better ({c.n_better})")
    ax.scatter(x[~better], y[~better], s=18, color=_COLORS.get(baseline, _CYCLE[1]),
               label=f"not better ({c.n_paired - c.n_better})")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal",
           xlabel=f"{method_name(baseline)} DSC (%)", ylabel=f"{method_name(method)} DSC (%)",
           title=f"Per-case DSC at t = {threshold_key(t)}\nbetter on {c.n_better}/{c.n_paired}, "
                 f"mean {100 * c.mean_diff:+.2f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_round_diagnostics(records: Sequence[CaseRecord], path: str | os.PathLike) -> Path:
    """How the rounds change the masks: per round 0..R, the mean mask volume
    relative to the label's, precision and recall (%), one colour per method
    (records with per-round diagnostics only, `runs.round_diagnostics`)."""
    recs = [r for r in check_records(records, f"plot {Path(path).name}")
            if isinstance(r.extra.get("rounds"), dict)]
    methods = method_order(r.method for r in recs)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for m in methods:
        mine = [r for r in recs if r.method == m]
        c = _color(m, methods)
        vol = [[v / (r.gt_voxels * np.prod(r.spacing) / 1000) for v in r.extra["rounds"]["volume_ml"]]
               for r in mine if r.gt_voxels]
        rows = {"volume / label volume": vol,
                "precision (%)": [[np.nan if v is None else 100 * v
                                   for v in r.extra["rounds"]["precision"]] for r in mine],
                "recall (%)": [[np.nan if v is None else 100 * v
                                for v in r.extra["rounds"]["recall"]] for r in mine]}
        for ax, (name, y) in zip(axes, rows.items()):
            y = np.array(y, float)
            if not y.size:
                continue
            x = np.arange(y.shape[1])
            for row in y:
                ax.plot(x, row, color=c, lw=0.6, alpha=0.25)
            ax.plot(x, np.nanmean(y, axis=0), color=c, lw=2.2, marker="o", ms=3,
                    label=f"{method_name(m)} (n = {len(y)})")
            ax.set(xlabel="round", title=name)
    axes[0].axhline(1.0, color="k", ls=":", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def write_plots(records: Sequence[CaseRecord], rows: Sequence[ThresholdRow],
                out_dir: str | os.PathLike, t: float = MAIN_THRESHOLD) -> list[Path]:
    """All figures of a convergence study into out_dir: sweep.png,
    round_dsc.png, inter_dsc.png, round_diagnostics.png (when the records
    hold per-round diagnostics), and comparison_<a>_vs_<b>.png for the first
    method against every other one that shares cases. Returns the paths."""
    t = check_threshold(t, "t")
    out = Path(out_dir)
    paths = [plot_sweep(rows, out / "sweep.png"), plot_round_dsc(records, out / "round_dsc.png"),
             plot_inter_dsc(records, out / "inter_dsc.png", t)]
    if any(isinstance(r.extra.get("rounds"), dict) for r in records):
        paths.append(plot_round_diagnostics(records, out / "round_diagnostics.png"))
    methods = method_order(r.method for r in records)
    for b in methods[1:]:
        ka = {(r.fold, r.case_id) for r in records if r.method == methods[0]}
        if ka & {(r.fold, r.case_id) for r in records if r.method == b}:
            paths.append(plot_comparison(records, out / f"comparison_{methods[0]}_vs_{b}.png",
                                         methods[0], b, t))
    return paths


#: Contour colours of the overlays: the reference label and the prediction.
OVERLAY_COLORS = {"label": ("#2ecc40", "green"), "prediction": ("#ff4136", "red")}
_OTHER_COLOR = ("#ffdc00", "yellow")


def organ_slices(masks: Sequence[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """Per canonical axis, the slice with the most voxels of the first
    non-empty mask (give the label before the prediction: the slices go
    through the organ); the middle slices where all are empty."""
    first = next((np.asarray(m, bool) for m in masks if np.asarray(m).any()), None)
    if first is None:
        return tuple(int(s) // 2 for s in shape)
    return tuple(int(np.argmax(first.sum(axis=tuple(a for a in range(3) if a != ax))))
                 for ax in range(3))


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice of a canonical PLS volume as a radiologist views it: axial
    (axis 2) anterior up, the patient's right on the left; coronal (axis 0)
    and sagittal (axis 1) superior up."""
    sl = np.take(volume, index, axis=axis)
    return sl if axis == 2 else np.flipud(sl.T)


def plot_overlay(image: np.ndarray, masks: Mapping[str, np.ndarray],
                 spacing: Sequence[float], path: str | os.PathLike, *, title: str,
                 window: tuple[float, float] = (0.0, 1.0)) -> Path:
    """Three slices through the organ (coronal, sagittal, axial; `organ_slices`
    of the masks in their order) of a canonical volume, in grey over `window`, with each mask's outline
    (`OVERLAY_COLORS` by name: "label", "prediction"). All masks empty: the
    middle slices, "empty mask" written over them."""
    image = np.asarray(image, np.float32)
    idx = organ_slices(list(masks.values()), image.shape)
    sp = [float(s) for s in spacing]
    aspects = {0: sp[2] / sp[1], 1: sp[2] / sp[0], 2: sp[0] / sp[1]}  # rows / columns, mm
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    for ax, (axis, name) in zip(fig.subplots(1, 3), ((0, "coronal"), (1, "sagittal"),
                                                      (2, "axial"))):
        ax.imshow(_view(image, axis, idx[axis]), cmap="gray", vmin=window[0], vmax=window[1],
                  aspect=aspects[axis], interpolation="nearest")
        for key, mask in masks.items():
            view = _view(np.asarray(mask, np.float32), axis, idx[axis])
            if view.any():
                ax.contour(view, levels=[0.5], colors=OVERLAY_COLORS.get(key, _OTHER_COLOR)[0],
                           linewidths=1.2)
        ax.set_title(f"{name}, slice {idx[axis]}", fontsize=9)
        ax.set_axis_off()
        if not any(np.asarray(m).any() for m in masks.values()):
            ax.text(0.5, 0.5, "empty mask", transform=ax.transAxes, ha="center", va="center",
                    color="#ffdc00", fontsize=16, weight="bold")
    keys = ", ".join(f"{k} {OVERLAY_COLORS.get(k, _OTHER_COLOR)[1]}" for k in masks)
    fig.suptitle(f"{title}\n(outlines: {keys})", fontsize=10)
    return _save(fig, path)


def plot_case_overlay(record: CaseRecord, image: np.ndarray, label: np.ndarray,
                      prediction: np.ndarray, spacing: Sequence[float],
                      path: str | os.PathLike, *, t: float = MAIN_THRESHOLD) -> Path:
    """`plot_overlay` of an evaluated case on the model grid (windowed image,
    label, the reported mask; `spacing` that grid's, which differs from the
    record's source spacing with data.spacing), its per-round DSC and the
    result at t in the title."""
    res = result_at_threshold(record, t)
    rounds = " ".join(f"{100 * d:.1f}" for d in record.dsc_rounds)
    title = (f"{method_name(record.method)} fold {record.fold} case {record.case_id}: DSC at "
             f"t = {threshold_key(t)} {100 * res.dsc:.1f} % (round {res.round})\n"
             f"DSC per round 0..{len(record.dsc_rounds) - 1} (%): {rounds}")
    return plot_overlay(image, {"label": label, "prediction": prediction}, spacing, path,
                        title=title)
