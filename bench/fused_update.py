"""fc6's kernel gradient and its SGD update: two passes against one chunked, fused pass.

  python -m bench.fused_update --chunks=49,98,196

The optimiser's update of the two fc6 kernels (7 x 7 x 512 x 4096, 411 MB
each) looks memory-bound in the step's profile, and XLA:CPU has no
multi-output fusion, so the kernel gradient (a (25088, 81) x (81, 4096)
product at 1 x 256 x 256) is written out, then read twice by two update
fusions (velocity, then weight). The alternative measured here computes the
gradient a block of kernel rows at a time inside a loop and updates that
block of velocity and weight in place while it is in cache (Caffe's rule,
`stnjax/train/optim.py`: v <- mu v + lr (g + d w); w <- w - v). Written
naively (both updates read the old blocks of both buffers) XLA inserts
full copies of both buffers every iteration (100 ms each); written as
"update v, then read the new v block for w" it runs in place. Prints the
median of each form and the largest difference of the weights from the
two-pass form (0: the same arithmetic).
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app, flags

from launch import hugepages

_CHUNKS = flags.DEFINE_list("chunks", ["49", "98", "196"], "Row blocks of the fused form.")
_CALLS = flags.DEFINE_integer("calls", 6, "Timed calls of each form.")

ROWS, COLS, POSITIONS = 7 * 7 * 512, 4096, 81   # fc6 at 1 x 256 x 256: a 9 x 9 output
MU, LR, DECAY = 0.99, 1e-5, 5e-4


def _forms(chunk_counts):
    import jax
    from jax import lax

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def two_pass(v, w, cols, g):
        grad = cols.T @ g
        v = MU * v + LR * (grad + DECAY * w)
        return v, w - v

    def fused(n):
        rows = ROWS // n

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def f(v, w, cols, g):
            def body(i, vw):
                v, w = vw
                s = i * rows
                grad = lax.dynamic_slice_in_dim(cols, s, rows, axis=1).T @ g
                wb = lax.dynamic_slice_in_dim(w, s, rows, 0)
                vb = MU * lax.dynamic_slice_in_dim(v, s, rows, 0) + LR * (grad + DECAY * wb)
                v = lax.dynamic_update_slice_in_dim(v, vb, s, 0)
                # Read the new block back: reading the old v here makes XLA copy
                # both whole buffers every iteration to keep the old values alive.
                vb = lax.dynamic_slice_in_dim(v, s, rows, 0)
                return v, lax.dynamic_update_slice_in_dim(w, wb - vb, s, 0)
            return lax.fori_loop(0, n, body, (v, w))
        return f

    return {"two-pass": two_pass, **{f"fused/{n}": fused(n) for n in chunk_counts}}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    if any(ROWS % int(n) for n in _CHUNKS.value):
        raise SystemExit(f"--chunks: each must divide {ROWS}, got {_CHUNKS.value}")
    forms = _forms([int(n) for n in _CHUNKS.value])
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    cols = jax.random.normal(k[0], (POSITIONS, ROWS))
    g = jax.random.normal(k[1], (POSITIONS, COLS)) * 1e-3
    v0 = np.asarray(jax.random.normal(k[2], (ROWS, COLS))) * 1e-3
    w0 = np.asarray(jax.random.normal(k[3], (ROWS, COLS))) * 1e-2
    held = {name: (jnp.asarray(v0), jnp.asarray(w0)) for name in forms}
    times = {name: [] for name in forms}
    for i in range(_CALLS.value + 1):
        for name, f in forms.items():
            t = time.perf_counter()
            held[name] = jax.block_until_ready(f(*held[name], cols, g))
            if i:  # the first call compiles
                times[name].append(time.perf_counter() - t)
    base = held["two-pass"][1]
    for name in forms:
        diff = float(jnp.max(jnp.abs(held[name][1] - base)))
        print(f"{name:>10}: median {1e3 * statistics.median(times[name]):7.1f} ms, "
              f"max |w - w(two-pass)| {diff:.1e}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
