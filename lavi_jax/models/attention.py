"""The one attention function: causal + key-padding + segment masks, GQA, and the ``config.model.attention`` knob.

``config.model.attention`` names an implementation; :func:`resolve_attention`
turns it into a concrete one for a backend, and :func:`implementation_for`
applies the per-call shape rules (falling back to ``xla`` where the chosen
kernel cannot serve the call):

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` with a dense
  boolean mask [B, 1, T, S] (softmax in float32); the reference numerics.
- ``splash``: the Pallas TPU splash-attention kernel with a causal mask and
  segment ids. Segment ids carry padding (a real token is segment 1, a padded
  one segment 0, so a padded query sees only padded keys and a real query only
  real ones); they are also the seam sequence packing plugs into. Served only
  when queries are the keys themselves (``aligned``: no KV cache, T == S, query
  t at key index t) and T is a multiple of 128, the kernel's lane width; any
  other call (a cached prefill or decode step, T % 128 != 0) uses ``xla``.
  A packed row passes its own segment ids (1, 2, ... per conversation, 0 on
  padding) instead, so attention is blind across conversations.
  Off TPU the kernel runs in Pallas interpret mode (``interpret=True`` exactly
  when ``jax.default_backend() != "tpu"``), slow but exact.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with the
  same dense mask, where cuDNN's constraints hold (GPU backend, bf16 / fp16
  inputs, head_dim a multiple of 8 and at most 128); ``xla`` otherwise.
- ``auto``: ``splash`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere.

Outputs at padded query positions are unspecified (they differ between
implementations); outputs at real queries agree to float32 rounding.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from lavi_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
SPLASH_LANES = 128  # splash needs T and S to be multiples of this (its block sizes are)
_SPLASH_BLOCKS = (512, 256, 128)  # largest first: the block used is the largest that divides T


@struct.dataclass
class AttentionMask:
    """Which keys each query may see: ``key <= query_index`` (causal), ``key_valid`` and, for packed rows,
    ``query_segment == key_segment``.

    query_index: int32 [B, T] each query's index in the key sequence.
    key_valid: bool [B, S] real (True) vs padded / not yet written (False) keys.
    query_segment, key_segment: int32 [B, T] / [B, S] segment ids of a packed row (1, 2, ... per
        packed sequence, 0 on padding), or None for an unpacked call (one sequence per row).
    aligned: static; True when query t is key t (no cache, T == S), the case splash serves.
    full: the dense mask of :meth:`dense`, built once per model call by :meth:`with_dense` so that the
        layers share it (left unused, and dropped by the compiler, where splash serves the call).
    """

    query_index: jax.Array
    key_valid: jax.Array
    query_segment: Optional[jax.Array] = None
    key_segment: Optional[jax.Array] = None
    aligned: bool = struct.field(pytree_node=False, default=False)
    full: Optional[jax.Array] = None

    def with_dense(self) -> "AttentionMask":
        return self.replace(full=self.dense())

    def dense(self) -> jax.Array:
        """The boolean mask [B, 1, T, S] the xla and cudnn paths take."""
        if self.full is not None:
            return self.full
        keys = jnp.arange(self.key_valid.shape[1], dtype=jnp.int32)
        mask = (keys[None, None, :] <= self.query_index[:, :, None]) & self.key_valid.astype(jnp.bool_)[:, None, :]
        if self.key_segment is not None:
            mask &= self.query_segment[:, :, None] == self.key_segment[:, None, :]
        return mask[:, None]


def resolve_attention(name: str, backend: str) -> str:
    """``config.model.attention`` -> ``"xla" | "splash" | "cudnn"`` for ``backend`` (``"cpu" | "gpu" | "tpu"``)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r}: expected one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    return {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")


def splash_block(length: int) -> Optional[int]:
    """The splash block size for a sequence of ``length`` (None when splash cannot tile it)."""
    return next((b for b in _SPLASH_BLOCKS if length % b == 0), None)


def implementation_for(name: str, backend: str, q_shape, k_shape, dtype, aligned: bool) -> str:
    """The implementation that serves one call, after the fallback rules in the module docstring."""
    impl = resolve_attention(name, backend)
    T, S, D = q_shape[1], k_shape[1], q_shape[-1]
    if impl == "splash" and not (aligned and T == S and splash_block(T) is not None):
        return "xla"
    if impl == "cudnn":
        ok = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and D % 8 == 0 and D <= 128
        return "cudnn" if ok else "xla"
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float,
              implementation: str = "auto") -> jax.Array:
    """Causal, key-padded (and, for packed rows, segment-blind) multi-head attention.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (GQA); ``mask``
    an :class:`AttentionMask`. Returns [B, T, H, D] in q's dtype.
    ``implementation``: ``config.model.attention``, resolved against
    ``jax.default_backend()`` at trace time.
    """
    impl = implementation_for(implementation, jax.default_backend(), q.shape, k.shape, q.dtype, mask.aligned)
    if impl == "splash":
        out = _splash(q, k, v, mask, scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale, implementation=impl)
    return sharding.constrain(out, ("batch", "length", "heads", "head_dim"))


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """A splash kernel for [H, T, D] queries against [K, T, D] keys, causal, with segment ids."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: loaded only when splash is chosen

    b = splash_block(length)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(num_heads)])
    with jax.ensure_compile_time_eval():  # the mask tables are constants, not values of the calling trace
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # as above

    B, T, H, D = q.shape
    kernel = _splash_kernel(H, T, jax.default_backend() != "tpu")
    seg = mask.key_valid.astype(jnp.int32)  # [B, T]: 1 real, 0 padding (aligned: queries are the keys)
    if mask.key_segment is not None:  # packed: one id per sequence, padding stays 0
        seg = jnp.where(mask.key_valid, mask.key_segment.astype(jnp.int32), 0)
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, D]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
