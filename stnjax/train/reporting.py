"""The training loop's metrics: fetched every few steps, checked, logged with rates and an ETA.

Metrics are kept on the devices as (sum, count) pairs per step and fetched
every `log_every` steps (fetching every step would stall the device queue).
`StepReporter.flush` then checks each step's losses (through a callback the
loop gives it, which raises on a non-finite loss and feeds the convergence
guard), pools the steps into one record (means, rates, counts of the box
statistics), writes it to metrics.jsonl and logs the progress line with an
ETA. Steps that compiled are left out of the rate, so the ETA is the
training's, not the compiler's.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

from stnjax.train.schedule import Stage, lr_at

log = logging.getLogger("stnjax.train")


def fmt_duration(seconds: float) -> str:
    """Seconds as '1h02m', '3m05s' or '12s' ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Pending(NamedTuple):
    """One step whose metrics are still on the devices."""
    iteration: int
    step: int
    mode: str
    metrics: Any       # {name: (sum, count)} device arrays
    compiled: bool     # this call compiled the step


def _mean(sums: dict, counts: dict, k: str) -> float:
    c = counts.get(k, 0.0)
    return sums[k] / c if c > 0 else float("nan")


class StepReporter:
    """Pools the pending steps' metrics into logged records (see the module doc).

    Args:
      host_metrics: device metrics -> {name: (sum, count)} host floats.
      write: appends a record to metrics.jsonl (None on other hosts).
      tag, fold, plane: the run's names for records and log lines.
      stages, total, base_lr, j_halving_every: the schedule, for the rate and ETA.
      steps_after: steps of the job's later runs (the job's ETA; 0: none).
    """

    def __init__(self, *, host_metrics: Callable[[Any], dict], write: Callable[[dict], None] | None,
                 tag: str, fold: int, plane: str, stages: Sequence[Stage], total: int,
                 base_lr: float, j_halving_every: int, steps_after: int = 0):
        self._host, self._write, self._tag = host_metrics, write, tag
        self._fold, self._plane = int(fold), plane
        self._stages, self._total = stages, int(total)
        self._base_lr, self._halving = float(base_lr), int(j_halving_every)
        self._steps_after = int(steps_after)
        self.pending: list[Pending] = []
        self.t_start = self._last_t = time.time()
        self._sec_per_step = float("nan")
        self.last_record: dict | None = None

    def add(self, item: Pending) -> None:
        self.pending.append(item)

    def flush(self, attempt: int, check: Callable[[int, str, dict, dict], None]) -> None:
        """Fetches, checks and logs the pending steps as one record.

        `check(step, mode, per_step_means, sums_counts)` runs for every step
        first; when it raises, the pending steps are dropped and nothing is
        written for them."""
        if not self.pending:
            return
        host = [self._host(p.metrics) for p in self.pending]
        now = time.time()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for p, mets in zip(self.pending, host):
            per = {k: float(s) / float(c) if c > 0 else float("nan") for k, (s, c) in mets.items()}
            try:
                check(p.step, p.mode, per, mets)
            except BaseException:
                self.pending.clear()
                raise
            for k, (s, c) in mets.items():
                sums[k] = sums.get(k, 0.0) + float(s)
                counts[k] = counts.get(k, 0.0) + float(c)
        rec = self._record(attempt, sums, counts, now)
        if self._write:
            self._write(rec)
        self.last_record = rec
        remaining = self._total - rec["step"]
        # The job's ETA: this run's steps left and the later runs' steps at
        # this run's rate (their compilation not included).
        job = (f", job {fmt_duration((remaining + self._steps_after) * self._sec_per_step)}"
               if self._steps_after else "")
        log.info("%s | %s step %d/%d | loss %.4f (coarse %.4f, fine %.4f) | lr %.3g | "
                 "%.1f ex/s | ETA %s%s", self._tag, rec["stage"], rec["step"], self._total,
                 rec["loss"], rec["loss_coarse"], rec["loss_fine"], rec["lr"],
                 rec["examples_per_s"], fmt_duration(remaining * self._sec_per_step), job)
        self.pending.clear()
        self._last_t = time.time()

    def _record(self, attempt: int, sums: dict, counts: dict, now: float) -> dict:
        """The metrics.jsonl record of the pending steps (and the rate update)."""
        last = self.pending[-1]
        n = len(self.pending)
        compiled = any(p.compiled for p in self.pending)
        dt = max(now - self._last_t, 1e-9)
        if not compiled:
            sps = dt / n
            self._sec_per_step = (sps if not math.isfinite(self._sec_per_step)
                                  else 0.7 * self._sec_per_step + 0.3 * sps)
        examples = counts.get("loss", 0.0)
        rec = {"event": "train", "fold": self._fold, "plane": self._plane,
               "iteration": last.iteration + 1, "step": last.step + 1, "attempt": attempt,
               "stage": last.mode, "loss": _mean(sums, counts, "loss"),
               "loss_coarse": _mean(sums, counts, "loss_coarse"),
               "loss_fine": _mean(sums, counts, "loss_fine"),
               "lr": lr_at(self._stages, self._base_lr, self._halving, last.step),
               "examples_per_s": examples / dt, "steps_per_s": n / dt, "steps": n,
               "examples": examples, "compiled": compiled,
               "time_s": round(now - self.t_start, 3)}
        for k in sums:
            if k == "loss_bce" or k.startswith("loss_fine_r"):  # the latter: unroll_rounds > 1
                rec[k] = _mean(sums, counts, k)
            if k.startswith("stat_"):
                name = k[5:]
                area = name.startswith("box_area")  # box_area, box_area_r2, ...
                rec[f"mean_{name}" if area else f"count_{name}"] = (
                    _mean(sums, counts, k) if area else sums[k])
        return rec
