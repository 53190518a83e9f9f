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
from jax.ad_checkpoint import checkpoint_name

from lavi_jax import sharding
from lavi_jax.models.attention import AttentionMask, attention
from lavi_jax.models.conditioner import Conditioner, VisualContext
from lavi_jax.models.layers import dense, dtype_of

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # "full", with each layer's input [B, T, D] (what the backward pass keeps per layer) moved to host memory and
    # brought back for its layer's recompute: the device holds no per-layer activations at all.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["decoder_layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}


@struct.dataclass
class DecoderOutput:
    """What a decoder call returns.

    logits: [B, T, vocab] float32 (T' positions with ``logits_at``); None from a call with ``logits=False``.
    hidden: [B, T, D] the final norm's output, the LM head's input (T' positions with ``logits_at``).
    cache: the updated KV cache ``{"k", "v"}`` [L, B, S, K, D] when one was given, else None.
    """

    logits: Optional[jax.Array]
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
    def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=0):
        """``cache``: the whole stacked ``{"k", "v"}`` [L, B, S, K, D]; this layer writes its keys and values at
        ``[layer, :, cache_index:]`` in place and returns the updated buffers."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=c.attention_bias)
        q = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
        new_cache = None
        if cache is not None:
            new_cache = {"k": write_cache(cache["k"], layer, k, cache_index),
                         "v": write_cache(cache["v"], layer, v, cache_index)}
            if not mask.aligned:  # decoding: attend over every slot of this layer's cache (masked as it says)
                k, v = new_cache["k"][layer].astype(self.dtype), new_cache["v"][layer].astype(self.dtype)
            # aligned (a prefill at index 0): the chunk attends to itself alone, as splash / cuDNN serve it
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
    def __call__(self, h, positions, mask, visual=None, cache=None, cache_index=None, layer=0):
        c = self.cfg
        h = checkpoint_name(h, "decoder_layer_input")  # remat_policy "offload" keeps it in host memory
        norms = () if self.cond is None else tuple(self.cond.norms)
        kw = dict(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, shared=self.shared, attention=self.attention)
        x = RMSNorm(conditioner=self.cond if "attn" in norms else None, name="input_layernorm", **kw)(h, visual)
        attn, new_cache = Attention(c, self.dtype, self.param_dtype, self.attention, name="self_attn")(x, positions, mask, cache, cache_index, layer)
        h = sharding.constrain(h + attn, ("batch", "length", "embed"))
        x = RMSNorm(conditioner=self.cond if "mlp" in norms else None, name="post_attention_layernorm", **kw)(h, visual)
        h = sharding.constrain(h + MLP(c, self.dtype, self.param_dtype, name="mlp")(x), ("batch", "length", "embed"))
        return h, new_cache


class Block(nn.Module):
    """``len(conds)`` consecutive decoder layers: the unit of ``nn.scan``.

    The carry is ``(h, cache)``: the whole stacked KV cache travels in the loop's carry and each layer updates it
    in place at its own index (``first`` + j), so a decode step writes one token per layer, not a new cache."""

    cfg: Any
    conds: tuple = (None,)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, carry, first, positions, mask, visual, cache_index):
        h, cache = carry
        for j, cond in enumerate(self.conds):
            h, cache = DecoderLayer(self.cfg, cond, self.dtype, self.param_dtype, attention=self.attention,
                                    name=f"layers_{j}")(h, positions, mask, visual, cache, cache_index, first + j)
        return (h, cache), None


class Decoder(nn.Module):
    """Token embeddings -> decoder layers -> final norm -> logits (float32); returns a :class:`DecoderOutput`.

    ``cond`` is the conditioner config (None: a plain LLM). Call with either
    ``input_ids`` or ``inputs_embeds``. ``attention_mask`` [B, S] marks valid keys
    (S = T, or the cache length when decoding); ``query_index`` [B, T] is each
    query's index in that key sequence (default ``arange(T)``; without a cache
    queries are keys 0..T-1, so it must be ``arange(T)`` there). ``cache`` is
    ``{"k", "v"}`` with a leading layer axis [L, B, S, K, D], updated in place at
    ``cache_index`` (an int, or per-row int32 [B]); the output carries it. A call
    at the static index 0 is a prefill: it attends to its own tokens and writes them. ``logits_at`` [B, T'] (indices into the T queries)
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

    def head(self, h: jax.Array) -> jax.Array:
        """The LM head: the final norm's output [B, T, D] -> logits [B, T, vocab] float32."""
        logits = self.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                 query_index=None, visual: VisualContext | None = None, cache=None, cache_index=None,
                 logits_at=None, segment_ids=None, logits: bool = True) -> DecoderOutput:
        c = self.cfg
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        h = sharding.constrain(h, ("batch", "length", "embed"))
        B, T = h.shape[:2]
        S = T if cache is None else cache["k"].shape[2]
        if query_index is None:
            query_index = query_indices(cache_index, B, T)
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.bool_)
        if position_ids is None:
            position_ids = query_index
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for uncached calls only")
        # A call without a cache, or a prefill written at index 0 of an empty one, is aligned (query t is key t): it
        # attends to its own keys (splash / cuDNN can serve it) and the prefill then writes them into the cache.
        prefill = cache is not None and isinstance(cache_index, int) and cache_index == 0
        keys = attention_mask[:, :T] if prefill else attention_mask
        mask = AttentionMask(query_index, keys.astype(jnp.bool_), segment_ids, segment_ids,
                             aligned=cache is None or prefill).with_dense()  # one dense mask for every layer

        if self.scan_layers:
            k = scan_block_size(self.cond, c.num_layers)
            firsts = jnp.arange(0, c.num_layers, k, dtype=jnp.int32)  # each block's first layer: its cache index
            (h, new_cache), _ = self.blocks((h, cache), firsts, position_ids, mask, visual, cache_index)
        else:
            new_cache = cache
            for i, layer in enumerate(self.layers):
                h, new_cache = layer(h, position_ids, mask, visual, new_cache, cache_index, i)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
            if visual is not None:
                at = lambda a: None if a is None else jnp.take_along_axis(a, logits_at, axis=1)
                visual = visual.replace(query_index=at(visual.query_index), query_segment=at(visual.query_segment))
        h = self.norm(h, visual)
        return DecoderOutput(logits=self.head(h) if logits else None, hidden=h, cache=new_cache)


def query_indices(cache_index, batch: int, length: int) -> jax.Array:
    """[B, T] each query's index in the key sequence: ``cache_index + arange(T)``; ``cache_index`` None (no cache),
    an int, a scalar or a per-row int32 [B] (continuous batching: each row writes at its own index)."""
    start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
    start = start[:, None] if start.ndim == 1 else start
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def write_cache(buf: jax.Array, layer, new: jax.Array, index) -> jax.Array:
    """``buf`` [L, B, S, K, D] with ``new`` [B, T, K, D] written at layer ``layer`` and sequence ``index`` (an int or
    scalar: every row; int32 [B]: per-row). One in-place update of a donated / loop-carried buffer; per-row writes
    past S are dropped."""
    new = new.astype(buf.dtype)
    layer = jnp.asarray(layer, jnp.int32)
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        zero = jnp.int32(0)
        return jax.lax.dynamic_update_slice(buf, new[None], (layer, zero, index, zero, zero))
    B, T = new.shape[:2]
    rows = jnp.arange(B, dtype=jnp.int32)[:, None]
    cols = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # per-row write positions [B, T]
    return buf.at[layer, rows, cols].set(new, mode="drop")


def visual_cache_batch_axes(visual_cache: Any) -> Any:
    """The batch axis of every leaf of a ``visual_cache`` collection: 1 under scanned layers (``blocks``, which
    lead with their layer axis), else 0. For writing one request's rows into a batch's slots."""
    def axis(path, _):
        return 1 if any(getattr(k, "key", None) == "blocks" for k in path) else 0
    return jax.tree_util.tree_map_with_path(axis, visual_cache)


def init_cache(cfg: Any, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache ``{"k", "v"}`` of shape [layers, batch, length, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype_of(dtype)), "v": jnp.zeros(shape, dtype_of(dtype))}
