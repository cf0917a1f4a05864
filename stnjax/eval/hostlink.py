"""How the processes of a multi-host run talk and notice a lost one.

Evaluation and segmentation over several hosts (`stnjax.eval.hosts`)
exchange a few small strings: at the start each process's case digest, at
the end each process's failure message. They go through a key-value store
every process reaches (`KeyValue`: jax.distributed's, which lives in the
coordination service of process 0, `JaxKV`; `LocalKV` for processes
simulated as threads), never through a device collective, so that
exchanging needs no device program and can wait with a deadline.

Every process (`HostLink`) writes a heartbeat key every `interval` seconds
from a thread and watches the others' heartbeats: a process whose heartbeat
has not changed for `timeout` seconds (killed, crashed, its host or network
gone) is lost (one never heard from, still starting, after `START_GRACE`
timeouts), and so is one that left (its process ended) before the run's
end. An exchange waits until every process has posted its value or is lost,
so a killed process stops the others within about `timeout` seconds instead
of leaving them in a collective until jax.distributed gives up. The
commands start jax.distributed in its recoverable mode (`launch/app.py`), so
that jax itself does not end the surviving processes when one is lost; the
loss of process 0, which hosts jax's coordination service, still ends the
others at once (jax's "Terminating process because the JAX distributed
service detected fatal errors").

Staleness is measured on each process's own monotonic clock from the moment
it last saw a heartbeat change, so clocks of different hosts need not agree.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
from typing import Any, Callable, Protocol

log = logging.getLogger("stnjax.eval")

PREFIX = "stnjax"
DEFAULT_TIMEOUT_S = 60.0
START_GRACE = 3  # a process never heard from is lost after this many timeouts
_POLL_S = 0.1  # how often a waiting exchange looks again
_SETTINGS = {"timeout": DEFAULT_TIMEOUT_S}


class KeyValue(Protocol):
    """A key-value store that every process of a run reaches."""

    def set(self, key: str, value: str) -> None:
        """Sets (or replaces) `key`."""

    def get(self, key: str) -> str | None:
        """The value of `key`, None when unset."""

    def scan(self, prefix: str) -> dict[str, str]:
        """{key: value} of every key that starts with `prefix`."""


class LocalKV:
    """A KeyValue in this process's memory: processes simulated as threads."""

    def __init__(self):
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def scan(self, prefix: str) -> dict[str, str]:
        with self._lock:
            return {k: v for k, v in self._data.items() if k.startswith(prefix)}


class JaxKV:
    """jax.distributed's key-value store (a `DistributedRuntimeClient`)."""

    def __init__(self, client: Any):
        self.client = client

    def set(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value, allow_overwrite=True)

    def get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError NOT_FOUND
            if "NOT_FOUND" in str(e):
                return None
            raise

    def scan(self, prefix: str) -> dict[str, str]:
        return dict(self.client.key_value_dir_get(prefix))


class HostLink:
    """This process's line to the other processes of a run.

    Args:
      kv: the store every process reaches.
      index, count: this process and how many there are.
      host: this process's host name (the others name it so).
      timeout: seconds without a heartbeat change after which a process is lost.
      clock: monotonic seconds (tests may pass another).

    Starts the heartbeat thread at once; `close` ends it (a closed link's
    process looks, to the others, like a killed one).
    """

    def __init__(self, kv: KeyValue, index: int, count: int, host: str, *,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        if timeout <= 0:
            raise ValueError(f"host timeout: expected seconds > 0, got {timeout!r}")
        self.kv, self.index, self.count, self.host = kv, int(index), int(count), host
        self.timeout, self.clock = float(timeout), clock
        self.interval = min(5.0, max(0.05, self.timeout / 6))
        self.exchanges = 0  # exchanges so far: every process makes the same ones
        self.run = 0  # the exchange that began the current run (stop keys)
        self._closed = threading.Event()
        self._silent: frozenset[int] = frozenset()
        self._left: frozenset[int] = frozenset()
        kv.set(self._key("host", self.index), host)
        self._beat_once(0)
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"stnjax-heartbeat-{self.index}")
        self._thread.start()

    # ------------------------------------------------------------ heartbeats
    def _key(self, kind: str, *parts: Any) -> str:
        return "/".join([PREFIX, kind, *(str(p) for p in parts)])

    def _beat_once(self, n: int) -> None:
        self.kv.set(self._key("beat", self.index), str(n))

    def _beat(self) -> None:
        """The heartbeat thread: beats, and watches the others' beats."""
        seen: dict[int, tuple[str | None, float]] = {}
        start, n = self.clock(), 0
        while not self._closed.wait(self.interval):
            n += 1
            try:
                self._beat_once(n)
                beats = self.kv.scan(self._key("beat", ""))
                left = self.kv.scan(self._key("left", ""))
            except Exception as e:  # noqa: BLE001 - the store is gone: jax ends the process
                if not self._closed.is_set():
                    log.warning("heartbeat of %s stopped: %s", self.name(self.index), e)
                return
            now = self.clock()
            for k in range(self.count):
                value = beats.get(self._key("beat", k))
                if k not in seen or seen[k][0] != value:
                    seen[k] = (value, start if k not in seen and value is None else now)
            # A process never heard from may still be starting: a longer grace.
            self._silent = frozenset(
                k for k, (v, t) in seen.items() if k != self.index
                and now - t > (self.timeout if v is not None else START_GRACE * self.timeout))
            self._left = frozenset(int(key.rsplit("/", 1)[1]) for key in left) - {self.index}

    def lost(self) -> list[int]:
        """The other processes that are lost: silent for `timeout` seconds, or left."""
        return sorted(self._silent | self._left)

    def why_lost(self, k: int) -> str:
        """One line on process `k`, lost: who it was and how it was noticed."""
        if k in self._left:
            return f"{self.name(k)} ended before the others (see its own output)"
        return (f"{self.name(k)} was lost: no sign of life for {self.timeout:g} s "
                "(killed, crashed, or its host or network failed)")

    def name(self, k: int) -> str:
        """Process `k` as messages name it: "process 1 on host h"."""
        host = self.host if k == self.index else (self.kv.get(self._key("host", k)) or "?")
        return f"process {k} on host {host}"

    # ------------------------------------------------------------ exchanges
    def exchange(self, value: str) -> list[str | None]:
        """Posts `value` and returns every process's, in process order (None:
        that process is lost, `lost`). Every process must make the same
        exchanges in the same order; waits until each has posted or is lost."""
        self.exchanges += 1
        key = self._key("x", self.exchanges, "")
        self.kv.set(key + str(self.index), value)
        while True:
            posted = self.kv.scan(key)
            lost = set(self.lost())
            values = [posted.get(key + str(k)) for k in range(self.count)]
            if all(v is not None or k in lost for k, v in enumerate(values)):
                return values
            time.sleep(_POLL_S)

    def begin_run(self) -> None:
        """Marks the start of a run (after its first exchange): stop keys are per run."""
        self.run = self.exchanges

    def stop(self, message: str) -> None:
        """Tells the other processes to start no new case (`stop_message`)."""
        self.kv.set(self._key("stop", self.run, self.index), message)

    def stop_message(self) -> str | None:
        """The message of a process that asked to stop in this run, or None."""
        posted = self.kv.scan(self._key("stop", self.run, ""))
        return posted[min(posted)] if posted else None

    # ------------------------------------------------------------ the end
    def leave(self) -> None:
        """Says this process ends (its heartbeat stops): whoever still waits
        for it stops waiting at once."""
        self.close()
        try:
            self.kv.set(self._key("left", self.index), "1")
        except Exception:  # noqa: BLE001 - the store is gone already
            pass

    def close(self) -> None:
        """Ends the heartbeat thread (waits a moment for a beat in flight)."""
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


# ------------------------------------------------------------ this process's link
_PROCESS: dict[str, HostLink] = {}


def configure(timeout: float) -> None:
    """Sets the lost-process timeout (seconds) of this process's link (`--host_timeout`)."""
    if not timeout > 0:
        raise ValueError(f"host timeout: expected seconds > 0, got {timeout!r}")
    _SETTINGS["timeout"] = float(timeout)


def jax_heartbeat_timeout(timeout: float) -> int:
    """jax.distributed's heartbeat timeout beside ours: never shorter than
    jax's default (100 s), since jax ends a process it wrongly thinks dead
    (a stalled one) while our timeout only stops the others cleanly."""
    return int(max(100, timeout))


def start(timeout: float) -> None:
    """Right after jax.distributed starts (`launch/app.py`): sets the timeout
    and, with several processes, starts this process's link, so that every
    process beats from the start, whatever it does before its first exchange."""
    configure(timeout)
    import jax
    if jax.process_count() > 1:
        process_link(jax.process_index(), jax.process_count(), socket.gethostname())


def process_link(index: int, count: int, host: str) -> HostLink:
    """This process's link over jax.distributed's store, made at the first
    call; at exit it says it leaves, and process 0 waits (at most about two
    timeouts) until the other processes that are not lost have disconnected
    from jax, since jax's recoverable mode lets process 0 end (and with it
    the coordination service the others still use) before them."""
    if "link" not in _PROCESS:
        from jax._src import distributed
        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("process_link: jax.distributed is not initialised")
        link = HostLink(JaxKV(client), index, count, host, timeout=_SETTINGS["timeout"])
        _PROCESS["link"] = link
        atexit.register(_at_exit, link, client)  # before jax's own shutdown (LIFO)
    return _PROCESS["link"]


def _at_exit(link: HostLink, client: Any) -> None:
    link.leave()
    import jax
    # Without the recoverable mode jax's own shutdown barrier waits for everyone.
    if (link.index != 0 or not hasattr(client, "get_live_nodes")
            or not getattr(jax.config, "jax_enable_recoverability", False)):
        return
    done = threading.Event()
    # Not the lost ones: jax notices those only after its own heartbeat timeout.
    others = [k for k in range(link.count) if k not in link.lost()]

    def wait_for_others() -> None:
        try:  # returns once every process of `others` but this one has disconnected
            while set(client.get_live_nodes(others)) - {0}:
                time.sleep(_POLL_S)
        except Exception:  # noqa: BLE001 - nothing left to wait for
            pass
        done.set()
    threading.Thread(target=wait_for_others, daemon=True).start()
    if not done.wait(2 * link.timeout + 10):
        log.warning("exiting while other processes still use jax.distributed")


__all__ = ["HostLink", "KeyValue", "LocalKV", "JaxKV", "configure", "start", "process_link",
           "jax_heartbeat_timeout",
           "DEFAULT_TIMEOUT_S"]
