"""Delta generators: token-wise, vision-conditioned deltas for a modulated RMSNorm.

Every conditioner maps the normalised hidden state ``x_t = RMSNorm_noaffine(h_t)``
of text token t and the visual tokens ``V`` it may see to ``(dgamma_t, dbeta_t)``
(each [B, T, D], or None for an affine parameter that is not modulated). Token t
sees the tokens of visual item i iff item i's placeholder sits at or before t
(``key_index <= query_index``) and, in a packed row, belongs to t's own
sequence (``key_segment == query_segment``); a token that sees nothing gets
zero deltas.
The output projection ``W_o`` is zero-initialised, so a fresh model computes
exactly what the base LLM computes.

Variants (``conditioner.type``), with ``M_t`` the set of visual tokens t sees:

* ``attention`` (default)::

      q_t = W_q x_t,  k_s = W_k v_s,  v'_s = W_v v_s          (num_heads heads of width/num_heads)
      a_t = sum_{s in M_t} softmax_s(q_t . k_s / sqrt(d)) v'_s
      [dgamma_t, dbeta_t] = W_o a_t

* ``mlp``::

      m_t = mean_{s in M_t} v_s
      [dgamma_t, dbeta_t] = W_o gelu(W_x x_t + W_v m_t + b)

* ``conv``: as ``mlp`` with ``v_s`` replaced by ``gelu(Conv_kxk(V))_s``, a
  ``conv_kernel`` x ``conv_kernel`` convolution over each frame's token grid.

The attention variant runs through :func:`lavi_jax.models.attention.attention`
with ``config.model.attention``: ``cudnn`` where cuDNN's constraints hold (GPU,
bf16 / fp16), ``xla`` otherwise. ``splash`` (and ``auto`` on TPU) is served by
``xla`` here: the text queries attend to visual keys (T != S, not aligned), and
the mask depends on each query's position relative to each item's placeholder,
which splash's static mask tables and segment ids cannot express.

Visual keys/values (attention) or visual summaries (mlp, conv) are computed
once: when the ``visual_cache`` collection is mutable they are stored there, and
when it is given read-only (cached decoding) they are read instead of
recomputed, so decode steps never touch the vision tower.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lavi_jax import sharding
from lavi_jax.models.attention import AttentionMask, attention
from lavi_jax.models.layers import dense

NO_ITEM = jnp.iinfo(jnp.int32).max  # key_index of padding: never visible


@struct.dataclass
class VisualContext:
    """What a conditioner needs to know about the visual items of a batch.

    tokens: [B, N_items, F, P, C] projected visual tokens (None when decoding from ``visual_cache``).
    key_index: [B, N_items, F] sequence index of the item's placeholder; ``NO_ITEM`` for padding.
    query_index: [B, T] sequence index of each text token.
    grid: (h, w) of each frame's token grid (static).
    key_segment: [B, N_items, F] segment id of the item's placeholder in a packed row, else None.
    query_segment: [B, T] segment id of each text token in a packed row, else None.
    """

    tokens: Optional[jax.Array]
    key_index: Optional[jax.Array]
    query_index: jax.Array
    grid: tuple = struct.field(pytree_node=False, default=(0, 0))
    key_segment: Optional[jax.Array] = None
    query_segment: Optional[jax.Array] = None


def _visible(key_index: jax.Array, query_index: jax.Array, tokens_per_frame: int,
             key_segment: Optional[jax.Array] = None, query_segment: Optional[jax.Array] = None) -> jax.Array:
    """[B, T, S] bool: query t sees visual token s (placeholder at or before t, same segment when packed)."""
    per_token = lambda a: jnp.repeat(a.reshape(a.shape[0], -1), tokens_per_frame, axis=1)  # [B, S]
    visible = per_token(key_index)[:, None, :] <= query_index[:, :, None]
    if key_segment is not None and query_segment is not None:
        visible &= per_token(key_segment)[:, None, :] == query_segment[:, :, None]
    return visible


class Conditioner(nn.Module):
    cfg: Any  # conditioner config
    features: int  # D, the LLM width
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # config.model.attention (the attention variant)

    def _cached(self, name: str, compute):
        """Value from ``visual_cache`` when given read-only, else computed (and stored when mutable)."""
        if self.has_variable("visual_cache", name) and not self.is_mutable_collection("visual_cache"):
            return self.get_variable("visual_cache", name)
        value = compute()
        if self.is_mutable_collection("visual_cache"):
            self.put_variable("visual_cache", name, value)
        return value

    @nn.compact
    def __call__(self, x: jax.Array, visual: VisualContext):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n_out = len(c.params)
        if c.type == "attention":
            heads, head_dim = c.num_heads, c.width // c.num_heads

            def kv():
                tokens = visual.tokens.reshape(visual.tokens.shape[0], -1, visual.tokens.shape[-1])
                k = dense((heads, head_dim), ("cond_embed", "heads", "head_dim"), name="k_proj", **kw)(tokens)
                v = dense((heads, head_dim), ("cond_embed", "heads", "head_dim"), name="v_proj", **kw)(tokens)
                return {"k": k, "v": v, "key_index": visual.key_index}

            cache = self._cached("kv", kv)
            visible = _visible(cache["key_index"], visual.query_index, cache["k"].shape[1] // cache["key_index"][0].size,
                               visual.key_segment, visual.query_segment)
            q = dense((heads, head_dim), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
            a = attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), AttentionMask.explicit(visible),
                          scale=head_dim**-0.5, implementation=self.attention)
            out = dense((n_out, self.features), ("heads", "head_dim", None, "embed"), axis=(-2, -1), name="o_proj",
                        kernel_init=nn.initializers.zeros_init(), use_bias=True, **kw)(a)
            out = jnp.where(visible.any(-1)[:, :, None, None], out, 0)
        elif c.type in ("mlp", "conv"):

            def summary():
                v = visual.tokens
                if c.type == "conv":
                    B, N, F, P, C = v.shape
                    grid = v.reshape((B * N * F,) + tuple(visual.grid) + (C,))
                    conv = nn.Conv(c.width, (c.conv_kernel, c.conv_kernel), padding="SAME", name="conv", **kw,
                                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "cond_embed", None)))
                    v = jax.nn.gelu(conv(grid)).reshape(B, N, F, P, c.width)
                return {"tokens": v.reshape(v.shape[0], -1, v.shape[-1]), "key_index": visual.key_index}

            cache = self._cached("summary", summary)
            visible = _visible(cache["key_index"], visual.query_index, cache["tokens"].shape[1] // cache["key_index"][0].size,
                               visual.key_segment, visual.query_segment)
            weights = visible.astype(self.dtype)
            count = weights.sum(-1, keepdims=True)
            mean = jnp.einsum("bts,bsc->btc", weights / jnp.maximum(count, 1), cache["tokens"].astype(self.dtype))
            hidden = dense(c.width, ("embed", "cond_embed"), name="x_proj", **kw)(x)
            hidden = hidden + dense(c.width, ("cond_embed", None), name="v_proj", use_bias=True, **kw)(mean)
            out = dense((n_out, self.features), ("cond_embed", None, "embed"), name="o_proj",
                        kernel_init=nn.initializers.zeros_init(), use_bias=True, **kw)(jax.nn.gelu(hidden))
            out = jnp.where(count[..., None] > 0, out, 0)
        else:
            raise ValueError(f"unknown conditioner.type {c.type!r} (attention | mlp | conv)")
        out = sharding.constrain(out, ("batch", "length", None, "embed"))
        deltas = dict(zip(c.params, jnp.moveaxis(out, 2, 0)))
        return deltas.get("scale"), deltas.get("shift")
