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

  With ``kv_share`` ``"all"`` (or ``"k"``: per group of k consecutive modulated
  layers, the final norm in the last group) ``W_k`` and ``W_v`` belong to
  :class:`VisualKV` and are applied once per item and group, not per norm; each
  norm keeps its own ``W_q`` and ``W_o``. ``shared=True`` (one conditioner for
  every norm) projects its keys and values once the same way.

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

What decoding needs is computed once and kept in the ``visual_cache``
collection (stored when it is mutable, read back when it is given read-only,
so decode steps never touch the vision tower): the attention variant's visual
keys/values (per norm, or per ``kv_share`` group), and for ``mlp`` / ``conv``
only the mean over all of a row's items, [B, width] per conditioner. A cached
call's queries therefore must come after every item's placeholder, as decode
steps do.
"""

from __future__ import annotations

import dataclasses
import re
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
    visible: [B, T, S] bool, S = N_items * F * P: query t sees visual token s (:func:`visible_mask`),
        built once per forward; dropped by ``replace`` when the queries change.
    kv: shared visual keys/values, one ``{"k", "v"}`` [B, S, heads, head_dim] per ``kv_share`` group, else None.
    kv_group: static ``((layer, group), ...)``: the ``kv`` group of each modulated layer (layer None: the final norm).
    """

    tokens: Optional[jax.Array]
    key_index: Optional[jax.Array]
    query_index: jax.Array
    grid: tuple = struct.field(pytree_node=False, default=(0, 0))
    key_segment: Optional[jax.Array] = None
    query_segment: Optional[jax.Array] = None
    visible: Optional[jax.Array] = None
    kv: Optional[tuple] = None
    kv_group: tuple = struct.field(pytree_node=False, default=())


def _replace(self, **updates) -> VisualContext:
    if ("query_index" in updates or "query_segment" in updates) and "visible" not in updates:
        updates["visible"] = None  # built for the old queries
    return dataclasses.replace(self, **updates)


VisualContext.replace = _replace


def visible_mask(key_index: jax.Array, query_index: jax.Array, tokens_per_frame: int,
                 key_segment: Optional[jax.Array] = None, query_segment: Optional[jax.Array] = None) -> jax.Array:
    """[B, T, S] bool: query t sees visual token s (placeholder at or before t, same segment when packed)."""
    per_token = lambda a: jnp.repeat(a.reshape(a.shape[0], -1), tokens_per_frame, axis=1)  # [B, S]
    visible = per_token(key_index)[:, None, :] <= query_index[:, :, None]
    if key_segment is not None and query_segment is not None:
        visible &= per_token(key_segment)[:, None, :] == query_segment[:, :, None]
    return visible


def kv_share_groups(cond: Any, layers: tuple[int, ...]) -> dict:
    """``{modulated layer: kv_share group}`` (key None: the final norm, in the last group); ``{}`` without sharing.

    ``layers`` are the modulated layers in order; ``shared=True`` (attention) counts as ``kv_share="all"``.
    """
    if cond is None:
        return {}
    share = str(cond.get("kv_share", "none"))
    if cond.type == "attention" and cond.shared:
        share = "all"
    if share == "none":
        return {}
    if cond.type != "attention":
        raise ValueError(f"conditioner.kv_share={share!r} needs the attention conditioner (type={cond.type!r})")
    if share != "all" and (not share.isdigit() or int(share) < 1):
        raise ValueError(f"conditioner.kv_share must be 'none', 'all' or a number of layers per group, got {share!r}")
    per = (len(layers) or 1) if share == "all" else int(share)
    groups = {layer: n // per for n, layer in enumerate(layers)}
    if cond.final_norm:
        groups[None] = max(groups.values(), default=0)
    return groups


def _cached(module: nn.Module, name: str, compute):
    """Value from ``visual_cache`` when given read-only, else computed (and stored when mutable)."""
    if module.has_variable("visual_cache", name) and not module.is_mutable_collection("visual_cache"):
        return module.get_variable("visual_cache", name)
    value = compute()
    if module.is_mutable_collection("visual_cache"):
        module.put_variable("visual_cache", name, value)
    return value


class VisualKV(nn.Module):
    """What the conditioners of a forward share: the items' placeholder indices, and the visual keys and values of
    each ``kv_share`` group (or of ``shared``) of attention conditioners.

    Params ``k_proj_{g}``, ``v_proj_{g}`` per group g ([width, heads, head_dim], no bias, like a conditioner's
    own). ``tokens`` [B, N, F, P, width], ``key_index`` [B, N, F] -> (``key_index``, one ``{"k", "v"}``
    [B, S, heads, head_dim] per group). Both are stored in ``visual_cache`` when it is mutable; with ``tokens``
    None they are read from it (cached decoding).
    """

    cfg: Any
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Optional[jax.Array], key_index: Optional[jax.Array] = None) -> tuple:
        if tokens is None:
            return (self.get_variable("visual_cache", "key_index"),
                    tuple(self.get_variable("visual_cache", f"kv_{g}") for g in range(self.groups)))
        heads, head_dim = self.cfg.num_heads, self.cfg.width // self.cfg.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        flat = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
        kv = tuple({"k": dense((heads, head_dim), ("cond_embed", "heads", "head_dim"), name=f"k_proj_{g}", **kw)(flat),
                    "v": dense((heads, head_dim), ("cond_embed", "heads", "head_dim"), name=f"v_proj_{g}", **kw)(flat)}
                   for g in range(self.groups))
        if self.is_mutable_collection("visual_cache"):
            self.put_variable("visual_cache", "key_index", key_index)
            for g, value in enumerate(kv):
                self.put_variable("visual_cache", f"kv_{g}", value)
        return key_index, kv


class Conditioner(nn.Module):
    cfg: Any  # conditioner config
    features: int  # D, the LLM width
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # config.model.attention (the attention variant)

    def _cached(self, name: str, compute):
        return _cached(self, name, compute)

    def _kv_group(self, visual: VisualContext) -> int:
        """This conditioner's group in ``visual.kv``: from its decoder layer (unrolled layout) or the final norm."""
        if len(visual.kv) == 1:
            return 0
        layer = next((int(m.group(1)) for n in self.scope.path if (m := re.fullmatch(r"layers_(\d+)", n))), None)
        return dict(visual.kv_group)[layer]

    def _visible(self, visual: VisualContext, key_index: jax.Array, tokens: int) -> jax.Array:
        if visual.visible is not None:
            return visual.visible
        return visible_mask(key_index, visual.query_index, tokens // key_index[0].size, visual.key_segment,
                            visual.query_segment)

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
                return {"k": k, "v": v}

            cache = visual.kv[self._kv_group(visual)] if visual.kv is not None else self._cached("kv", kv)
            visible = self._visible(visual, visual.key_index, cache["k"].shape[1])
            q = dense((heads, head_dim), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
            a = attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), AttentionMask.explicit(visible),
                          scale=head_dim**-0.5, implementation=self.attention)
            out = dense((n_out, self.features), ("heads", "head_dim", None, "embed"), axis=(-2, -1), name="o_proj",
                        kernel_init=nn.initializers.zeros_init(), use_bias=True, **kw)(a)
            out = jnp.where(visible.any(-1)[:, :, None, None], out, 0)
        elif c.type in ("mlp", "conv"):
            mean, seen = self._summary(visual)
            hidden = dense(c.width, ("embed", "cond_embed"), name="x_proj", **kw)(x)
            hidden = hidden + dense(c.width, ("cond_embed", None), name="v_proj", use_bias=True, **kw)(mean)
            out = dense((n_out, self.features), ("cond_embed", None, "embed"), name="o_proj",
                        kernel_init=nn.initializers.zeros_init(), use_bias=True, **kw)(jax.nn.gelu(hidden))
            out = jnp.where(seen[..., None, None], out, 0)
        else:
            raise ValueError(f"unknown conditioner.type {c.type!r} (attention | mlp | conv)")
        out = sharding.constrain(out, ("batch", "length", None, "embed"))
        deltas = dict(zip(c.params, jnp.moveaxis(out, 2, 0)))
        return deltas.get("scale"), deltas.get("shift")

    def _summary(self, visual: VisualContext) -> tuple[jax.Array, jax.Array]:
        """mlp / conv: (mean of the visual tokens each query sees [B, T, width], whether it sees any [B, T])."""
        c = self.cfg
        if visual.tokens is None:  # cached decoding: every query sees every item
            cached = self.get_variable("visual_cache", "summary")
            T = visual.query_index.shape[1]
            return (jnp.broadcast_to(cached["mean"][:, None], (cached["mean"].shape[0], T, cached["mean"].shape[-1])),
                    jnp.broadcast_to(cached["seen"][:, None], (cached["seen"].shape[0], T)))
        v = visual.tokens
        if c.type == "conv":
            B, N, F, P, C = v.shape
            grid = v.reshape((B * N * F,) + tuple(visual.grid) + (C,))
            conv = nn.Conv(c.width, (c.conv_kernel, c.conv_kernel), padding="SAME", name="conv", dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "cond_embed", None)))
            v = jax.nn.gelu(conv(grid)).reshape(B, N, F, P, c.width)
        tokens = v.reshape(v.shape[0], -1, v.shape[-1]).astype(self.dtype)

        def mean_over(visible):
            weights = visible.astype(self.dtype)
            count = weights.sum(-1, keepdims=True)
            return jnp.einsum("bts,bsc->btc", weights / jnp.maximum(count, 1), tokens), count[..., 0] > 0

        if self.is_mutable_collection("visual_cache"):  # what a decode step sees: every item of its row
            everything = (visual.key_index < NO_ITEM).reshape(tokens.shape[0], 1, -1)
            mean, seen = mean_over(jnp.repeat(everything, tokens.shape[1] // everything.shape[-1], axis=-1))
            self.put_variable("visual_cache", "summary", {"mean": mean[:, 0], "seen": seen[:, 0]})
        return mean_over(self._visible(visual, visual.key_index, tokens.shape[1]))
