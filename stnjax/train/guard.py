"""The convergence guard (reference 7, lesson 1): restart S when the coarse net never started.

At the end of S, if the mean coarse loss over its last `guard_window` steps
is above `guard_coarse_loss` (the coarse network never began to predict the
organ: loss stuck near 0.95), S restarts from the initial state with the
next attempt number folded into the keys and the sampler seed, at most
`guard_max_restarts` times. `ConvergenceGuard` holds the guard's state (the
recent coarse losses of this S attempt and the restarts so far), which a
checkpoint carries, and decides; the loop does the restart.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("stnjax.train")


@dataclasses.dataclass(frozen=True)
class GuardDecision:
    """restart: S must restart; mean: mean coarse loss over the last n steps."""

    restart: bool
    mean: float
    n: int
    threshold: float


def guard_decision(coarse_losses: Sequence[float], *, window: int,
                   threshold: float) -> GuardDecision:
    """The convergence guard's decision at the end of S.

    Args:
      coarse_losses: the per-step (global batch) coarse losses of this S
        attempt, oldest first.
      window: how many of the last steps count (all of them if fewer).
      threshold: restart when their mean is above this.

    Returns:
      GuardDecision; never a restart without any step, and a non-finite mean
      is a restart.
    """
    vals = np.asarray(list(coarse_losses)[-int(window):] if window > 0 else [], np.float64)
    if vals.size == 0:
        return GuardDecision(False, float("nan"), 0, float(threshold))
    mean = float(vals.mean())
    return GuardDecision(not mean <= threshold, mean, int(vals.size), float(threshold))


class ConvergenceGuard:
    """The guard of one run: its coarse-loss history, its restarts, its decision.

    Args:
      on: whether the guard acts (RSTN training with guard_max_restarts > 0).
      window, threshold, max_restarts: `train.guard_window`,
        `train.guard_coarse_loss`, `train.guard_max_restarts`.
      history, restarts: the state a checkpoint carried (resume), else empty.
      tag: the run's name for log lines.
      write: appends an event to the run's metrics (None on other hosts).
    """

    def __init__(self, *, on: bool, window: int, threshold: float, max_restarts: int,
                 history: Sequence[float] = (), restarts: Sequence[dict] = (),
                 tag: str = "", write: Callable[[dict], None] | None = None):
        self.on, self.window, self.threshold = on, int(window), float(threshold)
        self.max_restarts = int(max_restarts)
        self.history = [float(v) for v in history]
        self.restarts = [dict(r) for r in restarts]
        self._tag, self._write = tag, write

    def observe(self, mode: str, coarse_loss: float) -> None:
        """Records one step's coarse loss (S steps only, when the guard is on)."""
        if mode == "S" and self.on:
            self.history = (self.history + [float(coarse_loss)])[-self.window:]

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard (JSON-able)."""
        return {"guard_history": [float(v) for v in self.history[-self.window:]],
                "restarts": self.restarts}

    def end_of_s(self, *, iteration: int, step: int, attempt: int) -> bool:
        """The decision at the end of S: True when S must restart (logged and
        written as guard_restart, the history then empty); False when it passed
        or the restarts are used up (guard_passed / guard_gave_up)."""
        if not self.on:
            return False
        dec = guard_decision(self.history, window=self.window, threshold=self.threshold)
        event = {"iteration": iteration, "step": step, "attempt": attempt,
                 "mean_coarse": dec.mean, "window": dec.n, "threshold": dec.threshold}
        if dec.restart and attempt < self.max_restarts:
            log.warning("%s: convergence guard: mean coarse loss %.4f over the last %d "
                        "steps of S is above %.3f; restarting S (attempt %d of %d)",
                        self._tag, dec.mean, dec.n, dec.threshold, attempt + 2,
                        self.max_restarts + 1)
            self.restarts.append(dict(event))
            self._emit(dict(event, event="guard_restart", next_attempt=attempt + 1))
            self.history = []
            return True
        if dec.restart:
            log.warning("%s: convergence guard: S still stuck after %d restarts (mean "
                        "coarse loss %.4f > %.3f); continuing", self._tag, attempt,
                        dec.mean, dec.threshold)
        else:
            log.info("%s: convergence guard: S converged (mean coarse loss %.4f <= %.3f)",
                     self._tag, dec.mean, dec.threshold)
        self._emit(dict(event, event="guard_gave_up" if dec.restart else "guard_passed"))
        return False

    def _emit(self, record: dict) -> None:
        if self._write is not None:
            self._write(record)
