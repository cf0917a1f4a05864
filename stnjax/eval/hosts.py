"""Evaluation and segmentation over several hosts (`--multihost`).

Every process runs the same command on the same cases (storage every host
sees, as for training). `Hosts.agree` refuses, before any work, processes
that see different case lists or settings; each process then takes its share
by a deterministic rule (`Hosts.share`: every count-th case from its index),
runs it on its local devices and writes its records after every case into
its own part file (`<out>/<stem>.p<index>.json`; process 0 writes the main
file); at the end `Hosts.outcome` tells every process whether every other
one finished, and process 0 merges the parts. A process that fails asks the
others to stop (`signal_stop`: they start no new case and stop cleanly); a
process that is lost (killed, crashed, its host gone: no heartbeat for
`--host_timeout` seconds, `stnjax.eval.hostlink`) stops the others the same
way. The finished cases of every process are kept and a rerun resumes from
them.

The processes exchange their digests and messages through
`stnjax.eval.hostlink` (jax.distributed's key-value store), not through a
device collective. With one process every method is a no-op or trivial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from stnjax.checks import HostLostError, InputError
from stnjax.eval.hostlink import HostLink


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process among the processes of one run: index, count, host name,
    and (several processes) its `HostLink` to the others."""
    index: int = 0
    count: int = 1
    host: str = "localhost"
    link: HostLink | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> "Hosts":
        """The processes of `jax.distributed` (one without it)."""
        import jax
        index, count, host = jax.process_index(), jax.process_count(), socket.gethostname()
        if count == 1:
            return cls(index, count, host)
        from stnjax.eval.hostlink import process_link
        return cls(index, count, host, process_link(index, count, host))

    @property
    def primary(self) -> bool:
        return self.index == 0

    def name(self, k: int | None = None) -> str:
        """This process (or process `k`) as messages name it: "process 1 on host h"."""
        if k is None or k == self.index:
            return f"process {self.index} on host {self.host}"
        return self.link.name(k) if self.link is not None else f"process {k}"

    def share(self, keys: Sequence[str]) -> list[str]:
        """This process's cases: every count-th key from its index."""
        return list(keys)[self.index::self.count]

    def agree(self, what: str, cases: Sequence[str], settings: Any) -> None:
        """Starts a run: InputError on every process unless all processes have
        the same `cases` (in order) and `settings` (JSON-able), since hosts
        that see other data, folds or settings would split the cases wrongly;
        HostLostError when a process is lost before it answers."""
        if self.count == 1:
            return
        rows = self._gather(what, json.dumps(self._digest(cases, settings)))
        self.link.begin_run()
        digests = [json.loads(r) for r in rows]
        bad = [k for k in range(self.count) if digests[k] != digests[0]]
        if bad:
            counts = ", ".join(f"process {k}: {d[0]}" for k, d in enumerate(digests))
            raise InputError(
                f"{what}: the processes disagree on the cases or settings (processes {bad} "
                f"differ from process 0; cases per process: {counts}); every host must see "
                "the same dataset, folds, resumed records and settings. Nothing was run")

    def sync(self, what: str) -> None:
        """Waits until every process got here (HostLostError if one is lost)."""
        if self.count > 1:
            self._gather(what, "")

    def _gather(self, what: str, value: str) -> list[str]:
        """Every process's `value`; HostLostError naming a lost process."""
        values = self.link.exchange(value)
        lost = [k for k, v in enumerate(values) if v is None]
        if lost:
            raise HostLostError(f"{what}: {self.link.why_lost(lost[0])}; {self.name()} "
                                "stopped before any case ran; rerun the same command")
        return values

    @staticmethod
    def _digest(cases: Sequence[str], settings: Any) -> list:
        """[the case count, the SHA-256 hex of cases and settings]."""
        text = json.dumps({"cases": list(cases), "settings": settings}, sort_keys=True,
                          default=str)
        return [len(cases), hashlib.sha256(text.encode()).hexdigest()]

    def outcome(self, failure: tuple[str, str, BaseException] | None) -> "Outcome":
        """How the run ended on every process; waits until every process got
        here or is lost. `failure`: this process's (what failed, e.g. "case
        'x'", stage, exception) or None; a failure first tells the others to
        stop (`signal_stop`)."""
        error = None
        if failure is not None:
            what, stage, e = failure
            error = f"{what} failed on {self.name()} ({stage}): {reason(e)}"
            self.signal_stop(error)
        if self.count == 1:
            return Outcome(error)
        values = self.link.exchange(json.dumps(error))
        others = [k for k in range(self.count) if k != self.index]
        return Outcome(error, [json.loads(values[k]) for k in others
                               if values[k] is not None and json.loads(values[k])],
                       [self.link.why_lost(k) for k in others if values[k] is None])

    def merge_parts(self, out: Path, stem: str, read: Callable[[Path], None],
                    write: Callable[[], None]) -> None:
        """Process 0 of several, after `outcome`: `read` each part file of
        `stem`, `write` the merged result, then remove the part files. A
        no-op elsewhere."""
        if not (self.primary and self.count > 1):
            return
        parts = part_files(out, stem)
        for p in parts:
            read(p)
        write()
        for p in parts:
            p.unlink()

    # ------------------------------------------------------- stopping early
    def signal_stop(self, message: str) -> None:
        """Tells the other processes to start no new case (`stopped`)."""
        if self.count > 1:
            self.link.stop(message)

    def stopped(self) -> bool:
        """Whether to start no new case: another process failed or is lost."""
        return self.count > 1 and (bool(self.link.lost())
                                   or self.link.stop_message() is not None)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: this process's failure message (None: it finished),
    the other processes' failure messages, and one line per lost process."""
    error: str | None
    failed: list[str] = dataclasses.field(default_factory=list)
    lost: list[str] = dataclasses.field(default_factory=list)

    def raise_for_others(self, me: str, kept: str) -> None:
        """HostLostError when a process was lost, else InputError when another
        one failed, naming it; `me` names this process, `kept` says what was
        kept. Returns when every other process finished."""
        if self.lost:
            raise HostLostError(f"{self.lost[0]}; {me} stopped; {kept}")
        if self.failed:
            raise InputError(f"{self.failed[0]}; {me} stopped; {kept}")


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


__all__ = ["Hosts", "Outcome", "part_file", "part_files", "reason"]
