"""Evaluation and segmentation over several hosts (`--multihost`).

Every process runs the same command on the same cases (storage every host
sees, as for training). `Hosts.agree` refuses, before any work, processes
that see different case lists or settings; each process then takes its share
by a deterministic rule (`Hosts.share`: every count-th case from its index),
runs it on its local devices and writes its records after every case into
its own part file (`<out>/<stem>.p<index>.json`; process 0 writes the main
file); at the end `Hosts.statuses` (one all-gather) tells every process
whether every other one finished, and process 0 merges the parts. A
process that fails writes a stop file (`<out>/.stop`, naming the case and
host), so the others start no new case and stop cleanly; the finished
cases of every process are kept and a rerun resumes from them.

With one process every method is a no-op or trivial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stnjax.checks import InputError
from stnjax.fileio import atomic_write_text

STOP_FILE = ".stop"
_MESSAGE_BYTES = 2048  # a failure message as the all-gather carries it


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process among the processes of one run: index, count and host name."""
    index: int = 0
    count: int = 1
    host: str = "localhost"

    @classmethod
    def current(cls) -> "Hosts":
        """The processes of `jax.distributed` (one without it)."""
        import jax
        return cls(jax.process_index(), jax.process_count(), socket.gethostname())

    @property
    def primary(self) -> bool:
        return self.index == 0

    def name(self) -> str:
        """This process as messages name it: "process 1 on host h"."""
        return f"process {self.index} on host {self.host}"

    def share(self, keys: Sequence[str]) -> list[str]:
        """This process's cases: every count-th key from its index."""
        return list(keys)[self.index::self.count]

    def agree(self, what: str, cases: Sequence[str], settings: Any) -> None:
        """InputError on every process unless all processes have the same
        `cases` (in order) and `settings` (JSON-able): hosts that see other
        data, folds or settings would split the cases wrongly."""
        if self.count == 1:
            return
        rows = _allgather(self._digest_row(cases, settings))
        bad = [k for k in range(self.count) if not np.array_equal(rows[k], rows[0])]
        if bad:
            counts = ", ".join(f"process {k}: {int(rows[k][0])}" for k in range(self.count))
            raise InputError(
                f"{what}: the processes disagree on the cases or settings (processes {bad} "
                f"differ from process 0; cases per process: {counts}); every host must see "
                "the same dataset, folds, resumed records and settings. Nothing was run")

    @staticmethod
    def _digest_row(cases: Sequence[str], settings: Any) -> np.ndarray:
        """(33,) int32: the case count, then the SHA-256 of cases and settings."""
        text = json.dumps({"cases": list(cases), "settings": settings}, sort_keys=True,
                          default=str)
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
        return np.concatenate([[len(cases)], digest]).astype(np.int32)

    def statuses(self, error: str | None) -> list[str | None]:
        """Every process's failure message (None: it finished), in process
        order; one all-gather, so it waits until every process got here."""
        if self.count == 1:
            return [error]
        buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        if error is not None:
            data = error.encode()[:_MESSAGE_BYTES]
            buf[0], buf[1:1 + len(data)] = 1, np.frombuffer(data, np.uint8)
        rows = _allgather(buf)
        return [bytes(r[1:]).rstrip(b"\0").decode(errors="replace") if r[0] else None
                for r in rows]

    def outcome(self, out: Path, failure: tuple[str, str, BaseException] | None
                ) -> tuple[str | None, list[str | None]]:
        """(this process's failure message, every process's) at the end of a
        run: `failure` is (what failed, e.g. "case 'x'", stage, exception) or
        None; a failure first tells the others to stop (`signal_stop`)."""
        error = None
        if failure is not None:
            what, stage, e = failure
            error = f"{what} failed on {self.name()} ({stage}): {reason(e)}"
            self.signal_stop(out, error)
        return error, self.statuses(error)

    def merge_parts(self, out: Path, stem: str, read: Callable[[Path], None],
                    write: Callable[[], None]) -> None:
        """Process 0 of several, after `outcome`: `read` each part file of
        `stem`, `write` the merged result, then remove the part files and the
        stop file. A no-op elsewhere."""
        if not (self.primary and self.count > 1):
            return
        parts = part_files(out, stem)
        for p in parts:
            read(p)
        write()
        for p in parts:
            p.unlink()
        self.clear_stop(out)

    # ------------------------------------------------------- the stop file
    def signal_stop(self, out: Path, message: str) -> None:
        """Tells the other processes to start no new case (`stopped`)."""
        if self.count > 1:
            atomic_write_text(out / STOP_FILE, message + "\n")

    def stopped(self, out: Path) -> bool:
        return self.count > 1 and (out / STOP_FILE).exists()

    def clear_stop(self, out: Path) -> None:
        """Process 0 removes a stop file (at the start and the end)."""
        if self.primary:
            (out / STOP_FILE).unlink(missing_ok=True)


def part_file(out: Path, stem: str, index: int) -> Path:
    """The per-process file of process `index` > 0: `<out>/<stem>.p<index>.json`."""
    return out / f"{stem}.p{int(index)}.json"


def part_files(out: Path, stem: str) -> list[Path]:
    """Every per-process file of `stem` in `out` (any process count), sorted."""
    return sorted(p for p in out.glob(f"{stem}.p*.json")
                  if p.name[len(stem) + 2:-5].isdigit())


def reason(e: BaseException) -> str:
    """An exception in one line: "<file>: <reason>" for an OS error."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def _allgather(row: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(row))


__all__ = ["Hosts", "part_file", "part_files", "reason", "STOP_FILE"]
