"""Test set-up: 8 fake CPU devices for the data-parallel tests, and a
cheaper LLVM optimisation level (the suite is dominated by compilation of
small programs; this cuts compile time by about a third).

XLA reads the flags once, when the backend starts, so they must be set
before anything imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
