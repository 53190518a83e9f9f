"""Where visual items sit in a token sequence: placeholder positions and the concat fusion's splice layout.

Row b's k-th ``image_token_id`` is item k's placeholder. For ``fusion="concat"``
each placeholder of the first N items is replaced by its item's L = F * P
visual tokens (F frames of P tokens each), so a row of T tokens becomes
``T_out = T + N * (L - 1)`` tokens (rows with fewer placeholders leave masked
slots at the end). Items with a variable number of tokens (anyres) take L
slots each, their valid tokens first; the masked rest neither attends nor
counts for positions, so the valid tokens form the sequence HF builds. The layout depends on shapes and token ids only, so the
generator computes it without running the model.

A packed row (``segment_ids`` [B, T]: 1, 2, ... per packed sequence, 0 on
padding) keeps its segments in the expanded sequence: every expanded slot
belongs to the text token whose span holds it (visual tokens to their
placeholder), and positions restart at each segment's first token
(:func:`segment_positions`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from lavi_jax.models.conditioner import NO_ITEM


def item_positions(input_ids: jax.Array, image_token_id: int, num_items: int) -> jax.Array:
    """[B, N] sequence index of each row's k-th image placeholder (``NO_ITEM`` when absent)."""
    is_img = input_ids == image_token_id
    rank = jnp.cumsum(is_img, axis=1) - 1
    hit = is_img[:, :, None] & (rank[:, :, None] == jnp.arange(num_items)[None, None, :])  # [B, T, N]
    t = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :, None]
    return jnp.min(jnp.where(hit, t, NO_ITEM), axis=1)


@struct.dataclass
class SpliceLayout:
    """Where the tokens of a [B, T] row land in the expanded [B, T_out] sequence.

    text_slot: [B, T] int32 expanded index of each token (a placeholder: its item's first visual token).
    text_last: [B, T] int32 last expanded index of each token's span (a placeholder: its item's last
        visual token); the logits of token t are read there.
    visual_slot: [B, N, L] int32 expanded index of each visual token of item k; ``length`` (out of
        range, dropped by scatters) for items without a placeholder.
    mask: [B, T_out] int32 expanded attention mask: text tokens keep theirs; a visual token is valid
        iff its frame (``item_mask``) and its placeholder are.
    length: T_out (static).
    """

    text_slot: jax.Array
    text_last: jax.Array
    visual_slot: jax.Array
    mask: jax.Array
    length: int = struct.field(pytree_node=False)


def spliced_length(seq_len: int, num_items: int, num_frames: int, tokens_per_frame: int) -> int:
    """T_out = T + N * (F * P - 1)."""
    return seq_len + num_items * (num_frames * tokens_per_frame - 1)


def splice_layout(input_ids: jax.Array, attention_mask: jax.Array, item_mask: jax.Array, image_token_id: int,
                  tokens_per_frame: int, token_mask: jax.Array | None = None) -> SpliceLayout:
    """The concat layout of ``input_ids`` [B, T] with ``attention_mask`` [B, T] and ``item_mask`` [B, N, F].

    ``token_mask`` bool [B, N, L] (items of a variable number of tokens, valid ones first) replaces the
    fixed F * P tokens per item: item k spans L slots, its valid tokens first, and a placeholder's logits
    are read at its item's last valid token.
    """
    B, T = input_ids.shape
    N, F = item_mask.shape[1:]
    L = F * tokens_per_frame if token_mask is None else token_mask.shape[2]
    T_out = T + N * (L - 1)
    is_img = input_ids == image_token_id
    is_img &= (jnp.cumsum(is_img, axis=1) - 1) < N  # placeholders past the N-th stay text
    extra = jnp.where(is_img, L - 1, 0)
    start = jnp.arange(T, dtype=jnp.int32)[None, :] + jnp.cumsum(extra, axis=1) - extra
    rows = jnp.arange(B)[:, None]
    valid = attention_mask.astype(jnp.int32)
    mask = jnp.zeros((B, T_out), jnp.int32).at[rows, start].set(valid)

    pos = item_positions(input_ids, image_token_id, N)
    present = pos < NO_ITEM
    safe = jnp.where(present, pos, 0)
    item_start = jnp.take_along_axis(start, safe, axis=1)
    slots = jnp.where(present[:, :, None], item_start[:, :, None] + jnp.arange(L)[None, None, :], T_out)
    frame_ok = jnp.repeat(item_mask, tokens_per_frame, axis=2) if token_mask is None else token_mask.astype(jnp.bool_)
    frame_ok &= present[:, :, None]
    placeholder_ok = jnp.take_along_axis(valid.astype(jnp.bool_), safe, axis=1)
    mask = mask.at[rows[:, :, None], slots].set((frame_ok & placeholder_ok[:, :, None]).astype(jnp.int32), mode="drop")
    last = start + extra
    if token_mask is not None:  # a placeholder's span ends at its item's last valid token
        count = jnp.sum(token_mask, axis=2, dtype=jnp.int32)  # [B, N]
        item_last = item_start + jnp.maximum(count, 1) - 1
        rank = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, N - 1)
        last = jnp.where(is_img, jnp.take_along_axis(item_last, rank, axis=1), last)
    return SpliceLayout(start, last, slots.astype(jnp.int32), mask, T_out)


def concat_layout(model_cfg, input_ids: jax.Array, attention_mask: jax.Array, item_mask: jax.Array,
                  image_sizes: jax.Array | None = None) -> SpliceLayout:
    """The concat layout of a ``config.model`` (anyres items take ``image_sizes`` [B, N, 2]), from shapes,
    token ids and geometry alone (what the generator needs before running the model)."""
    from lavi_jax.models import anyres
    from lavi_jax.models.projector import tokens_per_frame

    P = tokens_per_frame(model_cfg)
    token_mask = None
    if anyres.enabled(model_cfg):
        if image_sizes is None:
            raise ValueError("an anyres model (config.model.anyres.enabled) needs image_sizes [B, N, 2]")
        token_mask = anyres.concat_token_mask(model_cfg, item_mask, image_sizes, P)
    return splice_layout(input_ids, attention_mask, item_mask, model_cfg.image_token_id, P, token_mask)


def splice(text: jax.Array, visual: jax.Array, layout: SpliceLayout) -> jax.Array:
    """Text embeddings [B, T, D] and visual tokens [B, N, L, D] -> the expanded sequence [B, T_out, D]."""
    B, _, D = text.shape
    rows = jnp.arange(B)[:, None]
    out = jnp.zeros((B, layout.length, D), text.dtype).at[rows, layout.text_slot].set(text)
    return out.at[rows[:, :, None], layout.visual_slot].set(visual.astype(out.dtype), mode="drop")


def segment_positions(segment_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] int32 position ids counting ``mask``-valid tokens from 0 within each contiguous segment.

    With ``segment_ids == mask`` this is ``max(cumsum(mask) - 1, 0)`` at every real token (the unpacked
    default); a position whose segment holds no valid token before it gets 0.
    """
    valid = mask.astype(jnp.int32)
    count = jnp.cumsum(valid, axis=1)
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    base = jax.lax.cummax(jnp.where(start, count - valid, 0), axis=1)  # valid tokens before the segment
    return jnp.maximum(count - 1 - base, 0).astype(jnp.int32)


def splice_segments(segment_ids: jax.Array, layout: SpliceLayout) -> jax.Array:
    """Segment ids [B, T] of a packed row -> [B, T_out]: each expanded slot takes its text token's segment."""
    B, T = segment_ids.shape
    rows = jnp.arange(B)[:, None]
    owner = jnp.zeros((B, layout.length), jnp.int32).at[rows, layout.text_slot].set(jnp.arange(T, dtype=jnp.int32))
    return jnp.take_along_axis(segment_ids.astype(jnp.int32), jax.lax.cummax(owner, axis=1), axis=1)
