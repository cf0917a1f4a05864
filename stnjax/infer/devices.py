"""One compiled program, loaded on every local device.

A jitted program is compiled for the device its arguments live on. Cohort
inference runs the same program on every local device (one case per
device); compiling it again per device would multiply the compile time
(seconds on a CPU, tens of seconds at full width) by the device count.
`load_on_device` instead loads the executable compiled for one device onto
another: the serialized binary with the other device's assignment, which is
what JAX's persistent cache does on GPU (its key ignores the device
assignment there). The same binary runs on both devices, so the results are
the same bits.

This uses `jax.experimental.serialize_executable` and the unpickler behind
it, which are not a stable API: when loading fails, the caller compiles for
the device instead (`Segmenter` does, and logs it once).
The Segmenter does not use it while the persistent compilation cache is
on: an XLA:CPU executable read back from that cache loses kernels when
serialized again ("Function ... not found" when run), so each device then
reads the program from the cache itself.
"""

from __future__ import annotations

import io
from typing import Any

import jax


def load_on_device(compiled: Any, device: Any) -> Any:
    """`compiled` (a `jax.stages.Compiled` for a single device) loaded onto
    `device`: a Compiled that takes arguments on `device` and returns its
    results there. Raises on any failure (an unsupported JAX version)."""
    from jax._src import compiler
    from jax.experimental import serialize_executable as se

    payload, in_tree, out_tree = se.serialize(compiled)
    options = compiler.get_compile_options(1, 1, device_assignment=[device],
                                           backend=device.client)

    class _Unpickler(se._JaxPjrtUnpickler):  # noqa: SLF001 - see the module docstring
        def persistent_load(self, pid):
            if pid[0] == "device":
                return device
            if pid[0] == "exec":
                return self.backend.deserialize_executable(
                    pid[1], executable_devices=self.execution_devices, compile_options=options)
            return super().persistent_load(pid)

    unloaded, args_info, no_kwargs = _Unpickler(io.BytesIO(payload), device.client,
                                                [device]).load()
    return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info), out_tree,
                               no_kwargs=no_kwargs)


def device_name(device: Any) -> str:
    """A device as records name it: "<platform>:<global id>" ("cpu:3", "gpu:0")."""
    return f"{device.platform}:{device.id}"


__all__ = ["load_on_device", "device_name"]
