"""The batch layout, in one place: keys, ranks, dtypes and shapes of what the model is fed.

Per-process numpy batches (collator), global jax arrays (train step, eval) and
abstract shapes (dry run) all come from :class:`BatchSpec`. For B rows of T tokens:

* ``input_ids`` int32 [B, T]: right-padded with the tokenizer's pad id.
* ``attention_mask`` int32 [B, T]: 1 on real tokens, 0 on padding.
* ``loss_mask`` float32 [B, T]: aligned to TARGET positions. ``loss_mask[b, t]
  = 1`` means token ``input_ids[b, t]`` is an assistant token, predicted from
  position ``t - 1``; the next-token loss is
  ``CE(logits[:, :-1], input_ids[:, 1:])`` weighted by ``loss_mask[:, 1:]``.
  ``loss_mask[:, 0]`` is always 0.
* ``pixel_values`` float32 [B, N_items, N_frames, H, W, 3]: zeros where unused.
* ``item_mask`` bool [B, N_items, N_frames]: True on real frames. An image is
  an item of one frame (frame 0); padded items are all False.

With anyres (``config.model.anyres.enabled``) an image item is its whole image
(frame 0) plus its crops (frames 1..C, row-major), N_frames is
``max(num_frames, 1 + max_crops)``, and the batch adds

* ``image_sizes`` int32 [B, N_items, 2]: each image's original (height, width);
  (0, 0) for videos and padded items.

Packed rows (``config.data.packing``, see ``packing``) add, per token:

* ``segment_ids`` int32 [B, T]: 1, 2, ... for the row's conversations in order, 0 on padding.
* ``positions`` int32 [B, T]: position ids restarting at 0 at each segment's first token.

and ``loss_mask`` is 0 at every segment's first token. The k-th ``<image>`` of a
row is item k of the row, and N_items is the visual budget per row.

A text-only model (``fusion="none"``) takes no ``pixel_values`` / ``item_mask``.
Evaluation batches add ``valid`` bool [B] and ``index`` int32 [B] on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

TEXT_FIELDS = {"input_ids": np.int32, "attention_mask": np.int32, "loss_mask": np.float32}
PACKED_FIELDS = {"segment_ids": np.int32, "positions": np.int32}
VISUAL_FIELDS = {"pixel_values": np.float32, "item_mask": np.bool_}


def item_frames(config) -> int:
    """N_frames of a run config: ``data.num_frames``, or ``max(that, 1 + max_crops)`` with anyres."""
    anyres = config.model.get("anyres")
    frames = int(config.data.num_frames)
    return max(frames, 1 + int(anyres.max_crops)) if anyres is not None and anyres.enabled else frames


def bucket_length(length: int, buckets: Sequence[int] | None, *, beyond: str = "error") -> int:
    """The smallest bucket >= ``length``.

    Past the largest bucket: ``beyond="error"`` raises ``ValueError`` (training
    data), ``"multiple"`` rounds up to a multiple of the largest (prompts at
    inference). No buckets: ``length`` itself.
    """
    if not buckets:
        return length
    fitting = [b for b in buckets if b >= length]
    if fitting:
        return min(fitting)
    top = max(buckets)
    if beyond == "multiple":
        return -(-length // top) * top
    raise ValueError(f"length {length} exceeds the largest bucket {top}")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Shapes and dtypes of one batch of ``batch_size`` rows of ``seq_len`` tokens."""

    batch_size: int
    seq_len: int
    max_items: int = 1
    num_frames: int = 1
    image_size: tuple[int, int] = (0, 0)
    visual: bool = True  # False for a text-only model: no pixel_values / item_mask
    packed: bool = False  # True for packed rows: segment_ids / positions
    anyres: bool = False  # True with anyres tiling: image_sizes

    @classmethod
    def from_config(cls, config, batch_size: int, seq_len: int | None = None,
                    packed: bool | None = None) -> "BatchSpec":
        """The training batch of a run config (``seq_len`` default: the largest bucket).

        ``packed`` defaults to ``config.data.packing``; pass False for evaluation batches.
        """
        d, m = config.data, config.model
        packed = bool(d.get("packing", False)) if packed is None else packed
        anyres = m.get("anyres")
        items = int(d.get("pack_max_images", 0) or d.max_images) if packed else int(d.max_images)  # per row / sample
        return cls(batch_size=int(batch_size), seq_len=int(seq_len or max(d.seq_buckets)), max_items=items,
                   num_frames=item_frames(config), image_size=(int(d.image_size), int(d.image_size)),
                   visual=m.fusion != "none", packed=packed, anyres=anyres is not None and bool(anyres.enabled))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{key: (shape, dtype)}`` of every field the model takes."""
        B, T = self.batch_size, self.seq_len
        out = {k: ((B, T), np.dtype(dt)) for k, dt in TEXT_FIELDS.items()}
        if self.packed:
            out.update({k: ((B, T), np.dtype(dt)) for k, dt in PACKED_FIELDS.items()})
        if self.visual:
            h, w = self.image_size
            out["pixel_values"] = ((B, self.max_items, self.num_frames, h, w, 3), np.dtype(np.float32))
            out["item_mask"] = ((B, self.max_items, self.num_frames), np.dtype(np.bool_))
            if self.anyres:
                out["image_sizes"] = ((B, self.max_items, 2), np.dtype(np.int32))
        return out

    def keys(self) -> tuple[str, ...]:
        return tuple(self.shapes())

    def zeros(self, pad_id: int = 0) -> dict[str, np.ndarray]:
        """An empty host batch: ``input_ids`` filled with ``pad_id``, everything else zero."""
        out = {k: np.zeros(shape, dt) for k, (shape, dt) in self.shapes().items()}
        out["input_ids"][:] = pad_id
        return out

