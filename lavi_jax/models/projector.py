"""Visual features -> conditioning width (modulation) or LLM width (concat).

Input: tower features [B, N_items, F, P, D_vis] on a square grid of P tokens
per frame (CLS already dropped). Steps:

1. optional ``pool`` x ``pool`` average pooling of each frame's grid;
2. ``mlp2x_gelu`` (Linear, GELU, Linear, as LLaVA) or ``linear``;
3. a learned temporal embedding per frame index (``temporal_embedding``),
   after which an item's frames are read as one sequence of F * P' tokens.

Returns ``(tokens [B, N, F, P', out], grid (h', w'))``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lavi_jax.models.layers import dense


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
        side = math.isqrt(P)
        if side * side != P:
            raise ValueError(f"projector expects a square token grid per frame, got {P} tokens")
        x = feats.astype(self.dtype)
        if c.pool > 1:
            if side % c.pool:
                raise ValueError(f"projector.pool={c.pool} does not divide the {side}x{side} token grid")
            x = x.reshape(B * N * F, side, side, D)
            x = nn.avg_pool(x, (c.pool, c.pool), strides=(c.pool, c.pool))
            side //= c.pool
            x = x.reshape(B, N, F, side * side, D)
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
        return x, (side, side)
