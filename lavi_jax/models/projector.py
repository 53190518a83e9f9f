"""Visual features -> conditioning width (modulation) or LLM width (concat).

Input: tower features [B, N_items, F, P, D_vis] on a square grid of P tokens
per frame (CLS already dropped). Steps:

1. optional ``pool`` x ``pool`` average pooling of each frame's grid;
2. ``mlp2x_gelu`` (Linear, GELU, Linear, as LLaVA) or ``linear``;
   with ``video_pool`` > 1 and F > 1 frames (a video), each frame's grid is then
   resized bilinearly to ``ceil(side / video_pool)`` per side (OneVision's video
   pooling; for modulation without anyres, where F > 1 means a video);
3. a learned temporal embedding per frame index (``temporal_embedding``),
   after which an item's frames are read as one sequence of F * P' tokens.
   With ``tile_grid`` (LaVi-HD: anyres with ``tile_embedding="grid"``) the
   frames of an image item are its whole image and its crops, and get a
   learned tile-position embedding instead: ``tile_base_embedding`` on frame 0,
   ``tile_row_embedding[r] + tile_col_embedding[c]`` on the crop at grid
   (row r, column c); frame f >= 1 is crop ``(f - 1) // cols, (f - 1) % cols``
   of its item's ``cols``-wide grid. Video items keep the temporal embedding.

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


def video_side(side: int, video_pool: int) -> int:
    """Side of a video frame's ``side`` x ``side`` grid after ``projector.video_pool`` (ceil, as OneVision)."""
    return -(-side // video_pool) if video_pool > 1 else side


def tokens_per_frame(model_cfg: Any, num_frames: int = 1) -> int:
    """P': visual tokens per frame after the projector, from ``config.model`` (its vision and projector); items of
    ``num_frames`` > 1 frames are videos, pooled by ``projector.video_pool``."""
    side = pooled_side(grid_side(num_features_tokens(model_cfg.vision)), model_cfg.projector.pool)
    return (video_side(side, model_cfg.projector.get("video_pool", 1)) if num_frames > 1 else side) ** 2


def resize_frames(x: jax.Array, side: int, out: int) -> jax.Array:
    """[..., side * side, C] -> [..., out * out, C]: bilinear with half-pixel centres and no antialiasing
    (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``, which OneVision's video pooling uses)."""
    lead, C = x.shape[:-2], x.shape[-1]
    grid = x.reshape((-1, side, side, C))
    y = jax.image.resize(grid, (grid.shape[0], out, out, C), "bilinear", antialias=False)
    return y.astype(x.dtype).reshape(lead + (out * out, C))


class Projector(nn.Module):
    cfg: Any  # projector config
    features: int  # output width
    out_name: str = "cond_embed"  # logical name of the output axis ("embed" for concat)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    tile_grid: tuple[int, int] = (0, 0)  # (max rows, max cols) of anyres crops; (0, 0): no tile embedding

    @nn.compact
    def __call__(self, feats: jax.Array, tile_cols: jax.Array | None = None):
        """``feats`` [B, N, F, P, D]; ``tile_cols`` int32 [B, N]: grid columns of each anyres image item,
        0 for videos and padding (used only with ``tile_grid``)."""
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
        if F > 1 and c.get("video_pool", 1) > 1:  # a video: frames pooled (a per-frame embedding added after commutes)
            pooled = video_side(out_side, c.video_pool)
            x, out_side = resize_frames(x, out_side, pooled), pooled
        temporal = 0
        if c.temporal_embedding:
            if F > c.max_frames and self.tile_grid == (0, 0):
                raise ValueError(f"{F} frames exceed projector.max_frames={c.max_frames}")
            table = self.param("temporal_embedding", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.out_name)),
                               (c.max_frames, self.features), self.param_dtype)
            # With tile embeddings, frames past max_frames are image crops (tile-embedded) or padding.
            frames = jnp.minimum(jnp.arange(F), c.max_frames - 1)
            temporal = table[frames].astype(self.dtype)[None, None, :, None, :]
        if self.tile_grid != (0, 0):
            if tile_cols is None:
                tile_cols = jnp.zeros((B, N), jnp.int32)
            tiles = self._tile_embedding(F, tile_cols)[:, :, :, None, :]  # [B, N, F, 1, C]
            x = x + jnp.where((tile_cols > 0)[:, :, None, None, None], tiles, temporal)
        else:
            x = x + temporal
        return x, (out_side, out_side)

    def _tile_embedding(self, F: int, tile_cols: jax.Array) -> jax.Array:
        """[B, N, F, C]: base embedding on frame 0, row + column embedding of its crop on frames 1..F-1."""
        rows, cols = self.tile_grid
        init = nn.initializers.zeros_init()
        base = self.param("tile_base_embedding", nn.with_logical_partitioning(init, (self.out_name,)),
                          (self.features,), self.param_dtype)
        row_table = self.param("tile_row_embedding", nn.with_logical_partitioning(init, (None, self.out_name)),
                               (rows, self.features), self.param_dtype)
        col_table = self.param("tile_col_embedding", nn.with_logical_partitioning(init, (None, self.out_name)),
                               (cols, self.features), self.param_dtype)
        crop = jnp.arange(F, dtype=jnp.int32)[None, None, :] - 1  # [1, 1, F]; -1 on the base frame
        width = jnp.maximum(tile_cols.astype(jnp.int32), 1)[:, :, None]  # [B, N, 1]
        r = jnp.clip(crop // width, 0, rows - 1)  # frames past an item's crops are masked; clipped to stay in range
        col = jnp.clip(crop % width, 0, cols - 1)
        emb = row_table[r] + col_table[col]
        return jnp.where((crop < 0)[..., None], base, emb).astype(self.dtype)
