"""A run's training curves as a picture: `<run>/progress.png` (nnU-Net's progress.png).

Drawn from the run's metrics.jsonl records (`reporting.StepReporter`), so a
resumed run's picture covers its whole history. Three panels against the
iteration: the coarse, fine and total loss (each logged value thin, a
moving average thick), the learning rate, and examples per second (records
that include a compilation left out); stage boundaries (S -> I -> J) are
grey lines, restarts by the convergence guard red ones.

`ProgressPicture` redraws it as training runs, at most once every
`min_interval_s` seconds (called at checkpoint times) and once at the end,
so drawing (0.3 s for the main job's 900 records on 2 CPU cores, and about
1 s for importing Matplotlib once) never slows training noticeably.
Written atomically (`fileio.atomic_write_figure`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stnjax.fileio import atomic_write_figure

FILE_NAME = "progress.png"
_LOSSES = (("loss_coarse", "coarse", "#1f5fa8"), ("loss_fine", "fine", "#2a9d46"),
           ("loss", "total", "#333333"))


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The mean of the last `window` values at each position (fewer at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - max(int(window), 1), 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _boundaries(recs: Sequence[dict]) -> tuple[list[tuple[float, str]], list[float]]:
    """(iteration, stage) where a stage starts, and iterations of restarts."""
    stages, restarts = [], []
    prev = None
    for r in recs:
        x = r["iteration"] - r.get("steps", 1)  # the first step the record covers
        if prev is not None and r.get("attempt") != prev.get("attempt"):
            restarts.append(x)
        if prev is None or r["stage"] != prev["stage"] or r.get("attempt") != prev.get("attempt"):
            stages.append((x, r["stage"]))
        prev = r
    return stages, restarts


def draw_progress(records: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Draws the training records (`event == "train"`) into `path` (PNG)."""
    from matplotlib.figure import Figure

    recs = [r for r in records if r.get("event") == "train"]
    fig = Figure(figsize=(10, 8))  # fixed margins: a constrained layout doubles the time
    ax_l, ax_r, ax_e = fig.subplots(3, 1, sharex=True, height_ratios=(3, 1, 1))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.07, top=0.94, hspace=0.12)
    x = np.array([r["iteration"] for r in recs], dtype=np.float64)
    window = max(1, len(recs) // 20)
    for key, name, color in _LOSSES:
        y = np.array([r.get(key, np.nan) for r in recs], dtype=np.float64)
        if not np.isfinite(y).any():
            continue
        ax_l.plot(x, y, color=color, alpha=0.3, lw=0.8)
        ax_l.plot(x, moving_average(np.nan_to_num(y), window), color=color, lw=2,
                  label=f"{name} (moving average of {window})")
    ax_l.set_ylabel("Dice loss")
    if recs:
        ax_l.legend(loc="upper right", fontsize=8)
    ax_r.plot(x, [r.get("lr", np.nan) for r in recs], color="#8e44ad")
    ax_r.set_ylabel("learning rate")
    if recs and min(r.get("lr", 0) for r in recs) > 0:
        ax_r.set_yscale("log")
    fast = [r for r in recs if not r.get("compiled")]
    ax_e.plot([r["iteration"] for r in fast], [r.get("examples_per_s", np.nan) for r in fast],
              color="#e08e0b", marker="." if len(fast) < 100 else None, lw=1)
    ax_e.set_ylabel("examples / s")
    ax_e.set_xlabel("iteration")
    ax_e.set_xlim(0, max(float(x.max()) if x.size else 0.0, 1.0))  # stage marks start at 0
    stages, restarts = _boundaries(recs)
    for ax in (ax_l, ax_r, ax_e):
        for xs, _ in stages[1:]:
            ax.axvline(xs, color="#999999", ls="--", lw=1)
        for xs in restarts:
            ax.axvline(xs, color="#c8452f", ls=":", lw=1.5)
        ax.grid(alpha=0.3)
    for xs, mode in stages:
        ax_l.annotate(mode, (xs, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", color="#555555")
    last = recs[-1] if recs else {}
    fig.suptitle(f"{title} | iteration {last.get('iteration', 0)}, stage {last.get('stage', '-')}"
                 f", loss {last.get('loss', float('nan')):.4f}" if recs else f"{title} | no steps yet")
    return atomic_write_figure(fig, path, dpi=80)


class ProgressPicture:
    """Redraws a run's progress.png from its records, at most every
    `min_interval_s` seconds unless forced (`clock` for tests)."""

    def __init__(self, path: str | os.PathLike, records: Callable[[], list[dict]], *,
                 title: str, min_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self._records, self._title = Path(path), records, title
        self._every, self._clock = float(min_interval_s), clock
        self._last: float | None = None

    def update(self, *, force: bool = False) -> bool:
        """Draws when due (or `force`); returns whether it drew."""
        now = self._clock()
        if not force and self._last is not None and now - self._last < self._every:
            return False
        draw_progress(self._records(), self.path, title=self._title)
        self._last = self._clock()
        return True
