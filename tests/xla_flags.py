"""The XLA flags of every test process (conftest, and the subprocesses the
tests start): the suite is dominated by compiling small programs on a
2-core CPU, so compile time is what these buy down; the tests compare
results within a run or against tolerances, never against another flag set.

* `--xla_backend_optimization_level=0`, `--xla_llvm_disable_expensive_passes`:
  LLVM's cheaper optimisation (about a third off a compile).
* `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older elemental emitter
  for fusions; the smoke config's S step compiled in 3.8 s instead of 6.5 s
  (2026-12-07, AMD EPYC, jax 0.10.2).
"""

COMPILE_CHEAPLY = ("--xla_backend_optimization_level=0 "
                   "--xla_llvm_disable_expensive_passes=true "
                   "--xla_cpu_use_fusion_emitters=false")


def with_devices(n: int) -> str:
    """XLA_FLAGS for a CPU process with n fake devices."""
    return f"--xla_force_host_platform_device_count={n} {COMPILE_CHEAPLY}"
