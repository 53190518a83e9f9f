"""Padding examples into batches of static shapes (sequence-length buckets).

Batch contract (numpy, per-process local batch of B examples):

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

T is the smallest bucket in ``seq_buckets`` that fits the longest example of
the batch (or always the largest bucket with ``pad_to_max_bucket``), so a
training run compiles at most ``len(seq_buckets)`` shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def select_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")
    return min(fitting)


@dataclasses.dataclass(frozen=True)
class Collator:
    """``batch_fn`` turning a list of examples into one padded batch.

    With ``eval_mode`` the batch also holds ``valid`` bool [B] (False on
    padding examples) and ``index`` int32 [B] (record index, -1 on padding).
    """

    seq_buckets: tuple[int, ...]
    max_images: int
    num_frames: int
    image_size: tuple[int, int]
    pad_id: int
    pad_to_max_bucket: bool = False
    eval_mode: bool = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        longest = max(len(e["input_ids"]) for e in examples)
        seq_len = max(self.seq_buckets) if self.pad_to_max_bucket else select_bucket(longest, self.seq_buckets)
        if longest > seq_len:
            raise ValueError(f"example of {longest} tokens exceeds the largest bucket {seq_len}")
        size = len(examples)
        height, width = self.image_size
        batch = {
            "input_ids": np.full((size, seq_len), self.pad_id, np.int32),
            "attention_mask": np.zeros((size, seq_len), np.int32),
            "loss_mask": np.zeros((size, seq_len), np.float32),
            "pixel_values": np.zeros((size, self.max_images, self.num_frames, height, width, 3), np.float32),
            "item_mask": np.zeros((size, self.max_images, self.num_frames), bool),
        }
        for b, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][b, :length] = example["input_ids"]
            batch["attention_mask"][b, :length] = 1
            batch["loss_mask"][b, :length] = example["loss_mask"]
            if example["item_mask"].size:
                items, frames = example["item_mask"].shape
                batch["pixel_values"][b, :items, :frames] = example["pixel_values"]
                batch["item_mask"][b, :items, :frames] = example["item_mask"]
        batch["loss_mask"][:, 0] = 0.0
        if self.eval_mode:
            batch["valid"] = np.asarray([e.get("valid", True) for e in examples], bool)
            batch["index"] = np.asarray([e["index"] if e.get("valid", True) else -1 for e in examples], np.int32)
        return batch


def pad_batch(batch: dict[str, np.ndarray], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pads the [B, T] arrays of ``batch`` to ``seq_len``.

    For multi-process training with per-batch buckets: the processes agree on
    the largest local T (e.g. with ``multihost_utils.process_allgather``) and
    each pads its batch to it before ``jax.make_array_from_process_local_data``.
    """
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("loss_mask", 0)):
        array = batch[key]
        extra = seq_len - array.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {key} of length {array.shape[1]} to {seq_len}")
        out[key] = np.pad(array, ((0, 0), (0, extra)), constant_values=fill)
    return out
