"""Whole training runs through `python -m launch.train` (smoke config, CPU).

All runs share one persistent XLA compilation cache, so only the first one
compiles (init, S, I, J); the others load the compiled programs. Runs:
  A  uninterrupted;
  B  the same config, SIGKILLed right after it starts the asynchronous save
     of iteration 8 (the save may or may not complete);
  B' the command of B run again: it resumes from the newest complete
     checkpoint and must end with exactly A's state and metrics;
  G  the guard forced to fire (threshold 0, one restart) and a NaN injected
     into the images from step 6 on: S restarts once, the guard then gives
     up, and the NaN stops the run keeping the last good checkpoint.
"""

import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stnjax.train.lock import LOCK_FILE
from xla_flags import with_devices

ROOT = Path(__file__).resolve().parents[1]

# Runs launch.train's main with a fault injected: "kill" SIGKILLs the process
# right after Checkpointer.save(iteration=N) returns (the files are still being
# written in the background); "sigint" sends it SIGINT (Ctrl-C) at the same
# moment; "nan" makes the sampler's images NaN from step N.
DRIVER = r"""
import os, signal, sys
import numpy as np
mode, at = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0]] + sys.argv[3:]
# A shell's background job (a CI started with `&`) inherits SIGINT ignored,
# and Python then installs no Ctrl-C handler; a terminal's Ctrl-C is what
# this stands for, so give the process Python's usual one (kept over the
# huge-pages re-exec: a handled signal is reset to the default there).
signal.signal(signal.SIGINT, signal.default_int_handler)
from stnjax.train import checkpoint, inputs
if mode in ("kill", "sigint"):
    orig_save = checkpoint.Checkpointer.save
    sig = signal.SIGKILL if mode == "kill" else signal.SIGINT
    def save(self, it, state, meta):
        orig_save(self, it, state, meta)
        if it == at:
            os.kill(os.getpid(), sig)
    checkpoint.Checkpointer.save = save
elif mode == "nan":
    orig_make = inputs.make_sampler
    def make_sampler(config, pd, seed):
        sampler = orig_make(config, pd, seed)
        orig_batch = sampler.batch
        def batch(step, **kw):
            b = orig_batch(step, **kw)
            if step >= at:
                b["image"] = b["image"] * np.float32("nan")
            return b
        sampler.batch = batch
        return sampler
    inputs.make_sampler = make_sampler
from absl import app
from launch import train
app.run(train.main)
"""


def _env():
    env = dict(os.environ)
    # 8 fake devices and the cheap compile flags, as in conftest (all runs
    # use the same flags, so their results stay comparable bit for bit).
    env["XLA_FLAGS"] = with_devices(8)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _launch(workdir, cache, *overrides, driver=None, timeout=240):
    args = [f"--config={ROOT / 'launch/configs/smoke.py'}", f"--workdir={workdir}",
            f"--compilation_cache={cache}", *overrides]
    cmd = [sys.executable, "-m", "launch.train", *args] if driver is None else \
        [sys.executable, "-c", DRIVER, *driver, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _final_state(run_dir):
    from stnjax.train.checkpoint import Checkpointer
    ck = Checkpointer(Path(run_dir) / "checkpoints", keep=3, read_only=True)
    try:
        return ck.steps(), ck.restore_latest(None)
    finally:
        ck.close()


def _restore(run_dir, iteration):
    from stnjax.train.checkpoint import Checkpointer
    ck = Checkpointer(Path(run_dir) / "checkpoints", keep=3, read_only=True)
    try:
        return ck.restore(iteration, None)
    finally:
        ck.close()


def _records(run_dir):
    volatile = {"examples_per_s", "steps_per_s", "time_s", "compiled"}
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in volatile} for l in lines]


def _launch_with_a_second_trainer(workdir, cache, timeout=240):
    """Run A, and while it trains a second `launch.train` of the same command
    on the same workdir (a real concurrent process, not a planted lock).
    Returns both CompletedProcess results."""
    import time
    args = [f"--config={ROOT / 'launch/configs/smoke.py'}", f"--workdir={workdir}",
            f"--compilation_cache={cache}"]
    first = subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = Path(workdir) / "fold0" / "Z" / LOCK_FILE
    deadline = time.monotonic() + timeout
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=timeout)
    out, err = first.communicate(timeout=timeout)
    second.first_pid = first.pid
    return subprocess.CompletedProcess(first.args, first.returncode, out, err), second


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_runs")
    cache = base / "xla_cache"
    out = {"base": base, "cache": cache}
    out["A"], out["A_second"] = _launch_with_a_second_trainer(base / "A", cache)
    out["B"] = _launch(base / "B", cache, driver=("kill", "8"))
    out["B2"] = _launch(base / "B", cache)
    out["G"] = _launch(base / "G", cache, "--config.train.guard_coarse_loss=0.0",
                       "--config.train.guard_max_restarts=1", driver=("nan", "6"))
    return out


def test_uninterrupted_run(runs):
    a = runs["A"]
    assert a.returncode == 0, a.stderr[-3000:]
    run = runs["base"] / "A" / "fold0" / "Z"
    steps, (it, state, meta) = _final_state(run)
    assert steps == [4, 8, 12] and it == 12 and int(state["step"]) == 12
    assert meta["step"] == meta["total_steps"] == 12 and meta["restarts"] == []
    for name in ("config.json", "config.txt", "train_config.json", "versions.json", "train.log"):
        assert (runs["base"] / "A" / name).is_file(), name
    versions = json.loads((runs["base"] / "A" / "versions.json").read_text())
    assert versions["jax"] and versions["optax"] and versions["orbax-checkpoint"]
    recs = [r for r in _records(run) if r["event"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12]
    assert [r["stage"] for r in recs] == ["S", "S", "I", "I", "J", "J"]
    # J (steps 8..11) halves the rate every 2 steps: the last logged step is 11.
    assert recs[-1]["lr"] == pytest.approx(5e-4) and recs[0]["lr"] == pytest.approx(1e-3)
    for r in recs:
        lam = 1.0 / 3.0
        assert r["loss"] == pytest.approx(lam * r["loss_coarse"] + (1 - lam) * r["loss_fine"],
                                          rel=1e-5)
        assert r["examples"] == 4.0 and "count_overflow" in r and "count_fallback" in r
    log = (runs["base"] / "A" / "train.log").read_text()
    assert "ETA" in log and "convergence guard: S converged" in log
    assert json.loads((run / "run.json").read_text())["complete"] is True


def test_a_second_trainer_on_the_same_workdir_is_refused_at_once(runs):
    """The second process exits 1 naming the first (its pid) while the
    first finishes undisturbed: checkpoints and one record per step (the
    assertions of test_uninterrupted_run hold for it)."""
    a, second = runs["A"], runs["A_second"]
    assert a.returncode == 0, a.stderr[-3000:]
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is being trained by process {second.first_pid}" in errors[0], errors[0]
    assert "compiling" not in second.stderr
    assert not (runs["base"] / "A" / "fold0" / "Z" / LOCK_FILE).exists()  # released at the end
    recs = [r for r in _records(runs["base"] / "A" / "fold0" / "Z") if r["event"] == "train"]
    assert len(recs) == len({r["step"] for r in recs})


def _same(a, b):
    import jax
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_s_leaves_the_saliency_alone_and_i_trains_it(runs):
    assert runs["A"].returncode == 0 and runs["G"].returncode != 0
    # G's checkpoint 4 is its restarted S attempt at step 0: the initial
    # parameters (the same for every attempt and for run A).
    init, meta = _restore(runs["base"] / "G" / "fold0" / "Z", 4)
    assert int(init["step"]) == 0 and meta["attempt"] == 1
    s_end, _ = _restore(runs["base"] / "A" / "fold0" / "Z", 4)
    i_end, _ = _restore(runs["base"] / "A" / "fold0" / "Z", 8)
    p0, p4, p8 = init["params"], s_end["params"], i_end["params"]
    assert _same(p0["saliency"], p4["saliency"])  # frozen in S (no decay either)
    import jax
    assert not any(np.any(v) for v in jax.tree.leaves(s_end["opt_state"]["velocity"]["saliency"]))
    for net in ("coarse", "fine"):
        assert not _same(p0[net], p4[net]), net
    assert not _same(p4["saliency"], p8["saliency"])  # trained in I
    assert not _same(p4["coarse"], p8["coarse"]) and not _same(p4["fine"], p8["fine"])
    assert int(s_end["opt_state"]["count"]) == 4 and int(i_end["opt_state"]["count"]) == 8


def test_kill_and_resume_gives_identical_training(runs):
    assert runs["B"].returncode == -signal.SIGKILL, runs["B"].stderr[-3000:]
    b2 = runs["B2"]
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert "resuming from checkpoint" in (runs["base"] / "B" / "train.log").read_text()
    _, (ita, sa, ma) = _final_state(runs["base"] / "A" / "fold0" / "Z")
    _, (itb, sb, mb) = _final_state(runs["base"] / "B" / "fold0" / "Z")
    assert ita == itb == 12
    import jax
    la, ta = jax.tree_util.tree_flatten(sa)
    lb, tb = jax.tree_util.tree_flatten(sb)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)  # bit-identical params and optimiser state
    assert _records(runs["base"] / "A" / "fold0" / "Z") == _records(runs["base"] / "B" / "fold0" / "Z")
    assert ma["guard_history"] == mb["guard_history"]


def test_guard_restart_then_nan_stop_keeps_last_good_checkpoint(runs):
    g = runs["G"]
    run = runs["base"] / "G" / "fold0" / "Z"
    assert g.returncode != 0
    assert "non-finite loss at step 6 (stage I)" in g.stderr
    assert "the last good checkpoint is iteration 8" in g.stderr
    log = (runs["base"] / "G" / "train.log").read_text()
    assert "restarting S (attempt 2 of 2)" in log and "S still stuck after 1 restarts" in log
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in recs if r["event"] != "train"]
    assert events == ["guard_restart", "guard_gave_up", "diverged"]
    restart = next(r for r in recs if r["event"] == "guard_restart")
    assert restart["iteration"] == 4 and restart["next_attempt"] == 1
    assert restart["mean_coarse"] > 0.0 and restart["threshold"] == 0.0
    # The restarted S is a new attempt: new keys and data order, so its
    # losses differ from the first attempt's (same initial parameters).
    s_recs = [r for r in recs if r["event"] == "train" and r["stage"] == "S"]
    assert [r["attempt"] for r in s_recs] == [0, 0, 1, 1]
    assert s_recs[0]["loss"] != s_recs[2]["loss"]
    steps, (it, state, meta) = _final_state(run)
    assert it == 8 and max(steps) == 8  # nothing saved after the NaN
    assert meta["attempt"] == 1 and meta["step"] == 4 and len(meta["restarts"]) == 1
    for leaf in __import__("jax").tree.leaves(state["params"]):
        assert np.all(np.isfinite(leaf))


def test_foreign_workdir_is_refused(runs):
    assert runs["A"].returncode == 0
    r = _launch(runs["base"] / "A", runs["cache"], "--config.train.base_lr=0.002")
    assert r.returncode != 0
    assert "holds checkpoints of another config" in r.stderr
    assert "train.base_lr: 0.001 -> 0.002" in r.stderr


def test_config_typo_is_rejected(tmp_path):
    r = _launch(tmp_path / "w", tmp_path / "c", "--config.train.base_lrr=1")
    assert r.returncode != 0
    assert "base_lrr" in r.stderr
    assert not (tmp_path / "w" / "fold0").exists()


# orbax's failed restore of the damaged checkpoint (in this process, the
# evaluation check) leaves a callback on its closed asyncio loop; the
# "Event loop is closed" it reports at exit is not an error of this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoint_is_moved_aside_and_retrained(runs, tmp_path):
    """The newest checkpoint of a finished run damaged (array files
    truncated): evaluation refuses it with a message naming the damage and
    the fix, leaving it in place; a rerun of the training command moves it
    aside (never deletes it), resumes from the newest good checkpoint,
    retrains the lost steps and ends with the parameters of the
    uninterrupted run, bit for bit."""
    assert runs["A"].returncode == 0
    work = tmp_path / "D"
    shutil.copytree(runs["base"] / "A", work, ignore=shutil.ignore_patterns("jax_cache"))
    ckpts = work / "fold0" / "Z" / "checkpoints"
    files = sorted((ckpts / "12" / "state").rglob("d/*"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    from stnjax.checks import InputError
    from stnjax.train.checkpoint import load_trained_params
    with pytest.raises(InputError, match=r"checkpoint 12 is damaged.*rerun the training command"):
        load_trained_params(work / "fold0" / "Z")
    assert (ckpts / "12").is_dir()  # evaluation moves nothing
    r = _launch(work, runs["cache"])
    assert r.returncode == 0, r.stderr[-3000:]
    log = (work / "train.log").read_text()
    assert "checkpoint 12 in" in log and "moved aside to" in log
    assert "resuming from checkpoint 8" in log
    assert (ckpts.parent / "checkpoints-damaged" / "12" / "state").is_dir()
    _, (ita, sa, ma) = _final_state(runs["base"] / "A" / "fold0" / "Z")
    _, (itd, sd, md) = _final_state(work / "fold0" / "Z")
    assert ita == itd == 12 and md["step"] == md["total_steps"]
    import jax
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sd)):
        np.testing.assert_array_equal(x, y)
    assert _records(runs["base"] / "A" / "fold0" / "Z") == _records(work / "fold0" / "Z")
    params, _ = load_trained_params(work / "fold0" / "Z")  # complete again
    assert params


def test_ctrl_c_stops_with_a_clean_message_and_the_rerun_resumes(runs, tmp_path):
    """SIGINT (Ctrl-C) while a checkpoint is being written: exit status 130,
    one line saying how to go on, no traceback; the rerun resumes and
    finishes with the uninterrupted run's result, bit for bit."""
    assert runs["A"].returncode == 0
    work = tmp_path / "C"
    r = _launch(work, runs["cache"], driver=("sigint", "8"))
    assert r.returncode == 130, r.stderr[-3000:]
    assert "interrupted (Ctrl-C); rerunning the same command resumes" in r.stderr
    assert "Traceback" not in r.stderr
    r = _launch(work, runs["cache"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint" in (work / "train.log").read_text()
    _, (_, sa, _) = _final_state(runs["base"] / "A" / "fold0" / "Z")
    _, (_, sc, _) = _final_state(work / "fold0" / "Z")
    import jax
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sc)):
        np.testing.assert_array_equal(x, y)
    assert _records(runs["base"] / "A" / "fold0" / "Z") == _records(work / "fold0" / "Z")
