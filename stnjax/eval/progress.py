"""Progress lines while `evaluate` and `segment` run over cases, with an ETA.

`CaseProgress` logs a line when a case starts (the ETA of the cases left,
this one included, at the mean wall seconds of the cases finished so far,
compilation excluded), and, through the Segmenter's `on_stage` hook, one when
its coarse stage is done and one per round (rounds timed one by one) or one
for the whole loop. The line when a case ends stays the caller's (it knows
the case's results).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from stnjax.train.reporting import fmt_duration

log = logging.getLogger("stnjax.eval")


class CaseProgress:
    """Per-case progress of one run over `total` cases.

    Args:
      what: the run's name in the lines, e.g. "fold 0" or "segment".
      total: cases to run.
      compile_seconds: the seconds compiled so far (the Segmenter's
        `compile_seconds` summed): the ETA leaves compilation out.
      clock: wall clock (tests).
    """

    def __init__(self, what: str, total: int, *, compile_seconds: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total = what, int(total)
        self._compiled, self._clock = compile_seconds, clock
        self._durations: list[float] = []
        self._case = ""
        self._t0 = self._c0 = 0.0

    def eta(self) -> float | None:
        """Seconds left for the cases not finished (None before the first)."""
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        return mean * (self.total - len(self._durations))

    def start(self, case: str) -> None:
        """A case starts: its line, with the ETA."""
        self._case = f"{self.what} case {len(self._durations) + 1}/{self.total} {case}"
        eta = self.eta()
        left = self.total - len(self._durations)
        when = ("ETA after the first case" if eta is None else
                f"ETA {fmt_duration(eta)} for {left} case{'s' * (left != 1)}")
        log.info("%s: started; %s", self._case, when)
        self._t0, self._c0 = self._clock(), self._compiled()

    def stage(self, name: str, seconds: float) -> None:
        """The Segmenter's `on_stage` hook: "coarse", "round <r>" or "rounds"."""
        log.info("%s: %s done in %.2f s", self._case, name, seconds)

    def elapsed(self) -> tuple[float, float]:
        """(wall seconds since the case started, compilation excluded;
        seconds compiling since then)."""
        compiling = self._compiled() - self._c0
        return max(self._clock() - self._t0 - compiling, 0.0), compiling

    def done(self) -> None:
        """The case is finished: its wall time (compilation excluded) counts for the ETA."""
        self._durations.append(self.elapsed()[0])


def case_progress(what: str, total: int, seg: Any) -> CaseProgress:
    """Progress lines with an ETA for `total` cases, fed by the Segmenter
    `seg` (its `compile_seconds` and `on_stage` hook) as each case runs."""
    progress = CaseProgress(what, total,
                            compile_seconds=lambda: sum(seg.compile_seconds.values()))
    seg.on_stage = progress.stage
    return progress
