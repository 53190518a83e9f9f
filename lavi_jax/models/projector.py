"""Visual features -> conditioning width (modulation) or LLM width (concat).

Input: tower features [B, N_items, F, P, D_vis] on a square grid of P tokens
per frame (CLS already dropped). Steps:

1. optional ``pool`` x ``pool`` average pooling of each frame's grid;
2. ``mlp2x_gelu`` (Linear, GELU, Linear, as LLaVA) or ``linear``;
3. a learned temporal embedding per frame index (``temporal_embedding``),
   after which an item's frames are read as one sequence of F * P' tokens.

Returns ``(tokens [B, N, F, P', out], grid (h', w'))``; :func:`tokens_per_frame`
gives P' from the model config alone.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lavi_jax.models.layers import dense
from lavi_jax.models.vit import num_features_tokens


def pooled_side(side: int, pool: int) -> int:
    """Side of a ``side`` x ``side`` token grid after ``pool`` x ``pool`` average pooling (pool <= 1: none)."""
    if pool <= 1:
        return side
    if side % pool:
        raise ValueError(f"projector.pool={pool} does not divide the {side}x{side} token grid")
    return side // pool


def grid_side(num_tokens: int) -> int:
    """Side of a square grid of ``num_tokens`` tokens."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"projector expects a square token grid per frame, got {num_tokens} tokens")
    return side


def tokens_per_frame(model_cfg: Any) -> int:
    """P': visual tokens per frame after the projector, from ``config.model`` (its vision and projector)."""
    return pooled_side(grid_side(num_features_tokens(model_cfg.vision)), model_cfg.projector.pool) ** 2


class Projector(nn.Module):
    cfg: Any  # projector config
    features: int  # output width
    out_name: str = "cond_embed"  # logical name of the output axis ("embed" for concat)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: jax.Array):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        B, N, F, P, D = feats.shape
        side = grid_side(P)
        out_side = pooled_side(side, c.pool)
        x = feats.astype(self.dtype)
        if c.pool > 1:
            x = x.reshape(B * N * F, side, side, D)
            x = nn.avg_pool(x, (c.pool, c.pool), strides=(c.pool, c.pool))
            x = x.reshape(B, N, F, out_side * out_side, D)
        if c.type == "mlp2x_gelu":
            x = dense(self.features, ("vit_embed", "mlp"), name="linear_1", **kw)(x)
            x = jax.nn.gelu(x, approximate=False)
            x = dense(self.features, ("mlp", self.out_name), name="linear_2", **kw)(x)
        elif c.type == "linear":
            x = dense(self.features, ("vit_embed", self.out_name), name="linear_1", **kw)(x)
        else:
            raise ValueError(f"unknown projector.type {c.type!r} (mlp2x_gelu | linear)")
        if c.temporal_embedding:
            if F > c.max_frames:
                raise ValueError(f"{F} frames exceed projector.max_frames={c.max_frames}")
            table = self.param("temporal_embedding", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.out_name)),
                               (c.max_frames, self.features), self.param_dtype)
            x = x + table[:F].astype(self.dtype)[None, None, :, None, :]
        return x, (out_side, out_side)
