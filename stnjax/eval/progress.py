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
import threading
import time
from typing import Any, Callable, Sequence

from stnjax.train.reporting import fmt_duration

log = logging.getLogger("stnjax.eval")


class CaseProgress:
    """Per-case progress of one run over `total` cases, several of which may
    run at once (one per device, `stnjax.infer.cohort`): each call names its case.

    Args:
      what: the run's name in the lines, e.g. "fold 0" or "segment".
      total: cases to run.
      compile_seconds: the seconds compiled so far (the Segmenter's
        `compile_seconds` summed): the ETA leaves compilation out.
      parallel: cases that run at once (devices); the ETA divides by it.
      clock: wall clock (tests).
    """

    def __init__(self, what: str, total: int, *, compile_seconds: Callable[[], float],
                 parallel: int = 1, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.parallel = what, int(total), max(int(parallel), 1)
        self._compiled, self._clock = compile_seconds, clock
        self._durations: list[float] = []
        # case -> (its name in the lines, start time, seconds compiled at its start)
        self._open: dict[str, tuple[str, float, float]] = {}
        self._lock = threading.Lock()

    def eta(self) -> float | None:
        """Seconds left for the cases not finished (None before the first)."""
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        return mean * (self.total - len(self._durations)) / self.parallel

    def start(self, case: str) -> None:
        """A case starts: its line, with the ETA."""
        with self._lock:
            label = f"{self.what} case {len(self._durations) + len(self._open) + 1}/" \
                    f"{self.total} {case}"
            self._open[case] = (label, self._clock(), self._compiled())
            eta, left = self.eta(), self.total - len(self._durations)
        when = ("ETA after the first case" if eta is None else
                f"ETA {fmt_duration(eta)} for {left} case{'s' * (left != 1)}")
        log.info("%s: started; %s", label, when)

    def stage(self, case: str, name: str, seconds: float) -> None:
        """A stage of `case` is done (the Segmenter's `on_stage` hook, see `hook`)."""
        log.info("%s: %s done in %.2f s", self._open[case][0], name, seconds)

    def hook(self, seg: Any, case: str) -> None:
        """Sends the stages of the Segmenter `seg` (one device's) to `case`'s lines."""
        seg.on_stage = lambda name, seconds: self.stage(case, name, seconds)

    def elapsed(self, case: str) -> tuple[float, float]:
        """(wall seconds since `case` started, compilation excluded; seconds
        compiling since then)."""
        _, t0, c0 = self._open[case]
        compiling = self._compiled() - c0
        return max(self._clock() - t0 - compiling, 0.0), compiling

    def done(self, case: str) -> tuple[float, float]:
        """`case` is finished: its wall time (compilation excluded) counts for
        the ETA; returns its `elapsed`."""
        seconds = self.elapsed(case)
        with self._lock:
            del self._open[case]
            self._durations.append(seconds[0])
        return seconds


def case_progress(what: str, total: int, segs: Sequence[Any]) -> CaseProgress:
    """Progress lines with an ETA for `total` cases run on the Segmenters
    `segs` (one per device; they share `compile_seconds`); `CaseProgress.hook`
    connects a Segmenter's stages to the case it runs."""
    return CaseProgress(what, total, parallel=len(segs),
                        compile_seconds=lambda: sum(segs[0].compile_seconds.values()))
