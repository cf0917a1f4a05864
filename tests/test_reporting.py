"""The logs' ETAs: training (this run's and the whole job's), evaluation and segmentation
per case, and the training-curve picture progress.png."""

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


def _records():
    """Two attempts (a restart at iteration 20) of S then J, logged every 2 steps."""
    recs = []
    for attempt, steps in ((0, range(2, 21, 2)), (1, range(2, 41, 2))):
        for step in steps:
            it = step + 20 * attempt
            recs.append({"event": "train", "iteration": it, "step": step, "attempt": attempt,
                         "steps": 2, "stage": "S" if step <= 20 else "J",
                         "loss": 1.0 / it, "loss_coarse": 1.2 / it, "loss_fine": 0.8 / it,
                         "lr": 1e-3 if step <= 30 else 5e-4, "examples_per_s": 10.0 + step,
                         "compiled": step == 2})
    return recs + [{"event": "diverged", "iteration": 0}]


def test_progress_picture_marks_stages_and_restarts(tmp_path):
    from stnjax.train import progress

    stages, restarts = progress._boundaries(_records()[:-1])
    assert stages == [(0, "S"), (20, "S"), (40, "J")] and restarts == [20]
    np.testing.assert_allclose(progress.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    path = progress.draw_progress(_records(), tmp_path / "progress.png", title="rstn fold 0")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not [p for p in tmp_path.iterdir() if p.name != "progress.png"]  # no temporaries
    progress.draw_progress([], tmp_path / "empty.png", title="no steps yet")  # no crash


def test_progress_picture_is_redrawn_at_most_once_a_minute(tmp_path, monkeypatch):
    from stnjax.train import progress

    drawn, now = [], [0.0]
    monkeypatch.setattr(progress, "draw_progress", lambda recs, path, title: drawn.append(now[0]))
    pic = progress.ProgressPicture(tmp_path / "p.png", _records, title="t", min_interval_s=60,
                                   clock=lambda: now[0])
    for t in (0, 10, 59, 61, 100, 130):
        now[0] = t
        pic.update()
    now[0] = 131
    pic.update(force=True)  # the run's end
    assert drawn == [0, 61, 130, 131]


def test_case_progress_eta_leaves_compilation_out(caplog):
    """evaluate/segment: a line as each case starts with the ETA of the cases
    left at the mean time of the finished ones (compilation not counted),
    and a line per stage the Segmenter reports."""
    from stnjax.eval import progress

    now, compiled = [0.0], [0.0]
    seg = type("Seg", (), {"compile_seconds": {}, "on_stage": None})()
    prog = progress.CaseProgress("fold 0", 3, compile_seconds=lambda: compiled[0],
                                 clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger=progress.log.name)
    prog.start("0007")
    prog.hook(seg, "0007")
    now[0] += 50.0
    compiled[0] += 40.0  # the first case compiled for 40 of its 50 s
    seg.on_stage("coarse stage", 0.25)
    assert prog.elapsed("0007") == (10.0, 40.0)
    assert prog.done("0007") == (10.0, 40.0)
    prog.start("0008")
    now[0] += 20.0
    prog.done("0008")
    prog.start("0009")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fold 0 case 1/3 0007: started; ETA after the first case",
                     "fold 0 case 1/3 0007: coarse stage done in 0.25 s",
                     "fold 0 case 2/3 0008: started; ETA 20s for 2 cases",
                     "fold 0 case 3/3 0009: started; ETA 15s for 1 case"]


def test_case_progress_of_cases_on_several_devices_at_once(caplog):
    """Two devices: cases overlap, each line names its own case, and the ETA
    divides the cases left by the devices."""
    from stnjax.eval import progress

    now = [0.0]
    prog = progress.case_progress("fold 1", 4, [type("S", (), {"compile_seconds": {}})()] * 2)
    prog._clock = lambda: now[0]
    caplog.set_level(logging.INFO, logger=progress.log.name)
    prog.start("a")
    prog.start("b")
    now[0] += 10.0
    prog.stage("a", "coarse stage", 1.0)
    prog.done("b")
    now[0] += 10.0
    assert prog.done("a") == (20.0, 0.0)
    prog.start("c")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fold 1 case 1/4 a: started; ETA after the first case",
                     "fold 1 case 2/4 b: started; ETA after the first case",
                     "fold 1 case 1/4 a: coarse stage done in 1.00 s",
                     "fold 1 case 3/4 c: started; ETA 15s for 2 cases"]
