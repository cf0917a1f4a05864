"""bench/profiling.py (bench/profile_step.py's engine): the trace-to-HLO join attributes time to the right instructions.

The program is small and known: a forward matmul, a loop of row products
(as the CPU kernel gradients run) and an elementwise update, each under its
own name scope. Every traced thunk must be found in the optimized HLO, the
loop body's instructions must take the loop's scope, and the per-kind sums
must add up to the total.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from bench import profiling as ps


def _program(x, w):
    with jax.named_scope("fc6"):
        y = jnp.tanh(x @ w)
    with jax.named_scope("conv1_2"):
        def row(r, acc):
            xr = lax.dynamic_index_in_dim(x, r, axis=0, keepdims=True)
            return acc + xr.T @ lax.dynamic_index_in_dim(y, r, axis=0, keepdims=True)
        dw = lax.fori_loop(0, x.shape[0], row, jnp.zeros_like(w))
    return w - 0.1 * dw


def test_profile_attributes_loop_bodies_and_sums_up():
    x = jnp.ones((64, 96), jnp.float32)
    w = jnp.full((96, 80), 0.01, jnp.float32)
    compiled = jax.jit(_program).lower(x, w).compile()
    t = ps.profile(lambda: jax.block_until_ready(compiled(x, w)), compiled.as_text(),
                   calls=2, top=5)
    assert t["total_ms"] > 0
    assert sum(t["by_kind_ms"].values()) == pytest.approx(t["total_ms"], rel=1e-6)
    assert sum(t["by_source_ms"].values()) == pytest.approx(t["total_ms"], rel=1e-6)
    assert sum(r["ms"] for r in t["instructions"]) == pytest.approx(t["total_ms"], rel=1e-6)
    assert len(t["top"]) <= 5
    in_loop = [r for r in t["instructions"] if "while" in r["op_name"]]
    assert in_loop, t["instructions"]
    assert all("conv1_2" in r["op_name"] for r in in_loop)
    assert any(r["source"].endswith("conv1_2") for r in in_loop)
    assert any("fc6" in r["op_name"] for r in t["instructions"])


def test_hlo_index_reads_tuple_typed_whiles_and_fusion_kinds():
    text = "\n".join([
        "%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {",
        "  %add.1 = f32[4]{0} add(%a, %b)",
        "}",
        "ENTRY %main (x: f32[4]) -> f32[4] {",
        '  %while.3 = (s32[], f32[4]{0}) while(%tuple.1), condition=%cond, body=%body, '
        'metadata={op_name="jit(f)/conv1_2/while"}',
        '  %multiply_add_fusion.2 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fc, '
        'metadata={op_name="jit(f)/add"}',
        '  %ynn_fusion.7 = f32[4]{0} fusion(%multiply_add_fusion.2), kind=kCustom, calls=%y',
        "}",
    ])
    idx = ps.hlo_index(text)
    assert idx["while.3"]["kind"] == "while"
    assert idx["add.1"]["op_name"] == "jit(f)/conv1_2/while"      # from its loop
    assert idx["multiply_add_fusion.2"]["kind"] == "loop_fusion"
    assert idx["ynn_fusion.7"]["kind"] == "ynn_fusion"
    assert idx["ynn_fusion.7"]["op_name"] == "jit(f)/add"          # from its operand
