"""Training stages and the learning-rate schedule.

A run is a sequence of stages, each a training *mode* for a number of steps.
The reference RSTN schedule (reference section 3.3) is
`S:10000,I:30000,J:40000`: S (separate: fine crop by the ground-truth box,
no saliency), I (individual: ground-truth box, saliency), J (joint: box from
the coarse prediction). The rate is fixed in S and I; in J it halves every
`j_halving_every` steps counted from the start of J (Caffe: `multistep` at
50K / 60K / 70K with J starting at 40K, so 1e-5 -> 5e-6 -> 2.5e-6 -> 1.25e-6).

The stage-wise baseline (method "stagewise", Zhou et al. 2016, reference 5.4)
uses the modes C (coarse network only), F (fine network only) and CF (both
at once; the networks share no parameter and no gradient path, so this is
the same as training them one after the other on the same slices), each at
a fixed rate.

Steps are counted from 0 over the whole schedule: step s runs the stage whose
[start, end) holds s.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from stnjax.checks import InputError

RSTN_MODES = ("S", "I", "J")
STAGEWISE_MODES = ("C", "F", "CF")
METHOD_MODES = {"rstn": RSTN_MODES, "stagewise": STAGEWISE_MODES}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: `mode` runs for steps [start, end)."""

    mode: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_stages(spec: str, method: str = "rstn") -> tuple[Stage, ...]:
    """Parses a stage string such as "S:10000,I:30000,J:40000".

    Args:
      spec: comma-separated `MODE:STEPS` items (config field train.stages).
      method: "rstn" (modes S, I, J) or "stagewise" (modes C, F, CF).

    Returns:
      The stages in order, with absolute [start, end) step ranges.

    Raises:
      InputError naming `train.stages` for an unknown mode, a mode that does
      not belong to the method, a repeated mode, or a non-positive length.
    """
    if method not in METHOD_MODES:
        raise InputError(
            f"train.method: expected one of {sorted(METHOD_MODES)}, got {method!r}")
    allowed = METHOD_MODES[method]
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise InputError(f"train.stages: empty stage list {spec!r}")
    stages, start, seen = [], 0, set()
    for item in items:
        m = re.fullmatch(r"([A-Za-z]+)\s*:\s*(\d+)", item)
        if not m:
            raise InputError(
                f"train.stages: cannot parse {item!r} in {spec!r}; expected MODE:STEPS")
        mode, length = m.group(1).upper(), int(m.group(2))
        if mode not in allowed:
            raise InputError(
                f"train.stages: mode {mode!r} is not a mode of method {method!r} "
                f"(allowed: {', '.join(allowed)})")
        if mode in seen:
            raise InputError(f"train.stages: mode {mode!r} appears twice in {spec!r}")
        if length <= 0:
            raise InputError(f"train.stages: stage {mode!r} has length {length}; must be > 0")
        seen.add(mode)
        stages.append(Stage(mode, start, start + length))
        start += length
    return tuple(stages)


def total_steps(stages: Sequence[Stage]) -> int:
    """The number of steps of the whole schedule."""
    return stages[-1].end


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that runs step `step` (host side, a Python int)."""
    for st in stages:
        if st.start <= step < st.end:
            return st
    raise InputError(f"step: {step} is outside the schedule [0, {total_steps(stages)})")


def make_lr_schedule(stages: Sequence[Stage], base_lr: float,
                     j_halving_every: int):
    """The base learning rate as a function of the step.

    Args:
      stages: from `parse_stages`.
      base_lr: the base rate (train.base_lr); group multipliers are applied
        by the optimiser.
      j_halving_every: in stage J the rate is `base_lr * 0.5 ** k` with
        k = (step - J.start) // j_halving_every (0 or less: never halve).

    Returns:
      fn(step) -> float32 scalar. Works on a traced int32 step (inside jit)
      and on a Python / NumPy int.
    """
    j = next((st for st in stages if st.mode == "J"), None)
    every = int(j_halving_every)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        lr = jnp.asarray(base_lr, jnp.float32)
        if j is None or every <= 0:
            return lr
        k = jnp.maximum(step - j.start, 0) // every
        # Halvings only inside J (a schedule may in principle continue after J).
        k = jnp.where(step >= j.start, k, 0)
        return lr * jnp.power(jnp.float32(0.5), k.astype(jnp.float32))

    return schedule


def lr_at(stages: Sequence[Stage], base_lr: float, j_halving_every: int,
          step: int) -> float:
    """Host-side value of the schedule at `step` (for logs), as a float."""
    return float(np.asarray(make_lr_schedule(stages, base_lr, j_halving_every)(step)))
