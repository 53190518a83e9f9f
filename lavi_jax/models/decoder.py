"""Qwen2 / LLaMA decoder with vision-modulated RMSNorms, RoPE, GQA and a functional KV cache.

Numerics follow Hugging Face transformers: RMSNorm in float32, RoPE in
rotate-half form (including LLaMA-3 and linear ``rope_scaling``), grouped-query
attention, optional q/k/v bias (Qwen2). A norm listed in the conditioner
config gets a conditioner and computes

    ViLN(h_t | V) = RMSNorm(h_t) * (w + dgamma_t) + dbeta_t

with ``(dgamma_t, dbeta_t)`` from :mod:`lavi_jax.models.conditioner`.

Layers are unrolled (params ``layers_{i}``) or scanned (``scan_layers``:
params ``blocks/layers_{j}`` with a leading ``layers`` axis). The scan unit is a
block of ``conditioner.every`` layers, so a layer pattern like "every 2nd layer
is modulated" stacks into identical blocks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lavi_jax import sharding
from lavi_jax.models.attention import AttentionMask, attention
from lavi_jax.models.conditioner import Conditioner, VisualContext
from lavi_jax.models.layers import dense, dtype_of

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class DecoderOutput:
    """What a decoder call returns.

    logits: [B, T, vocab] float32 (T' positions with ``logits_at``).
    hidden: [B, T, D] the final norm's output, the LM head's input (T' positions with ``logits_at``).
    cache: the updated KV cache ``{"k", "v"}`` [L, B, S, K, D] when one was given, else None.
    """

    logits: jax.Array
    hidden: jax.Array
    cache: Optional[dict] = None


# ----------------------------------------------------------------------------- layer pattern


def modulated_layers(cond: Any, num_layers: int) -> tuple[int, ...]:
    """Indices of decoder layers whose norms are modulated (empty when ``cond`` is None)."""
    if cond is None:
        return ()
    if cond.layers:  # an explicit list; empty or None: every/offset
        layers = tuple(sorted(int(i) for i in cond.layers))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"conditioner.layers {bad} out of range for {num_layers} layers")
        return layers
    return tuple(range(int(cond.offset), num_layers, int(cond.every)))


def scan_block_size(cond: Any, num_layers: int) -> int:
    """Layers per scan unit: the period of the modulation pattern."""
    layers = modulated_layers(cond, num_layers)
    if not layers or len(layers) == num_layers:
        return 1
    period = 0 if cond.layers else int(cond.every)
    regular = period > 0 and cond.offset < period and num_layers % period == 0
    if not regular:
        raise ValueError(
            f"scan_layers needs a periodic modulation pattern (every k-th layer from an offset < k, k dividing "
            f"num_layers={num_layers}); got layers={list(layers)}. Use scan_layers=False for this pattern."
        )
    return period


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: Any) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, as HF computes them (incl. rope_scaling)."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    scaling = cfg.rope_scaling
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
        old_len = np.float32(scaling["original_max_position_embeddings"])
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. ``x`` [B, T, H, D], ``positions`` [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm in float32; with a conditioner config it becomes a ViLN taking per-token deltas."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conditioner: Any = None  # conditioner ConfigDict, or None for a plain RMSNorm
    shared: Optional[nn.Module] = None  # a Conditioner owned elsewhere (conditioner.shared)
    attention: str = "auto"  # config.model.attention, for an attention conditioner

    @nn.compact
    def __call__(self, x: jax.Array, visual: VisualContext | None = None) -> jax.Array:
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        if self.conditioner is None or visual is None:
            return (w * normed).astype(self.dtype)
        cond = self.shared or Conditioner(self.conditioner, features=x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                                          attention=self.attention, name="conditioner")
        dgamma, dbeta = cond(normed, visual)
        scale = w if dgamma is None else w + dgamma
        out = normed * scale
        return (out if dbeta is None else out + dbeta).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; ``attend`` gives tied-embedding logits."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from a table sharded over vocab only (embed gathered, as FSDP does for every weight).
        table = sharding.constrain(self.embedding, ("vocab", None)).astype(self.dtype)
        return sharding.constrain(jnp.take(table, ids, axis=0), ("batch", "length", "embed"))

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied-embedding logits [B, T, vocab] float32 (the compute-dtype product accumulated in float32)."""
        return jnp.einsum("btd,vd->btv", h.astype(self.dtype), self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class Attention(nn.Module):
    """GQA self-attention with RoPE; ``mask`` an :class:`AttentionMask`, ``implementation`` ``config.model.attention``."""

    cfg: Any
    dtype: Any
    param_dtype: Any
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=c.attention_bias)
        q = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
        new_cache = None
        if cache is not None:  # functional KV cache: write this chunk at cache_index, attend over all of it
            ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            new_cache, k, v = {"k": ck, "v": cv}, ck.astype(self.dtype), cv.astype(self.dtype)
        out = attention(q, k, v, mask, scale=c.head_dim**-0.5, implementation=self.implementation)
        out = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), name="o_proj", dtype=self.dtype, param_dtype=self.param_dtype)(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    cfg: Any
    cond: Any = None  # conditioner config when this layer is modulated
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    shared: Optional[nn.Module] = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, positions, mask, visual=None, cache=None, cache_index=None):
        c = self.cfg
        norms = () if self.cond is None else tuple(self.cond.norms)
        kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, shared=self.shared, attention=self.attention)
        x = RMSNorm(conditioner=self.cond if "attn" in norms else None, name="input_layernorm", **kw)(h, visual)
        attn, new_cache = Attention(c, self.dtype, self.param_dtype, self.attention, name="self_attn")(x, positions, mask, cache, cache_index)
        h = sharding.constrain(h + attn, ("batch", "length", "embed"))
        x = RMSNorm(conditioner=self.cond if "mlp" in norms else None, name="post_attention_layernorm", **kw)(h, visual)
        h = sharding.constrain(h + MLP(c, self.dtype, self.param_dtype, name="mlp")(x), ("batch", "length", "embed"))
        return h, new_cache


class Block(nn.Module):
    """``len(conds)`` consecutive decoder layers: the unit of ``nn.scan``."""

    cfg: Any
    conds: tuple = (None,)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, cache, positions, mask, visual, cache_index):
        new_caches = []
        for j, cond in enumerate(self.conds):
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[j], cache)
            h, nc = DecoderLayer(self.cfg, cond, self.dtype, self.param_dtype, attention=self.attention, name=f"layers_{j}")(h, positions, mask, visual, layer_cache, cache_index)
            new_caches.append(nc)
        stacked = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
        return h, stacked


class Decoder(nn.Module):
    """Token embeddings -> decoder layers -> final norm -> logits (float32); returns a :class:`DecoderOutput`.

    ``cond`` is the conditioner config (None: a plain LLM). Call with either
    ``input_ids`` or ``inputs_embeds``. ``attention_mask`` [B, S] marks valid keys
    (S = T, or the cache length when decoding); ``query_index`` [B, T] is each
    query's index in that key sequence (default ``arange(T)``; without a cache
    queries are keys 0..T-1, so it must be ``arange(T)`` there). ``cache`` is
    ``{"k", "v"}`` with a leading layer axis [L, B, S, K, D]; the output carries
    the updated one. ``logits_at`` [B, T'] (indices into the T queries)
    computes the final norm and the head only at those positions. ``segment_ids``
    [B, T] (packed rows, no cache): queries see only keys of their own segment.
    """

    cfg: Any
    cond: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "auto"  # config.model.attention: auto | xla | splash | cudnn

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        mod = set(modulated_layers(self.cond, c.num_layers))
        conds = [self.cond if i in mod else None for i in range(c.num_layers)]
        shared = None
        if self.cond is not None and self.cond.shared and mod:
            if self.scan_layers:
                raise ValueError("conditioner.shared=True is not supported with scan_layers=True")
            shared = Conditioner(self.cond, features=c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                 attention=self.attention, name="shared_conditioner")
        block_cls, layer_cls = Block, DecoderLayer
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            block_cls = nn.remat(Block, policy=policy, prevent_cse=not self.scan_layers)
            layer_cls = nn.remat(DecoderLayer, policy=policy)
        if self.scan_layers:
            k = scan_block_size(self.cond, c.num_layers)
            self.blocks = nn.scan(
                block_cls,
                variable_axes={"params": 0, "visual_cache": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers // k,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, tuple(conds[:k]), self.dtype, self.param_dtype, self.attention, name="blocks")
        else:
            self.layers = [
                layer_cls(c, conds[i], self.dtype, self.param_dtype, shared=shared, attention=self.attention, name=f"layers_{i}")
                for i in range(c.num_layers)
            ]
        final_cond = self.cond if (self.cond is not None and self.cond.final_norm) else None
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, conditioner=final_cond, shared=shared,
                            attention=self.attention)
        if not c.tie_word_embeddings:
            # float32 logits straight out of the matmul: a bfloat16 result would move in steps of 0.125 above 16.
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                                 preferred_element_type=jnp.float32)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                 query_index=None, visual: VisualContext | None = None, cache=None, cache_index=None,
                 logits_at=None, segment_ids=None) -> DecoderOutput:
        c = self.cfg
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        h = sharding.constrain(h, ("batch", "length", "embed"))
        B, T = h.shape[:2]
        S = T if cache is None else cache["k"].shape[2]
        if query_index is None:
            start = 0 if cache_index is None else cache_index
            query_index = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.bool_)
        if position_ids is None:
            position_ids = query_index
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for uncached calls only")
        mask = AttentionMask(query_index, attention_mask.astype(jnp.bool_), segment_ids, segment_ids,
                             aligned=cache is None).with_dense()  # one dense mask for every layer

        new_cache = None
        if self.scan_layers:
            k = scan_block_size(self.cond, c.num_layers)
            blk_cache = None if cache is None else jax.tree.map(lambda a: a.reshape((c.num_layers // k, k) + a.shape[1:]), cache)
            h, new_cache = self.blocks(h, blk_cache, position_ids, mask, visual, cache_index)
            if cache is not None:
                new_cache = jax.tree.map(lambda a: a.reshape((c.num_layers,) + a.shape[2:]), new_cache)
        else:
            caches = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
                h, nc = layer(h, position_ids, mask, visual, layer_cache, cache_index)
                caches.append(nc)
            if cache is not None:
                new_cache = jax.tree.map(lambda *a: jnp.stack(a), *caches)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
            if visual is not None:
                at = lambda a: None if a is None else jnp.take_along_axis(a, logits_at, axis=1)
                visual = visual.replace(query_index=at(visual.query_index), query_segment=at(visual.query_segment))
        h = self.norm(h, visual)
        if c.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return DecoderOutput(logits=logits, hidden=h, cache=new_cache)


def init_cache(cfg: Any, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache ``{"k", "v"}`` of shape [layers, batch, length, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype_of(dtype)), "v": jnp.zeros(shape, dtype_of(dtype))}
