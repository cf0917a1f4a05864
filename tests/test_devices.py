"""stnjax/infer/devices.py: one compiled program loaded onto another device,
and the Segmenter's rule for when it does so (not with the persistent
compilation cache on: an executable read back from it loses XLA:CPU kernels
when serialized again)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.infer import devices


def _program(x):
    y = x[1:-1, 2:] * 2.0
    return jnp.concatenate([y, y[::-1]], 0).sum(1)


def test_loaded_program_runs_on_the_other_device_with_the_same_bits():
    if len(jax.local_devices()) < 2:
        pytest.skip("needs two local devices")
    assert not jax.config.jax_compilation_cache_dir  # freshly compiled below
    d0, d1 = jax.local_devices()[:2]
    x = np.random.default_rng(0).random((32, 40), np.float32)
    compiled = jax.jit(_program).lower(jax.device_put(x, d0)).compile()
    other = devices.load_on_device(compiled, d1)
    out = other(jax.device_put(x, d1))
    assert out.devices() == {d1}
    np.testing.assert_array_equal(np.asarray(out), np.asarray(compiled(jax.device_put(x, d0))))
    assert devices.device_name(d1) == f"{d1.platform}:{d1.id}"
