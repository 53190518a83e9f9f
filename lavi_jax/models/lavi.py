"""The whole model: vision tower -> projector -> LLM, fused by modulation (LaVi), concatenation (LLaVA) or not at all.

Call contract::

    logits = LaVi(config.model).apply({"params": params}, input_ids,
                                     pixel_values=pix, item_mask=mask)   # [B, T, vocab], float32

``input_ids`` int32 [B, T]; each ``image_token_id`` opens a visual item (the
k-th placeholder of a row is item k). ``pixel_values`` float [B, N, F, H, W, 3]
(channels last, processor-normalised), ``item_mask`` bool [B, N, F] (an image
is an item with one valid frame). Items without a placeholder in their row are
ignored. ``attention_mask`` [B, T] marks real tokens; ``position_ids`` default
to ``cumsum(attention_mask) - 1``. ``logits_at`` [B, T'] returns logits only at
those text positions (the final norm and LM head run on T' tokens), e.g. the
last prompt token when prefilling.

Packed rows (training) add ``segment_ids`` [B, T] (1, 2, ... for the packed
sequences of a row in order, 0 on padding) and pass ``position_ids`` restarting
at 0 in each segment (default: :func:`~lavi_jax.models.splice.segment_positions`).
Attention is causal within a segment and blind across segments, and a token
sees only its own segment's items. For concat fusion the expanded sequence's
segments and positions follow from the layout (``position_ids`` are not used).
Packed calls take no cache.

Cached decoding (see :mod:`lavi_jax.generate`) goes through one method,
``model.apply(variables, input_ids, ..., method=LaVi.forward)``, which takes
the same arguments plus ``cache`` / ``cache_index`` / ``use_visual_cache`` and
always returns a :class:`~lavi_jax.models.decoder.DecoderOutput` (``logits``,
``hidden``, and the updated ``cache`` when one is given); ``__call__`` is
``forward(...).logits`` without a cache. With a cache, this chunk's keys and
values are written at ``cache_index`` and ``attention_mask`` covers the cache's
S keys; for a concat call with ``pixel_values`` it covers the T text tokens
and the expanded prefix (:func:`lavi_jax.models.splice.splice_layout`) is
written at index 0. With the ``visual_cache`` collection mutable, the
conditioners store what decoding needs (the items' placeholder indices, the
visual keys/values per conditioner or per ``kv_share`` group, the mlp / conv
summaries); with ``use_visual_cache=True`` they are read back instead of
running the vision tower. The [B, T, S] visibility mask is built once per call.

* ``fusion="modulation"``: every modulated RMSNorm of the LLM receives deltas
  from its conditioner; text token t sees item k iff item k's placeholder sits
  at or before t, so interleaved images and cached decoding are causal.
* ``fusion="concat"``: each placeholder is replaced by its item's visual tokens
  projected to the LLM width. Logits are returned at the text positions only
  ([B, T, vocab]; a placeholder's logits are those of its item's last visual
  token), so the two fusions are interchangeable for losses and evaluation.
* ``fusion="none"``: a text-only LLM (no vision parameters).

With ``config.anyres.enabled``, ``image_sizes`` int32 [B, N, 2] gives each image
item's original (height, width) ((0, 0) for videos and padding); an image item's
frames are its whole image and its crops (:mod:`lavi_jax.models.anyres`).
With modulation this is LaVi-HD: the conditioners see every tile, and with
``anyres.tile_embedding="grid"`` the projector adds a learned tile-position
embedding (whole image; crop row + column, from ``image_sizes``) in place of the
temporal one on image items (see :mod:`lavi_jax.models.projector`).

The module holds ``config`` as an immutable ``FrozenConfigDict``: changing the
caller's ConfigDict afterwards does not change a built model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from lavi_jax.data.anyres import max_grid
from lavi_jax.models.conditioner import NO_ITEM, VisualContext, VisualKV, kv_share_groups, visible_mask
from lavi_jax.models.decoder import Decoder, DecoderOutput, modulated_layers, query_indices
from lavi_jax.models.layers import dtype_of
from lavi_jax.models.projector import Projector, tokens_per_frame
from lavi_jax.models import anyres
from lavi_jax.models.splice import (concat_layout, item_positions, segment_positions, splice, splice_layout,
                                    splice_segments)
from lavi_jax.models.vit import VisionTower

FUSIONS = ("modulation", "concat", "none")


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """[B, T] position ids ``cumsum(attention_mask) - 1`` (0 before a row's first real token)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class LaVi(nn.Module):
    config: Any  # config.model, frozen on construction

    def __post_init__(self):
        if not isinstance(self.config, FrozenConfigDict):
            object.__setattr__(self, "config", FrozenConfigDict(self.config))
        super().__post_init__()

    def setup(self):
        c = self.config
        if c.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {c.fusion!r} (one of {FUSIONS})")
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        modulation = c.fusion == "modulation"
        self.llm = Decoder(c.llm, c.conditioner if modulation else None, dt, pdt, c.scan_layers, c.remat_policy,
                           c.get("attention", "auto"))  # configs saved before the knob existed lack it
        if c.fusion != "none":
            self.vision = VisionTower(c.vision, dt, pdt, c.get("attention", "auto"))
            if c.projector.get("video_pool", 1) > 1 and (not modulation or anyres.enabled(c)):
                raise ValueError(f"projector.video_pool={c.projector.video_pool} pools items of several frames, which "
                                 "only modulation without anyres reads as videos (fusion="
                                 f"{c.fusion!r}, anyres.enabled={anyres.enabled(c)})")
            anyres.validate(c)
            if c.fusion == "concat" and anyres.enabled(c) and c.anyres.newline:
                init = nn.initializers.normal(c.llm.hidden_size**-0.5)  # HF's initialisation
                self.image_newline = self.param("image_newline", nn.with_logical_partitioning(init, ("embed",)),
                                                (c.llm.hidden_size,), pdt)
            width = c.conditioner.width if modulation else c.llm.hidden_size
            tile_grid = max_grid(c.anyres.pinpoints, c.vision.image_size) if self._hd else (0, 0)
            self.projector = Projector(c.projector, width, "cond_embed" if modulation else "embed", dt, pdt, tile_grid)
        if modulation:
            groups = self._kv_groups
            if c.scan_layers and len(set(groups.values())) > 1:
                raise ValueError(f"conditioner.kv_share={c.conditioner.get('kv_share')!r} gives several K/V groups, which "
                                 "scan_layers=True cannot tell apart; use kv_share='all' or scan_layers=False")
            self.conditioner_kv = VisualKV(c.conditioner, len(set(groups.values())), dt, pdt)

    @property
    def _kv_groups(self) -> dict:
        """Modulated layer (None: the final norm) -> its shared visual K/V group (``{}``: each norm its own)."""
        c = self.config
        return kv_share_groups(c.conditioner, modulated_layers(c.conditioner, c.llm.num_layers))

    @property
    def _hd(self) -> bool:
        """LaVi-HD: modulation over anyres tiles with the grid tile-position embedding."""
        c, a = self.config, self.config.get("anyres")
        return c.fusion == "modulation" and a is not None and bool(a.enabled) and a.tile_embedding == "grid"

    def encode(self, pixel_values: jax.Array, tile_cols: jax.Array | None = None):
        """[B, N, F, H, W, 3] -> (projected tokens [B, N, F, P', C], grid); ``tile_cols`` [B, N] (LaVi-HD):
        crop-grid columns of each anyres image item, 0 for videos and padding."""
        B, N, F = pixel_values.shape[:3]
        feats = self.vision(pixel_values.reshape((B * N * F,) + pixel_values.shape[3:]))
        return self.projector(feats.reshape((B, N, F) + feats.shape[1:]), tile_cols)

    def __call__(self, input_ids, pixel_values=None, item_mask=None, *, attention_mask=None, position_ids=None,
                 logits_at=None, segment_ids=None, image_sizes=None) -> jax.Array:
        """Logits [B, T, vocab] float32 ([B, T', vocab] with ``logits_at``)."""
        return self.forward(input_ids, pixel_values, item_mask, attention_mask=attention_mask,
                            position_ids=position_ids, logits_at=logits_at, segment_ids=segment_ids,
                            image_sizes=image_sizes).logits

    def forward(self, input_ids, pixel_values=None, item_mask=None, *, attention_mask=None, position_ids=None,
                cache=None, cache_index=None, use_visual_cache: bool = False, logits_at=None,
                segment_ids=None, image_sizes=None, logits: bool = True) -> DecoderOutput:
        """The full output: logits and hidden at the text positions, and the updated KV cache when given;
        ``logits=False`` skips the LM head (``logits`` None: :meth:`head` applies it, e.g. chunk by chunk)."""
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
        if concat:
            return self._concat(input_ids, pixel_values, item_mask, attention_mask, cache, cache_index, logits_at,
                                segment_ids, image_sizes, logits)

        query_index = query_indices(cache_index, B, T)
        start = query_index[:, :1, None]  # [B, 1, 1] each row's first index (per row when continuously batched)
        if position_ids is None and segment_ids is not None:
            position_ids = segment_positions(segment_ids, attention_mask)
        elif position_ids is None:
            position_ids = query_index if cache is not None else default_positions(attention_mask)
        visual = None
        if c.fusion == "modulation" and use_visual_cache:
            key_index, kv = self.conditioner_kv(None)
            visible = visible_mask(key_index, query_index, tokens_per_frame(c, key_index.shape[2]))
            visual = VisualContext(None, key_index, query_index, visible=visible, kv=kv or None,
                                   kv_group=tuple(self._kv_groups.items()))
        elif c.fusion == "modulation" and pixel_values is not None:
            tile_cols = None
            if self._hd and image_sizes is None and not self.is_initializing():
                raise ValueError("LaVi-HD (anyres tiles with tile_embedding='grid') needs image_sizes int32 [B, N, 2] "
                                 "(each item's original (height, width), (0, 0) for videos): without it the crops "
                                 "would get the wrong tile-position embedding")
            if self._hd and image_sizes is not None:  # the crop grid of each image item sets its tiles' positions
                _, cols = anyres.best_grid(image_sizes, c.anyres.pinpoints, c.vision.image_size)
                tile_cols = jnp.where(image_sizes[..., 0] > 0, cols, 0)
            tokens, grid = self.encode(pixel_values, tile_cols)
            pos = item_positions(input_ids, c.image_token_id, pixel_values.shape[1])
            key_index = jnp.where(item_mask & (pos < NO_ITEM)[:, :, None], pos[:, :, None] + start, NO_ITEM)
            key_segment = query_segment = None
            if segment_ids is not None:  # an item belongs to its placeholder's segment
                query_segment = segment_ids.astype(jnp.int32)
                placeholder = jnp.take_along_axis(query_segment, jnp.where(pos < NO_ITEM, pos, 0), axis=1)  # [B, N]
                key_segment = jnp.broadcast_to(placeholder[:, :, None], key_index.shape)
            key_index, kv = self.conditioner_kv(tokens, key_index.astype(jnp.int32))
            visible = visible_mask(key_index, query_index, tokens.shape[3], key_segment, query_segment)
            visual = VisualContext(tokens, key_index, query_index, grid, key_segment, query_segment, visible,
                                   kv or None, tuple(self._kv_groups.items()))
        return self.llm(input_ids, visual=visual, logits_at=logits_at, attention_mask=attention_mask,
                        position_ids=position_ids, query_index=query_index, cache=cache, cache_index=cache_index,
                        segment_ids=segment_ids, logits=logits)

    def head(self, hidden: jax.Array) -> jax.Array:
        """The LM head on ``forward(...).hidden`` [B, T, D] -> logits [B, T, vocab] float32."""
        return self.llm.head(hidden)

    def _concat(self, input_ids, pixel_values, item_mask, attention_mask, cache, cache_index, logits_at,
                segment_ids=None, image_sizes=None, logits=True):
        """LLaVA-style: splice each item's visual tokens in place of its placeholder."""
        c = self.config
        B, N = pixel_values.shape[:2]
        tokens, _ = self.encode(pixel_values)  # [B, N, F, P, D]
        P = tokens_per_frame(c)
        if tokens.shape[3] != P:
            raise ValueError(f"the projector returned {tokens.shape[3]} tokens per frame, the config gives {P}")
        if anyres.enabled(c):
            if image_sizes is None and self.is_initializing():
                image_sizes = jnp.zeros((B, N, 2), jnp.int32)
            if image_sizes is None:
                raise ValueError("anyres concat needs image_sizes int32 [B, N, 2] (each item's original "
                                 "(height, width), (0, 0) for videos) to lay out its crops")
            layout = concat_layout(c, input_ids, attention_mask, item_mask, image_sizes)
            tokens, _ = anyres.concat_tokens(c, tokens, item_mask, image_sizes, self.image_newline if c.anyres.newline else None)
        else:
            layout = splice_layout(input_ids, attention_mask, item_mask, c.image_token_id, P)
        embeds = splice(self.llm.embed(input_ids), tokens.reshape(B, N, -1, tokens.shape[-1]), layout)
        llm_mask = layout.mask
        if cache is not None:  # keys past the prefix are later decode steps (hidden by causality here)
            llm_mask = jnp.pad(llm_mask, ((0, 0), (0, cache["k"].shape[2] - layout.length)), constant_values=1)
        at = layout.text_last if logits_at is None else jnp.take_along_axis(layout.text_last, logits_at, axis=1)
        segments, positions = None, default_positions(layout.mask)
        if segment_ids is not None:
            segments = splice_segments(segment_ids, layout)
            positions = segment_positions(segments, layout.mask)
        return self.llm(inputs_embeds=embeds, attention_mask=llm_mask, position_ids=positions,
                        cache=cache, cache_index=cache_index, logits_at=at, segment_ids=segments, logits=logits)
