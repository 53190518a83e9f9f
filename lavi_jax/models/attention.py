"""The one attention function: causal + key-padding + segment masks, GQA, and the ``config.model.attention`` knob.

Used by the decoder (causal self-attention over text, with padding and packed
segments), the vision tower (bidirectional, no mask: :meth:`AttentionMask.bidirectional`)
and the attention conditioner (text queries against visual keys with an
arbitrary per-query key mask, :meth:`AttentionMask.explicit`).

``config.model.attention`` names an implementation; :func:`resolve_attention`
turns it into a concrete one for a backend, and :func:`implementation_for`
applies the per-call shape rules (falling back to ``xla`` where the chosen
kernel cannot serve the call):

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` with a dense
  boolean mask [B, 1, T, S] (softmax in float32); the reference numerics.
- ``splash``: the Pallas TPU splash-attention kernel with a causal (decoder)
  or full (vision tower) mask and segment ids. Segment ids carry padding (a
  real token is segment 1, a padded one segment 0, so a padded query sees only
  padded keys and a real query only real ones); they are also the seam sequence
  packing plugs into: a packed row passes its own segment ids (1, 2, ... per
  conversation, 0 on padding), so attention is blind across conversations.
  Served only when queries are the keys themselves (``aligned``: no KV cache,
  T == S, query t at key index t); a sequence that is not a multiple of 128
  (the kernel's lane width, e.g. 729 ViT patches) is padded up with segment-0
  tokens. Any other call (a cached prefill or decode step, the conditioner's
  cross-attention, whose mask depends on each query's position rather than on
  segments) uses ``xla``. Under a mesh the kernel runs per shard
  (``shard_map`` over the batch and head axes of :mod:`lavi_jax.sharding`), as
  a Pallas kernel cannot be partitioned by the compiler. It runs in Pallas
  interpret mode (slow but exact) unless the program is compiled for TPU
  (:func:`lavi_jax.sharding.target_platform`: the mesh's devices, so a
  TPU-topology compile from a CPU host gets the real kernel).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` with the
  same dense mask, where cuDNN's constraints hold (GPU backend, bf16 / fp16
  inputs, head_dim a multiple of 8 and at most 128, and, for a masked call, even
  query and key lengths: JAX turns a dense mask into a bias, and cuDNN's fused
  attention refuses to train with a bias at an odd length, e.g. the
  conditioner's 729 visual keys); ``xla`` otherwise. The decoder (causal,
  padding, packed segments, GQA) at an even length and the vision tower
  (bidirectional, no mask, so any length) get the kernel.
- ``auto``: ``splash`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere (the
  platform the program is compiled for).

Outputs at padded query positions are unspecified (they differ between
implementations); outputs at real queries agree to float32 rounding.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from lavi_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
SPLASH_LANES = 128  # splash needs T and S to be multiples of this (its block sizes are)
_SPLASH_BLOCKS = (512, 256, 128)  # largest first: the block used is the largest that divides T


@struct.dataclass
class AttentionMask:
    """Which keys each query may see: ``key <= query_index`` (``causal``), ``key_valid`` and, for packed rows,
    ``query_segment == key_segment``; or an explicit dense mask.

    query_index: int32 [B, T] each query's index in the key sequence (unused when not ``causal``).
    key_valid: bool [B, S] real (True) vs padded / not yet written (False) keys; None: all real.
    query_segment, key_segment: int32 [B, T] / [B, S] segment ids of a packed row (1, 2, ... per
        packed sequence, 0 on padding), or None for an unpacked call (one sequence per row).
    aligned: static; True when query t is key t (no cache, T == S), the case splash serves.
    full: the dense mask of :meth:`dense`, built once per model call by :meth:`with_dense` so that the
        layers share it (left unused, and dropped by the compiler, where splash serves the call), or
        given outright (:meth:`explicit`).
    causal: static; False for bidirectional attention (the vision tower).
    """

    query_index: Optional[jax.Array] = None
    key_valid: Optional[jax.Array] = None
    query_segment: Optional[jax.Array] = None
    key_segment: Optional[jax.Array] = None
    aligned: bool = struct.field(pytree_node=False, default=False)
    full: Optional[jax.Array] = None
    causal: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def bidirectional(cls) -> "AttentionMask":
        """Every query sees every key (self-attention over one unpadded sequence, e.g. ViT patches)."""
        return cls(aligned=True, causal=False)

    @classmethod
    def explicit(cls, mask: jax.Array) -> "AttentionMask":
        """A given bool mask [B, T, S] (cross-attention); served by xla or cudnn."""
        return cls(full=mask[:, None], causal=False)

    def with_dense(self) -> "AttentionMask":
        return self.replace(full=self.dense())

    def dense(self) -> Optional[jax.Array]:
        """The boolean mask [B, 1, T, S] the xla and cudnn paths take (None: nothing masked)."""
        if self.full is not None:
            return self.full
        mask = None
        if self.causal:
            keys = jnp.arange(self.key_valid.shape[1], dtype=jnp.int32)
            mask = keys[None, None, :] <= self.query_index[:, :, None]
        if self.key_valid is not None:
            valid = self.key_valid.astype(jnp.bool_)[:, None, :]
            mask = valid if mask is None else mask & valid
        if self.key_segment is not None:
            same = self.query_segment[:, :, None] == self.key_segment[:, None, :]
            mask = same if mask is None else mask & same
        return None if mask is None else mask[:, None]


def resolve_attention(name: str, backend: str) -> str:
    """``config.model.attention`` -> ``"xla" | "splash" | "cudnn"`` for ``backend`` (``"cpu" | "gpu" | "tpu"``)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={name!r}: expected one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    return {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")


def splash_length(length: int) -> int:
    """The sequence length splash runs at: ``length`` padded up to a multiple of 128."""
    return -(-length // SPLASH_LANES) * SPLASH_LANES


def splash_block(length: int) -> int:
    """The splash block size for a (padded) sequence of ``length``: the largest of 512, 256, 128 dividing it."""
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def implementation_for(name: str, backend: str, q_shape, k_shape, dtype, aligned: bool, masked: bool = False) -> str:
    """The implementation that serves one call, after the fallback rules in the module docstring (``masked``: the
    call passes a dense mask)."""
    impl = resolve_attention(name, backend)
    T, S, D = q_shape[1], k_shape[1], q_shape[-1]
    if impl == "splash" and not (aligned and T == S):
        return "xla"
    if impl == "cudnn":
        ok = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and D % 8 == 0 and D <= 128
        # A mask reaches cuDNN as a bias; with a bias its training kernels need even lengths (JAX 0.10.2's
        # check_is_flash_attention raises "Unsupported sequence length" under jax.grad). Whether the call is
        # differentiated is not known here, so a masked call at an odd length uses xla for inference as well.
        ok = ok and not (masked and (T % 2 or S % 2))
        return "cudnn" if ok else "xla"
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float,
              implementation: str = "auto") -> jax.Array:
    """Masked multi-head attention (causal, key-padded and, for packed rows, segment-blind; or as ``mask`` says).

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (GQA); ``mask``
    an :class:`AttentionMask`. Returns [B, T, H, D] in q's dtype.
    ``implementation``: ``config.model.attention``, resolved at trace time for
    the platform the program is compiled for.
    """
    dense = mask.dense()
    impl = implementation_for(implementation, sharding.target_platform(), q.shape, k.shape, q.dtype, mask.aligned,
                              masked=dense is not None)
    if impl == "splash":
        out = _splash(q, k, v, mask, scale)
    elif impl == "cudnn" and sharding.current_mesh() is not None:
        q, k, v, dense = _cudnn_shardings(q, k, v, dense)
        out = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation="cudnn")
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation=impl)
    return sharding.constrain(out, ("batch", "length", "heads", "head_dim"))


def _cudnn_shardings(q, k, v, dense):
    """(q, k, v, mask) constrained as cuDNN's partitioner requires: q, k, v alike (the batch and, where both head axes
    split the same way, the heads), no sequence or head_dim split, the mask split as q's batch. A KV-cached call's
    cache is otherwise laid out apart from its queries ("Query, key and value should have same sharding")."""
    qs = sharding.logical_spec(("batch", "length", "heads", "head_dim"), q.shape)
    ks = sharding.logical_spec(("batch", "length", "kv_heads", "head_dim"), k.shape)
    spec = P(qs[0] if qs[0] == ks[0] else None, None, qs[2] if qs[2] == ks[2] else None, None)
    c = lambda x, sp: jax.lax.with_sharding_constraint(x, sp)
    q, k, v = c(q, spec), c(k, spec), c(v, spec)
    if dense is not None:
        dense = c(dense, P(spec[0] if dense.shape[0] == q.shape[0] else None, None, None, None))
    return q, k, v, dense


def _splash_kernel(num_heads: int, length: int, causal: bool, interpret: bool):
    """A splash kernel for [H, T, D] queries against [K, T, D] keys, causal or full, with segment ids.

    Built inside the calling trace (its mask tables become constants of that trace; building them eagerly
    would place them on the mesh's devices, which a TPU-topology compile from a CPU host cannot do)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: loaded only when splash is chosen

    b = splash_block(length)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    mask = sa.MultiHeadMask([one for _ in range(num_heads)])
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """Splash over the whole batch: per shard under a mesh, T padded up to a multiple of 128."""
    B, T, H, D = q.shape
    seg = jnp.ones((B, T), jnp.int32) if mask.key_valid is None else mask.key_valid.astype(jnp.int32)
    if mask.key_segment is not None:  # packed: one id per sequence, padding stays 0
        seg = jnp.where(seg > 0, mask.key_segment.astype(jnp.int32), 0)
    L = splash_length(T)
    if L != T:  # segment-0 tokens after the sequence: seen only by each other
        pad = lambda x: jnp.pad(x, ((0, 0), (0, L - T)) + ((0, 0),) * (x.ndim - 2))
        q, k, v, seg = pad(q), pad(k), pad(v), pad(seg)
    interpret = sharding.target_platform() != "tpu"
    local = functools.partial(_splash_local, scale=scale, causal=mask.causal, interpret=interpret)
    if sharding.current_mesh() is not None:
        qs = sharding.logical_spec(("batch", "length", "heads", "head_dim"), q.shape)
        ks = sharding.logical_spec(("batch", "length", "kv_heads", "head_dim"), k.shape)
        if (qs[2] is None) != (ks[2] is None):  # GQA groups stay whole only if both head axes split alike
            qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
        ks = P(qs[0], *ks[1:])
        local = jax.shard_map(local, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs, check_vma=False)
    out = local(q, k, v, seg)
    return out[:, :T]


def _splash_local(q, k, v, seg, *, scale: float, causal: bool, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # as above

    kernel = _splash_kernel(q.shape[2], q.shape[1], causal, interpret)
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, D]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
