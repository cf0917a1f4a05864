"""Helpers of the multi-process tests (tests/test_multihost.py, and the
multi-host evaluation of tests/test_experiment.py): a free port, the
environment of a child process with N fake CPU devices, waiting for a group
of processes with a deadline, and whether this jaxlib can all-reduce across
CPU processes."""

import os
import socket
import time

from xla_flags import with_devices


def _free_port() -> int:
    # Bound and released at once: another program could take it before the
    # coordinator binds it, a race too rare on a test machine to retry.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # Drop the parent's XLA/JAX settings (conftest's 8 devices) and any
    # cluster variables that jax.distributed would auto-detect.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_", "PMI_"))}
    env["XLA_FLAGS"] = with_devices(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"  # jax's default; stated for clarity
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_all(procs: dict, deadline: float, grace: float = 30.0) -> dict:
    """Exit codes by name, plus "timeout": True when some had to be killed.

    Polls until all exit. When one fails its peers get `grace` seconds (a
    process whose peer died can wait long on the coordinator); at the
    deadline, or after the grace, every process still running is killed.
    """
    stop_at = deadline
    while time.monotonic() < stop_at:
        codes = {n: p.poll() for n, p in procs.items()}
        if all(c is not None for c in codes.values()):
            return codes
        if any(c for c in codes.values()):
            stop_at = min(stop_at, time.monotonic() + grace)
        time.sleep(0.2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    return dict({n: p.wait() for n, p in procs.items()}, timeout=True)


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:  # another layout: let the run say whether it works
        return True
    return hasattr(_jax, "make_gloo_tcp_collectives")
