"""The whole model: vision tower -> projector -> LLM, fused by modulation (LaVi), concatenation (LLaVA) or not at all.

Call contract::

    logits = LaVi(config.model).apply({"params": params}, input_ids,
                                     pixel_values=pix, item_mask=mask)   # [B, T, vocab], float32

``input_ids`` int32 [B, T]; each ``image_token_id`` opens a visual item (the
k-th placeholder of a row is item k). ``pixel_values`` float [B, N, F, H, W, 3]
(channels last, processor-normalised), ``item_mask`` bool [B, N, F] (an image
is an item with one valid frame). Items without a placeholder in their row are
ignored. ``attention_mask`` [B, T] marks real tokens; ``position_ids`` default
to ``cumsum(attention_mask) - 1``.

Cached decoding (see :mod:`lavi_jax.generate`): ``cache`` / ``cache_index`` write
this chunk's keys and values into a KV cache (``attention_mask`` then covers the
cache's S keys; for a concat call with ``pixel_values`` it covers the T text
tokens and the expanded prefix is written at index 0). With the ``visual_cache``
collection mutable, each conditioner stores its visual keys/values and a concat
call stores its expanded mask as ``concat_mask`` [B, T_out]; with
``use_visual_cache=True`` they are read back instead of running the vision tower.
``item_index`` [B, N] gives the placeholders' cache indices when they are not in
``input_ids`` (a decode step that recomputes the visual features).
``logits_at`` [B, T'] returns logits only at those text positions (the final
norm and LM head run on T' tokens), e.g. the last prompt token when prefilling.

* ``fusion="modulation"``: every modulated RMSNorm of the LLM receives deltas
  from its conditioner; text token t sees item k iff item k's placeholder sits
  at or before t, so interleaved images and cached decoding are causal.
* ``fusion="concat"``: each placeholder is replaced by its item's visual tokens
  projected to the LLM width. Logits are returned at the text positions only
  ([B, T, vocab]; a placeholder's logits are those of its item's last visual
  token), so the two fusions are interchangeable for losses and evaluation.
* ``fusion="none"``: a text-only LLM (no vision parameters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lavi_jax.models.conditioner import NO_ITEM, VisualContext
from lavi_jax.models.decoder import Decoder
from lavi_jax.models.layers import dtype_of
from lavi_jax.models.projector import Projector
from lavi_jax.models.vit import VisionTower

FUSIONS = ("modulation", "concat", "none")


def item_positions(input_ids: jax.Array, image_token_id: int, num_items: int) -> jax.Array:
    """[B, N] sequence index of each row's k-th image placeholder (``NO_ITEM`` when absent)."""
    is_img = input_ids == image_token_id
    rank = jnp.cumsum(is_img, axis=1) - 1
    hit = is_img[:, :, None] & (rank[:, :, None] == jnp.arange(num_items)[None, None, :])  # [B, T, N]
    t = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :, None]
    return jnp.min(jnp.where(hit, t, NO_ITEM), axis=1)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class LaVi(nn.Module):
    config: Any  # config.model

    def setup(self):
        c = self.config
        if c.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {c.fusion!r} (one of {FUSIONS})")
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        modulation = c.fusion == "modulation"
        self.llm = Decoder(c.llm, c.conditioner if modulation else None, dt, pdt, c.scan_layers, c.remat_policy)
        if c.fusion != "none":
            self.vision = VisionTower(c.vision, dt, pdt)
            width = c.conditioner.width if modulation else c.llm.hidden_size
            self.projector = Projector(c.projector, width, "cond_embed" if modulation else "embed", dt, pdt)

    def encode(self, pixel_values: jax.Array):
        """[B, N, F, H, W, 3] -> (projected tokens [B, N, F, P', C], grid)."""
        B, N, F = pixel_values.shape[:3]
        feats = self.vision(pixel_values.reshape((B * N * F,) + pixel_values.shape[3:]))
        return self.projector(feats.reshape((B, N, F) + feats.shape[1:]))

    def __call__(self, input_ids, pixel_values=None, item_mask=None, *, attention_mask=None, position_ids=None,
                 cache=None, cache_index=None, use_visual_cache: bool = False, item_index=None, logits_at=None):
        c = self.config
        B, T = input_ids.shape
        if pixel_values is None and c.fusion != "none" and self.is_initializing():
            # Text-only init still creates every parameter; the dummy item is masked out.
            s = c.vision.image_size
            pixel_values = jnp.zeros((B, 1, 1, s, s, 3), jnp.float32)
            item_mask = jnp.zeros((B, 1, 1), jnp.bool_)
        if pixel_values is not None and item_mask is None:
            item_mask = jnp.ones(pixel_values.shape[:3], jnp.bool_)
        concat = c.fusion == "concat" and pixel_values is not None
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape if cache is None or concat else (B, cache["k"].shape[2]), jnp.int32)
        start = 0 if cache_index is None else cache_index
        query_index = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if position_ids is None:
            position_ids = query_index if cache is not None else default_positions(attention_mask)
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, query_index=query_index,
                  cache=cache, cache_index=cache_index)

        if concat:
            return self._concat(input_ids, pixel_values, item_mask, attention_mask, cache, cache_index, logits_at)
        visual = None
        if c.fusion == "modulation" and use_visual_cache:
            visual = VisualContext(None, None, query_index)
        elif c.fusion == "modulation" and pixel_values is not None:
            tokens, grid = self.encode(pixel_values)
            if item_index is None:
                pos, offset = item_positions(input_ids, c.image_token_id, pixel_values.shape[1]), start
            else:
                pos, offset = item_index, 0
            key_index = jnp.where(item_mask & (pos < NO_ITEM)[:, :, None], pos[:, :, None] + offset, NO_ITEM)
            visual = VisualContext(tokens, key_index.astype(jnp.int32), query_index, grid)
        return self.llm(input_ids, visual=visual, logits_at=logits_at, **kw)

    def _concat(self, input_ids, pixel_values, item_mask, attention_mask, cache, cache_index, logits_at):
        """LLaVA-style: splice each item's visual tokens in place of its placeholder."""
        c = self.config
        B, T = input_ids.shape
        N = pixel_values.shape[1]
        tokens, _ = self.encode(pixel_values)  # [B, N, F, P, D]
        F, P = tokens.shape[2:4]
        L = F * P
        visual = tokens.reshape(B, N, L, -1)
        is_img = input_ids == c.image_token_id
        is_img &= (jnp.cumsum(is_img, axis=1) - 1) < N
        extra = jnp.where(is_img, L - 1, 0)
        start = jnp.arange(T)[None, :] + jnp.cumsum(extra, axis=1) - extra  # where token t lands
        end = start + extra
        T_out = T + N * (L - 1)
        rows = jnp.arange(B)[:, None]

        text = self.llm.embed(input_ids)
        embeds = jnp.zeros((B, T_out, text.shape[-1]), text.dtype).at[rows, start].set(text)
        mask = jnp.zeros((B, T_out), jnp.int32).at[rows, start].set(attention_mask.astype(jnp.int32))
        pos = item_positions(input_ids, c.image_token_id, N)  # [B, N]
        present = pos < NO_ITEM
        item_start = jnp.take_along_axis(start, jnp.where(present, pos, 0), axis=1)
        slots = jnp.where(present[:, :, None], item_start[:, :, None] + jnp.arange(L)[None, None, :], T_out)  # OOB -> dropped
        frame_ok = jnp.repeat(item_mask, P, axis=2) & present[:, :, None]
        placeholder_ok = jnp.take_along_axis(attention_mask.astype(jnp.bool_), jnp.where(present, pos, 0), axis=1)
        embeds = embeds.at[rows[:, :, None], slots].set(visual.astype(embeds.dtype), mode="drop")
        mask = mask.at[rows[:, :, None], slots].set((frame_ok & placeholder_ok[:, :, None]).astype(jnp.int32), mode="drop")
        if self.is_mutable_collection("visual_cache"):
            self.put_variable("visual_cache", "concat_mask", mask)
        llm_mask = mask
        if cache is not None:  # keys past the prefix are later decode steps (hidden by causality here)
            llm_mask = jnp.pad(mask, ((0, 0), (0, cache["k"].shape[2] - T_out)), constant_values=1)
        at = end if logits_at is None else jnp.take_along_axis(end, logits_at, axis=1)  # text -> expanded positions
        return self.llm(inputs_embeds=embeds, attention_mask=llm_mask, position_ids=default_positions(mask),
                        cache=cache, cache_index=cache_index, logits_at=at)
