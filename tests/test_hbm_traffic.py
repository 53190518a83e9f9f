"""HBM traffic of a compiled TPU loop (lavi_jax.train.hlo_traffic), on programs whose traffic is known from their
arrays' sizes: the TPU compiler (libtpu) compiles for an abstract v5e chip on this CPU host."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lavi_jax.train import hlo_traffic, topology

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")


def _compile_for_v5e(fn, *shapes):
    mesh = jax.sharding.Mesh(np.array(topology.devices("v5e:2x2")[:1]), ("x",))
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
    return jax.jit(fn, donate_argnums=(1,)).lower(*args).compile()


def test_a_loop_reads_its_weight_once_and_writes_one_row_of_its_buffer():
    """A loop body multiplies by a 512 MiB weight (more than the chip's on-chip memory, so it streams from HBM) and
    writes one 8 KiB row into a carried 1 GiB buffer: its HBM traffic is the weight once plus about a row, while
    the compiler's bytes accessed also counts the on-chip copies."""
    D, N = 4096, 131072  # weight [D, 16 D] bf16 = 512 MiB; buffer [N, D] bf16 = 1 GiB

    def fn(w, buf):
        def body(i, carry):
            x, buf = carry
            y = jnp.tanh(x @ w)[:, :D]
            return y, jax.lax.dynamic_update_slice(buf, y, (i, 0))
        return jax.lax.fori_loop(0, 16, body, (jnp.ones((1, D), jnp.bfloat16), buf))[1]

    compiled = _compile_for_v5e(fn, ((D, 16 * D), jnp.bfloat16), ((N, D), jnp.bfloat16))
    t = hlo_traffic.loop_hbm_traffic(compiled.as_text())
    weight, row, buffer = D * 16 * D * 2, D * 2, N * D * 2
    assert weight <= t["read"] < weight * 1.01, t
    assert row <= t["written"] < 1024 * row, t  # the row (and small values), not the buffer
    assert t["bytes"] < weight + buffer / 64  # the buffer is not rewritten per iteration
    carried = {tuple(c["dims"]): c for c in hlo_traffic.carried_reads(compiled.as_text())}
    assert carried[(D, 16 * D)]["read"] == carried[(D, 16 * D)]["bytes"] == weight  # read once, whole
    assert carried[(N, D)]["read"] < buffer / 64  # written a row at a time, never read whole
    cost = compiled.cost_analysis()
    accessed = (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]
    assert accessed >= t["bytes"]  # the compiler's count also has the on-chip reads


def test_a_table_read_through_a_transpose_counts_once():
    """An LM head tied to its embedding table: each step gathers one row per sequence and multiplies by the whole
    table transposed. The compiler hands the table to the matmul through a nested bitcast fusion; the whole 256 MiB
    table is read once per iteration, the gather's rows besides."""
    D, V = 2048, 65536

    def fn(table, buf):
        def body(i, carry):
            tok, buf = carry
            logits = (table[tok] @ table.T).astype(jnp.float32)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return nxt, jax.lax.dynamic_update_slice(buf, nxt[None], (i, 0))
        return jax.lax.fori_loop(0, 16, body, (jnp.zeros((4,), jnp.int32), buf))[1]

    compiled = _compile_for_v5e(fn, ((V, D), jnp.bfloat16), ((64, 4), jnp.int32))
    t = hlo_traffic.loop_hbm_traffic(compiled.as_text())
    table = V * D * 2
    assert table <= t["read"] < table * 1.01, t


def test_shapes_and_memory_spaces_are_read_from_layouts():
    arrays = hlo_traffic.parse_shape("(bf16[64,256]{1,0:T(8,128)(2,1)S(1)}, f32[2,3]{1,0:T(2,128)}, u32[]{:S(2)})")
    assert [(a.dtype, a.dims, a.space, a.nbytes) for a in arrays] == [
        ("bf16", (64, 256), 1, 64 * 256 * 2), ("f32", (2, 3), 0, 24), ("u32", (), 2, 4)]
    assert hlo_traffic.hbm_bytes(arrays) == 24
