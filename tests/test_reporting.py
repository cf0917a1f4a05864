"""The training log's ETAs: this run's and, with later runs, the whole job's."""

import logging

import numpy as np

from stnjax.train import reporting
from stnjax.train.schedule import parse_stages


def _reporter(steps_after, clock):
    stages = parse_stages("S:10,J:10", "rstn")
    return reporting.StepReporter(
        host_metrics=lambda m: m, write=None, tag="run 1/3 fold 0 plane X", fold=0, plane="X",
        stages=stages, total=20, base_lr=1e-3, j_halving_every=10, steps_after=steps_after)


def test_job_eta_counts_the_later_runs_at_this_runs_rate(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(reporting.time, "time", lambda: now[0])
    metrics = {k: (np.float32(1.0), np.float32(2.0)) for k in ("loss", "loss_coarse", "loss_fine")}
    caplog.set_level(logging.INFO, logger=reporting.log.name)
    for steps_after, want in ((40, "ETA 16s, job 56s"), (0, "ETA 16s |")):
        rep = _reporter(steps_after, now)
        for step in range(4):   # 4 steps in 4 s, none compiling: 1 s a step
            rep.add(reporting.Pending(step, step, "S", metrics, False))
        now[0] += 4.0
        caplog.clear()
        rep.flush(0, lambda *a: None)
        line = caplog.records[-1].getMessage() + " |"
        assert want in line, line
