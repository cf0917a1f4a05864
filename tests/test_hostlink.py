"""Processes of a multi-host run, simulated as threads over one in-memory
store (`stnjax.eval.hostlink.LocalKV`): the deterministic share, the
start-up agreement, a lost process (its heartbeat stops, as after SIGKILL)
noticed within the timeout, and the cohort's bound on loaded cases. No
model and no jax.distributed: the real processes run in
tests/test_experiment.py (launch.evaluate and launch.segment, one process
killed)."""

import threading
import time
import weakref

import pytest

from stnjax.checks import HostLostError, InputError
from stnjax.eval import hostlink
from stnjax.eval.hosts import Hosts
from stnjax.infer import cohort

TIMEOUT = 0.5  # seconds of silence after which a process is lost


def _hosts(n: int, timeout: float = TIMEOUT) -> list[Hosts]:
    kv = hostlink.LocalKV()
    return [Hosts(k, n, f"h{k}", hostlink.HostLink(kv, k, n, f"h{k}", timeout=timeout))
            for k in range(n)]


def _each(hosts: list[Hosts], fn) -> list:
    """fn(hosts[k]) in one thread per process; the results, or the exceptions."""
    out = [None] * len(hosts)

    def run(k):
        try:
            out[k] = fn(hosts[k])
        except Exception as e:  # noqa: BLE001 - compared by the test
            out[k] = e
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_hosts_share_and_refuse_different_case_lists():
    """The deterministic share, and the start-up check: a process that sees
    other cases or settings is refused on every process, before any work."""
    h = Hosts(1, 3, "h1")
    assert h.share(list("abcdefg")) == ["b", "e"] and Hosts(5, 8).share("abc") == []
    hosts = _hosts(3)
    assert _each(hosts, lambda h: h.agree("fold 0", ["a", "b"], {"t": 1})) == [None] * 3
    cases = {0: ["a", "b"], 1: ["a", "b"], 2: ["a"]}
    for e in _each(hosts, lambda h: h.agree("fold 0", cases[h.index], {"t": 1})):
        assert isinstance(e, InputError) and "processes [2] differ" in str(e) \
            and "process 2: 1" in str(e) and "Nothing was run" in str(e)
    settings = {0: 1, 1: 1, 2: 2}
    for e in _each(hosts, lambda h: h.agree("fold 0", ["a", "b"], {"t": settings[h.index]})):
        assert isinstance(e, InputError) and "processes [2] differ" in str(e)


def test_a_killed_process_is_named_within_the_timeout():
    """Process 2 stops beating (as after SIGKILL) after the start: the others'
    end of run returns within about the timeout, each with one line naming
    process 2 and its host; a failure of process 1 reaches the others too."""
    hosts = _hosts(3)
    _each(hosts, lambda h: h.agree("fold 0", ["a"], {}))
    hosts[2].link.close()
    t0 = time.monotonic()
    outcomes = _each(hosts[:2], lambda h: h.outcome(None))
    waited = time.monotonic() - t0
    assert TIMEOUT <= waited < TIMEOUT + 1.0, waited
    for k, o in enumerate(outcomes):
        assert o.failed == [] and len(o.lost) == 1 and "process 2 on host h2 was lost: no " \
            f"sign of life for {TIMEOUT:g} s (killed, crashed" in o.lost[0], o
        with pytest.raises(HostLostError, match=rf"process 2 on host h2 was lost.*; process {k} "
                                                 rf"on host h{k} stopped; kept 3 cases"):
            o.raise_for_others(hosts[k].name(), "kept 3 cases")
        assert hosts[k].stopped()  # a cohort in progress would load no new case
    # A failure on process 1 stops process 0 (no new case), which names it.
    failure = (RuntimeError("disk gone"),)
    res = _each(hosts[:2], lambda h: h.outcome(
        ("case 'c'", "load", failure[0]) if h.index == 1 else None))
    assert res[1].error == "case 'c' failed on process 1 on host h1 (load): disk gone"
    assert res[0].failed == [res[1].error] and res[0].error is None
    # A process that ends (its output says why) is not waited for at all.
    hosts[1].link.leave()
    t0 = time.monotonic()
    o = hosts[0].outcome(None)
    assert time.monotonic() - t0 < TIMEOUT and "process 1 on host h1 ended before" in o.lost[0]
    for h in hosts:
        h.link.close()


def test_a_cohort_stops_loading_when_a_process_is_lost():
    """run_cases with another process lost mid-run: no new case is loaded
    within about the timeout, the loaded ones finish."""
    hosts = _hosts(2)
    finished = []

    class Seg:
        device = None
    killer = threading.Timer(0.3, hosts[1].link.close)
    killer.start()
    run = cohort.run_cases([str(k) for k in range(200)], [Seg()], load=lambda k: k,
                           infer=lambda s, x: time.sleep(0.02) or x,
                           finish=lambda k, x, r, d: finished.append(k), stop=hosts[0].stopped)
    assert run.failed is None and 10 < len(run.finished) < 150, len(run.finished)
    assert run.wall_s < 0.3 + TIMEOUT + 1.0
    for h in hosts:
        h.link.close()


def test_cohort_holds_at_most_devices_plus_prefetch_loaded_cases():
    """However many cases and however slow the finishing, a loaded case is
    let go after its finish and at most devices + prefetch exist at once."""
    class Seg:
        device = None

    class Volume:  # a decoded case: weakly counted while alive
        pass
    alive, most, lock = weakref.WeakSet(), [0], threading.Lock()

    def load(key):
        v = Volume()
        with lock:
            alive.add(v)
            most[0] = max(most[0], len(alive))
        return v

    for n_dev, prefetch in ((1, 0), (3, 0), (2, 1)):
        most[0] = 0
        run = cohort.run_cases([str(k) for k in range(40)], [Seg() for _ in range(n_dev)],
                               load=load, infer=lambda s, v: time.sleep(0.002),
                               finish=lambda k, v, r, d: time.sleep(0.004), prefetch=prefetch)
        assert len(run.finished) == 40 and run.failed is None
        bound = n_dev + (prefetch or n_dev)
        assert most[0] <= bound, (n_dev, prefetch, most[0])
        assert most[0] == bound  # the devices are kept fed up to the bound


def test_the_lowest_idle_device_takes_the_next_case():
    """One case on 4 idle devices runs on the first (whose persistent
    compilation cache a second call hits); two cases on the first two."""
    class Seg:
        device = None
    for n_cases in (1, 1, 1, 2):
        run = cohort.run_cases([str(k) for k in range(n_cases)], [Seg() for _ in range(4)],
                               load=lambda k: k, infer=lambda s, x: time.sleep(0.05),
                               finish=lambda k, x, r, d: None)
        assert [d.cases for d in run.devices] == [1] * n_cases + [0] * (4 - n_cases)
