"""Where a training state and its batches live: several devices under pmap, or one under jit.

The training loop, the benchmarks and the tests talk to a `Placement`, never
to `jax.pmap` or the leading device axis directly:

| placement  | when                                | step                    | arrays            |
| ---------- | ----------------------------------- | ----------------------- | ----------------- |
| `Pmapped`  | several local devices, or several   | `steps.pmapped_step`    | leading device    |
|            | hosts (pmap over all their devices) | (psum of the gradients) | axis (replicated) |
| `OneDevice`| one device on one host              | `steps.jitted_step`     | as on the host    |

Why one device is not a one-device pmap (measured on 2 CPU cores, full-width
J step, bench/RESULTS.md): pmap runs its body on arrays with a leading axis
of 1, and at the outputs XLA:CPU then fuses the momentum update into both the
velocity and the parameter outputs, reading every 1 GB tree twice and copying
the donated velocity first: 0.35 s of device time a step at 64 x 64 (3.24
against 2.85 s wall), 0.8 s at 256 x 256 in one process before the 1-way
all-reduce was dropped (within the machine's noise after it). Under jit the
same step makes one velocity fusion that the parameter update reads. The
update is the same arithmetic (tests/test_train_compile.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from stnjax.checks import InputError
from stnjax.train.state import replicate, unreplicate
from stnjax.train.steps import (OptimizerSpec, first_replica, jitted_step, pmapped_step,
                                shard_batch)


def _on_host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@dataclasses.dataclass(frozen=True)
class Pmapped:
    """pmap over `pmap_devices` (all devices of all hosts); this host feeds
    and reads its `devices` (a leading axis of len(devices))."""

    devices: tuple
    pmap_devices: tuple

    def step(self, rstn: Any, mode: str, spec: OptimizerSpec, lam: float,
             bce_weight: float = 0.0, unroll_rounds: int = 1) -> Callable:
        return pmapped_step(rstn, mode, spec, lam, self.pmap_devices, bce_weight,
                            unroll_rounds)

    def put_state(self, host_state: Any) -> Any:
        return replicate(host_state, self.devices)

    def put_batch(self, host_batch: Mapping[str, Any], *, global_offset: int = 0) -> dict:
        return shard_batch(host_batch, len(self.devices), global_offset=global_offset)

    def host_state(self, state: Any) -> Any:
        return unreplicate(state)

    def host_metrics(self, metrics: Mapping[str, Any]) -> dict:
        return first_replica(metrics)


@dataclasses.dataclass(frozen=True)
class OneDevice:
    """The whole batch on one device; the step is jitted, arrays have no device axis."""

    device: Any

    def step(self, rstn: Any, mode: str, spec: OptimizerSpec, lam: float,
             bce_weight: float = 0.0, unroll_rounds: int = 1) -> Callable:
        return jitted_step(rstn, mode, spec, lam, self.device, bce_weight, unroll_rounds)

    def put_state(self, host_state: Any) -> Any:
        return jax.device_put(_on_host(host_state), self.device)

    def put_batch(self, host_batch: Mapping[str, Any], *, global_offset: int = 0) -> dict:
        """The batch's per-sample arrays as NumPy, plus 'index' int32 (b,)."""
        one = shard_batch(host_batch, 1, global_offset=global_offset)
        return {k: v[0] for k, v in one.items()}

    def host_state(self, state: Any) -> Any:
        return _on_host(state)

    def host_metrics(self, metrics: Mapping[str, Any]) -> dict:
        return {k: (np.asarray(s), np.asarray(c)) for k, (s, c) in metrics.items()}


Placement = Pmapped | OneDevice


def placement_for(devices: Sequence[Any], *, process_count: int | None = None,
                  force_pmap: bool = False) -> Placement:
    """`OneDevice` for one local device on one host (unless `force_pmap`),
    else `Pmapped` (with several hosts, pmap spans every global device)."""
    devices = tuple(devices)
    if not devices:
        raise InputError("devices: expected at least one device")
    nproc = jax.process_count() if process_count is None else int(process_count)
    if nproc == 1 and len(devices) == 1 and not force_pmap:
        return OneDevice(devices[0])
    return Pmapped(devices, tuple(jax.devices()) if nproc > 1 else devices)


__all__ = ["Pmapped", "OneDevice", "Placement", "placement_for"]
