"""One writer per training run: the run folder's lock (stnjax.train.lock)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stnjax.checks import InputError
from stnjax.train.lock import LOCK_FILE, RunLock, check_unlocked

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run", "fold 0 plane Z"):
        held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(InputError, match=rf"fold 1 plane Z is being trained by process "
                                             rf"{os.getpid()} on host .*started"):
            RunLock(tmp_path / "run", "fold 1 plane Z").acquire()
        with pytest.raises(InputError, match="--overwrite would delete"):
            check_unlocked([tmp_path / "run"])
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released
    check_unlocked([tmp_path / "run"])
    RunLock(tmp_path / "run").acquire()  # free again


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                             "started": "yesterday"}))
    with caplog.at_level("WARNING", logger="stnjax.train"):
        lock = RunLock(run)
        lock.acquire()
    assert "taking over the stale lock" in caplog.text
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_refused_with_the_way_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(InputError, match=r"process 1 on host elsewhere.*delete .*LOCK"):
        RunLock(run).acquire()


def test_train_command_refuses_a_locked_run_at_once(tmp_path):
    """`launch.train` on a run folder a live process holds: exit 1 with the
    holder named, before any step is compiled or any checkpoint written."""
    work = tmp_path / "w"
    run = work / "fold0" / "Z"
    run.mkdir(parents=True)
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                             "started": "now"}))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "launch.train",
                        f"--config={ROOT / 'launch/configs/smoke.py'}", f"--workdir={work}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"is being trained by process {os.getpid()}" in r.stderr
    assert "compiling" not in r.stderr and not (run / "checkpoints").exists()
