"""One writer per training run: a lock file in the run folder.

Two `launch.train` processes on the same run folder (same workdir, fold and
plane) would interleave checkpoints and metrics; the second one is refused
at once, with the holder named (host, process id, start time). Processes
training other planes of the same workdir (the README's parallel-planes
recipe) take other locks and run side by side; the workdir files they share
(config, versions, the phantom dataset) are written atomically with equal
content, so they do not conflict.

The lock is `<run folder>/LOCK`, created with O_EXCL (atomic on local and
NFS v3+ filesystems) and holding JSON {host, pid, started}. A lock left by
a process that died (same host, no such process) is stale: it is taken over
with a warning. A lock from another host cannot be checked from here; the
error says how to remove it when that run is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from stnjax.checks import InputError

log = logging.getLogger("stnjax.train")

LOCK_FILE = "LOCK"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class RunLock:
    """Context manager holding `<run_dir>/LOCK` while a run trains."""

    def __init__(self, run_dir: str | os.PathLike, tag: str = ""):
        self.path = Path(run_dir) / LOCK_FILE
        self.tag = tag or str(run_dir)
        self._held = False

    def acquire(self) -> None:
        """Takes the lock; InputError naming the holder if a live process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self._held = True
            return
        raise InputError(f"workdir: {self.path} could not be taken (another process keeps "
                         "creating it)")

    def _check_stale(self) -> None:
        """Removes a stale lock (dead process on this host) or raises."""
        h = _holder(self.path)
        host, pid = h.get("host"), h.get("pid")
        who = (f"process {pid} on host {host}, started {h.get('started', '?')}" if pid
               else "an unreadable lock file")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            log.warning("%s: taking over the stale lock %s of %s (no such process)",
                        self.tag, self.path, who)
            self.path.unlink(missing_ok=True)
            return
        raise InputError(
            f"workdir: {self.tag} is being trained by {who} (lock {self.path}); wait for it, "
            f"or, if that run is gone, delete {self.path}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(run_dirs) -> None:
    """Raises InputError if a live process holds the lock of any of
    `run_dirs` (before a workdir's runs are deleted by --overwrite)."""
    for d in run_dirs:
        path = Path(d) / LOCK_FILE
        if path.exists():
            h = _holder(path)
            if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int) \
                    or _alive(h["pid"]):
                raise InputError(
                    f"workdir: {d} is being trained by process {h.get('pid')} on host "
                    f"{h.get('host')} (lock {path}); --overwrite would delete its files. "
                    "Stop it first")
