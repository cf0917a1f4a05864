"""Cohort inference: many cases at once, one per local device.

`run_cases` spreads a list of cases over device segmenters
(`Segmenter.on_device`): a loader thread reads the next cases ahead into
a small queue (NIfTI decoding, resampling: host work), one thread per device
takes the next loaded case and runs the jitted inference on its device,
and the calling thread finishes each result as it arrives (records, files:
host work again), so the host work of one case overlaps the device work of
the others and no device waits for a file. A device takes a new case as
soon as it is free, so a slow case never holds the others back.

The results do not depend on which device ran a case: every device runs
the same compiled program (`stnjax.infer.devices`), so a case gives the
same bits on any of them. What ran where, and how busy each device was,
comes back in `CohortRun`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

from stnjax.infer.devices import device_name

log = logging.getLogger(__name__)

_END = object()  # the loader's last item, once per device thread


@dataclasses.dataclass
class DeviceStats:
    """One device's share of a cohort: cases run and seconds spent in them
    (the rest of the cohort's wall time it was idle)."""
    device: str
    cases: int = 0
    busy_s: float = 0.0


@dataclasses.dataclass
class CohortRun:
    """What `run_cases` did: wall seconds, per-device stats (in device
    order), the cases finished, and the first failure as (case, stage,
    exception) with stage "load", "infer" or "finish" (None: all ran)."""
    wall_s: float
    devices: list[DeviceStats]
    finished: list[str]
    failed: tuple[str, str, BaseException] | None = None

    def idle_fraction(self) -> dict[str, float]:
        """{device: fraction of the wall time it ran no case}."""
        wall = max(self.wall_s, 1e-9)
        return {d.device: max(0.0, 1.0 - d.busy_s / wall) for d in self.devices}


def run_cases(keys: Sequence[str], segmenters: Sequence[Any], *,
              load: Callable[[str], Any], infer: Callable[[Any, Any], Any],
              finish: Callable[[str, Any, Any, str], None], prefetch: int = 0,
              stop: Callable[[], bool] | None = None) -> CohortRun:
    """Runs every case of `keys` on the first free device.

    Args:
      keys: case names, in the order they are loaded.
      segmenters: one per device (`Segmenter.on_device`); more devices
        than cases is fine (the extra ones stay idle).
      load: key -> loaded case (host; the loader thread).
      infer: (segmenter, loaded case) -> result (a device thread).
      finish: (key, loaded case, result, device name) -> None (the calling
        thread, in the order results arrive).
      prefetch: cases loaded ahead of the devices (0: one per device); at
        most len(segmenters) + prefetch loaded cases exist at any time (a
        loaded case is let go when its finish returns).
      stop: polled before each load; True stops loading (another host failed).

    The first failure stops loading; cases already loaded are run and
    finished (and kept; after a failed finish, only run), then
    `CohortRun.failed` names it. Nothing is raised.
    """
    n_dev = len(segmenters)
    if n_dev < 1:
        raise ValueError("run_cases: no device segmenter")
    ahead = max(1, prefetch or n_dev)
    c = _Channels(queue.Queue(maxsize=ahead), queue.Queue(), threading.Event(),
                  threading.Semaphore(n_dev + ahead), [], threading.Condition(), set())
    stats = [DeviceStats(device_name(s.device) if s.device is not None else "default")
             for s in segmenters]
    threads = [threading.Thread(target=_loader, args=(keys, load, c, stop, n_dev),
                                daemon=True, name="cohort-loader")]
    threads += [threading.Thread(target=_device_worker, args=(i, s, st, infer, c),
                                 daemon=True, name=f"cohort-{st.device}")
                for i, (s, st) in enumerate(zip(segmenters, stats))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    finished = _finish_all(c, n_dev, finish)
    for t in threads:
        t.join()
    first = min(c.failures, key=lambda f: f[0])[1:] if c.failures else None
    return CohortRun(time.perf_counter() - t0, stats, finished, first)


@dataclasses.dataclass
class _Channels:
    """What the threads of one `run_cases` share: loaded cases (todo),
    results (done), the halt flag, the slots of loaded cases, the failures,
    and which devices are idle (the lowest idle one takes the next case)."""
    todo: queue.Queue
    done: queue.Queue
    halt: threading.Event
    slots: threading.Semaphore
    failures: list
    turn: threading.Condition
    idle: set

    def fail(self, key: str, stage: str, e: BaseException) -> None:
        self.failures.append((time.monotonic(), key, stage, e))
        self.halt.set()


def _put(q: queue.Queue, item: Any, halt: threading.Event) -> bool:
    """Puts `item`, waiting for room unless `halt` is set (then False)."""
    while not halt.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _acquire(slots: threading.Semaphore, halt: threading.Event) -> bool:
    """Takes a slot, waiting for one unless `halt` is set (then False)."""
    while not halt.is_set():
        if slots.acquire(timeout=0.1):
            return True
    return False


def _loader(keys, load, c: _Channels, stop, n_dev) -> None:
    try:
        for key in keys:
            if c.halt.is_set() or (stop is not None and stop()):
                break
            if not _acquire(c.slots, c.halt):
                break
            try:
                item = load(key)
            except BaseException as e:  # noqa: BLE001 - reported by run_cases
                c.slots.release()
                c.fail(key, "load", e)
                break
            if not _put(c.todo, (key, item), c.halt):
                c.slots.release()
                break
            del item  # the queue holds it now; its slot counts it
    finally:
        for _ in range(n_dev):  # every device thread ends, whatever happened
            c.todo.put(_END)


def _next_case(c: _Channels, i: int) -> Any:
    """The next loaded case (or _END) for device `i`; when several devices are
    idle the lowest one takes it, so that the first case runs on the first
    device (what one case on a many-device machine expects, and what the
    persistent compilation cache of the first device serves)."""
    with c.turn:
        c.idle.add(i)
        while min(c.idle) != i:
            c.turn.wait()
    try:
        return c.todo.get()
    finally:
        with c.turn:
            c.idle.discard(i)
            c.turn.notify_all()


def _device_worker(i: int, seg, st: DeviceStats, infer, c: _Channels) -> None:
    try:
        while True:
            item = _next_case(c, i)
            if item is _END:
                return
            key, loaded = item  # loaded before any failure: run it (at most one per device)
            del item
            t0 = time.perf_counter()
            try:
                res = infer(seg, loaded)
            except BaseException as e:  # noqa: BLE001 - reported by run_cases
                del loaded
                c.slots.release()
                c.fail(key, "infer", e)
                continue
            st.busy_s += time.perf_counter() - t0
            st.cases += 1
            c.done.put((key, loaded, res, st.device))
            del loaded, res  # let go before waiting for the next case
    finally:
        c.done.put(_END)


def _finish_all(c: _Channels, n_dev, finish) -> list[str]:
    """Finishes results as they arrive until every device thread ended; after
    a failed finish (a full disk) the later results are dropped. Each result's
    slot is freed once it is let go."""
    ended, finished, broken = 0, [], False
    try:
        while ended < n_dev:
            item = c.done.get()
            if item is _END:
                ended += 1
                continue
            key, loaded, res, device = item
            del item
            try:
                if not broken:
                    finish(key, loaded, res, device)
                    finished.append(key)
            except BaseException as e:  # noqa: BLE001 - reported by run_cases
                c.fail(key, "finish", e)
                broken = True
            finally:
                del loaded, res
                c.slots.release()
    except BaseException:  # Ctrl-C in the calling thread: let the threads end
        c.halt.set()
        raise
    return finished


__all__ = ["run_cases", "CohortRun", "DeviceStats"]
