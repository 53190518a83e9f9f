"""Padding examples into batches of static shapes (sequence-length buckets).

The layout is :class:`lavi_jax.data.batch.BatchSpec`. T is the smallest bucket
in ``seq_buckets`` that fits the longest example of the batch (or always the
largest bucket with ``pad_to_max_bucket``), so a training run compiles at most
``len(seq_buckets)`` shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from lavi_jax.data.batch import BatchSpec, bucket_length


@dataclasses.dataclass(frozen=True)
class Collator:
    """``batch_fn`` turning a list of examples into one padded batch.

    With ``eval_mode`` the batch also holds ``valid`` bool [B] (False on
    padding examples) and ``index`` int32 [B] (record index, -1 on padding).
    With ``anyres`` it also holds ``image_sizes`` int32 [B, N_items, 2].
    """

    seq_buckets: tuple[int, ...]
    max_images: int
    num_frames: int
    image_size: tuple[int, int]
    pad_id: int
    pad_to_max_bucket: bool = False
    eval_mode: bool = False
    anyres: bool = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        longest = max(len(e["input_ids"]) for e in examples)
        seq_len = bucket_length(max(self.seq_buckets) if self.pad_to_max_bucket else longest, self.seq_buckets)
        spec = BatchSpec(len(examples), seq_len, self.max_images, self.num_frames, tuple(self.image_size),
                         anyres=self.anyres)
        batch = spec.zeros(self.pad_id)
        for b, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][b, :length] = example["input_ids"]
            batch["attention_mask"][b, :length] = 1
            batch["loss_mask"][b, :length] = example["loss_mask"]
            if example["item_mask"].size:
                items, frames = example["item_mask"].shape
                batch["pixel_values"][b, :items, :frames] = example["pixel_values"]
                batch["item_mask"][b, :items, :frames] = example["item_mask"]
                if self.anyres and "image_sizes" in example:
                    batch["image_sizes"][b, :items] = example["image_sizes"]
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
