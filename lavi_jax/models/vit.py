"""SigLIP and CLIP vision transformers with Hugging Face numerics.

``VisionTower(cfg)(pixels)`` takes channels-last pixels [B, H, W, 3] (already
resized and normalised by the matching image processor) and returns the
features the LLM side consumes: the hidden states listed in
``cfg.feature_layers`` (indices into HF's ``hidden_states`` tuple, where 0 is
the embedding output and -1 the last layer before ``post_layernorm``),
concatenated along features, [B, P, D * len(feature_layers)]. CLIP's CLS
token is dropped when ``cfg.drop_cls``. Self-attention is bidirectional and
unmasked, through :func:`lavi_jax.models.attention.attention` with
``config.model.attention`` (``attention``): splash with a full mask (the
patches padded to a multiple of 128, e.g. 729 -> 768, padding unseen), cuDNN,
or XLA.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lavi_jax import sharding
from lavi_jax.models.attention import AttentionMask, attention
from lavi_jax.models.layers import ACTIVATIONS, dense

_ACT = {"siglip": "gelu_pytorch_tanh", "clip": "quick_gelu"}


def num_patches(cfg: Any) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def num_features_tokens(cfg: Any) -> int:
    """Tokens per image that the tower returns."""
    return num_patches(cfg) + (1 if cfg.type == "clip" and not cfg.drop_cls else 0)


def _layer_norm(cfg, name, dtype, param_dtype):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("vit_embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vit_embed",)),
    )


def sincos2d(side: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """[side * side, width] fixed 2-D sin-cos position embeddings, row-major like the patch order."""
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
    y, x = jnp.meshgrid(jnp.arange(side, dtype=jnp.float32), jnp.arange(side, dtype=jnp.float32), indexing="ij")
    omega = 1.0 / temperature ** (jnp.arange(width // 4, dtype=jnp.float32) / (width // 4))
    angles = [coord.reshape(-1, 1) * omega[None] for coord in (x, y)]
    return jnp.concatenate([f(a) for a in angles for f in (jnp.sin, jnp.cos)], axis=1)


def _posemb_init(c):
    kind = c.get("posemb_init", "normal")
    if kind == "normal":
        return nn.initializers.normal(c.hidden_size**-0.5 if c.type == "siglip" else 0.02)  # the HF initialisations
    if kind != "sincos2d":
        raise ValueError(f"unknown vision.posemb_init {kind!r} (normal | sincos2d)")

    def init(key, shape, dtype=jnp.float32):
        table = sincos2d(math.isqrt(num_patches(c)), shape[1])
        if shape[0] > table.shape[0]:  # CLIP's CLS position
            table = jnp.concatenate([jnp.zeros((shape[0] - table.shape[0], shape[1])), table])
        return table.astype(dtype)

    return init


class EncoderLayer(nn.Module):
    cfg: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        heads, head_dim = c.num_heads, c.hidden_size // c.num_heads
        x = _layer_norm(c, "layer_norm1", self.dtype, self.param_dtype)(h)
        q = dense((heads, head_dim), ("vit_embed", "vit_heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((heads, head_dim), ("vit_embed", "vit_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((heads, head_dim), ("vit_embed", "vit_heads", "head_dim"), name="v_proj", **kw)(x)
        a = attention(q, k, v, AttentionMask.bidirectional(), scale=head_dim**-0.5, implementation=self.attention)
        h = h + dense(c.hidden_size, ("vit_heads", "head_dim", "vit_embed"), axis=(-2, -1), name="out_proj", **kw)(a)
        x = _layer_norm(c, "layer_norm2", self.dtype, self.param_dtype)(h)
        x = dense(c.intermediate_size, ("vit_embed", "vit_mlp"), name="fc1", **kw)(x)
        x = ACTIVATIONS[_ACT[c.type]](x)
        h = h + dense(c.hidden_size, ("vit_mlp", "vit_embed"), name="fc2", **kw)(x)
        return sharding.constrain(h, ("batch", "length", "vit_embed"))


class VisionTower(nn.Module):
    cfg: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # config.model.attention

    @nn.compact
    def __call__(self, pixels: jax.Array, return_all: bool = False):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.type not in _ACT:
            raise ValueError(f"unknown vision.type {c.type!r} (siglip | clip)")
        patch = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
            use_bias=c.type == "siglip", name="patch_embedding", **kw,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "vit_embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vit_embed",)),
        )
        h = patch(pixels.astype(self.dtype))
        h = h.reshape(h.shape[0], -1, h.shape[-1])  # [B, P, D], row-major patch order as HF's flatten(2)
        n_pos = num_patches(c) + (1 if c.type == "clip" else 0)
        if c.type == "clip":
            cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vit_embed",)),
                             (c.hidden_size,), self.param_dtype)
            h = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (h.shape[0], 1, c.hidden_size)), h], axis=1)
        pos = self.param("position_embedding", nn.with_logical_partitioning(_posemb_init(c), (None, "vit_embed")),
                         (n_pos, c.hidden_size), self.param_dtype)
        if h.shape[1] != n_pos:
            raise ValueError(f"vision tower expects {c.image_size}x{c.image_size} images, got {pixels.shape[1:3]}")
        h = h + pos.astype(self.dtype)
        if c.type == "clip":
            h = _layer_norm(c, "pre_layrnorm", self.dtype, self.param_dtype)(h)
        hidden_states = [h]
        for i in range(c.num_layers):
            h = EncoderLayer(c, self.dtype, self.param_dtype, self.attention, name=f"layers_{i}")(h)
            hidden_states.append(h)
        post = _layer_norm(c, "post_layernorm", self.dtype, self.param_dtype)(h)
        if return_all:
            return hidden_states, post
        feats = jnp.concatenate([hidden_states[i] for i in c.feature_layers], axis=-1)
        if c.type == "clip" and c.drop_cls:
            feats = feats[:, 1:]
        return feats
