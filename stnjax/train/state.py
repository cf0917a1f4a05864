"""The train state: a plain dict pytree, built in a jitted init.

    state = {
      'params':    {'coarse', 'saliency', 'fine'} float32 trees,
      'opt_state': {'count': int32 (), 'velocity': float32 tree like params},
      'step':      int32 (), the position in the stage schedule (0 = first step),
      'rng':       uint32 (2,), the raw key of this S attempt; step s of the
                   schedule uses fold_in(rng, s), and the model folds in each
                   sample's global batch index from there,
      'attempt':   int32 (), the convergence-guard attempt (0 = first try),
    }

Keys: root = PRNGKey(seed); the parameter initialisation uses
fold_in(root, 0) and is the same for every attempt (a guard restart goes
back to the same initial state, as the reference restarts S from its
scratch model); attempt a trains with rng = fold_in(fold_in(root, 1), a),
so a restarted S sees new dropout masks and crop margins (and the loop gives
its sampler a new seed, hence a new data order), all deterministic.

Under pmap the state is replicated: every leaf gets a leading axis of the
local device count (`replicate`), and `unreplicate` takes device 0's copy
back to host NumPy.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stnjax.train.steps import AXIS

_INIT_TAG, _TRAIN_TAG = 0, 1


def root_key(seed: int) -> jax.Array:
    """The raw uint32 (2,) root key of a run."""
    return jax.random.PRNGKey(int(seed))


def init_key(seed: int) -> jax.Array:
    """The key of the parameter initialisation (same for every attempt)."""
    return jax.random.fold_in(root_key(seed), _INIT_TAG)


def attempt_key(seed: int, attempt: int) -> jax.Array:
    """The training key of S attempt `attempt` (uint32 (2,))."""
    return jax.random.fold_in(jax.random.fold_in(root_key(seed), _TRAIN_TAG), int(attempt))


def sampler_seed(seed: int, attempt: int) -> int:
    """The data sampler's seed for an attempt (attempt 0: the config seed)."""
    return int(seed) if attempt == 0 else int(seed) + 1_000_003 * int(attempt)


def init_train_state(params: Any, tx: Any, seed: int, attempt: int = 0) -> dict:
    """Builds the train state around `params` in one jitted call.

    Args:
      params: the initial parameter tree (float32).
      tx: the optax transformation (any `trainable`: the state structure is
        the same).
      seed: the config seed; attempt: the guard attempt.

    Returns:
      The state dict (see the module docstring) on the default device.
    """
    def build(params, rng, attempt):
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros([], jnp.int32),
            "rng": rng,
            "attempt": attempt,
        }

    return jax.jit(build)(params, attempt_key(seed, attempt),
                          jnp.asarray(attempt, jnp.int32))


def abstract_train_state(params_shapes: Any, tx: Any) -> Any:
    """Shapes and dtypes (ShapeDtypeStructs) of the state for `params_shapes`."""
    def build(params):
        return init_train_state(params, tx, 0, 0)
    return jax.eval_shape(build, params_shapes)


def replicate(tree: Any, devices: Sequence[Any]) -> Any:
    """Copies every leaf to each local device: leading axis len(devices), for pmap.

    With several processes the stacked host arrays are returned as NumPy and
    pmap places them (its inputs are per-process there).

    The arrays carry the sharding a pmapped step gives its outputs (a 1-D
    mesh over `devices` named after the step's axis): pmap caches its
    compilation by input sharding too, so a state placed any other way makes
    the second step, fed the first step's output, compile the program again.
    """
    n = len(devices)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: np.ascontiguousarray(np.broadcast_to(x[None], (n,) + x.shape)),
                            host)
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x[None], (n,) + x.shape), sharding), host)


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a replicated tree, as host NumPy arrays."""
    def one(x):
        if hasattr(x, "addressable_shards") and len(x.addressable_shards) > 1:
            return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
        return np.asarray(jax.device_get(x))[0]

    return jax.tree.map(one, tree)


@jax.jit
def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.floating)]))


def tree_all_finite(tree: Any) -> bool:
    """True when every floating leaf of `tree` is finite (no NaN or inf)."""
    return bool(_all_finite(tree))


def num_params(params: Any) -> int:
    """Number of parameter values in a tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
