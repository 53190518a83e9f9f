"""LLaVA records -> model examples (tokens, loss mask, preprocessed images / video frames).

A record is ``{"id", "image": str | [str], "video": str | [str], "conversations": [...]}``
with media paths relative to an image root. Each ``<image>`` tag (``<video>``
is read as ``<image>``) opens one visual item, in order: the record's images,
then its videos. A record with media but no tag gets one ``<image>\\n`` per
item prepended to its first human turn (the LLaVA convention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lavi_jax.data.anyres import AnyresProcessor
from lavi_jax.data.bad_records import BadRecord
from lavi_jax.data.image_processor import ImageProcessor
from lavi_jax.data.media import MediaLoader, media_items
from lavi_jax.data.records import parse_record
from lavi_jax.data.tokenizer import IMAGE_TOKEN, Tokenizer


def prepare_conversation(conversation: Any, num_items: int) -> list[dict[str, str]]:
    """Validates LLaVA turns and reconciles ``<image>`` tags with ``num_items``."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("empty or missing conversation")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be an object with a string value")
        turns.append({"from": turn.get("from"), "value": turn["value"].replace("<video>", IMAGE_TOKEN)})
    if not any(t["from"] in ("gpt", "assistant") for t in turns):
        raise ValueError("conversation has no assistant turn")
    if any(IMAGE_TOKEN in t["value"] for t in turns if t["from"] in ("gpt", "assistant")):
        raise ValueError(f"{IMAGE_TOKEN} in an assistant turn")
    tags = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if tags == 0 and num_items:
        first = next((t for t in turns if t["from"] in ("human", "user")), None)
        if first is None:
            raise ValueError("conversation has no human turn for the image tag")
        first["value"] = f"{IMAGE_TOKEN}\n" * num_items + first["value"]
    elif tags != num_items:
        raise ValueError(f"{tags} {IMAGE_TOKEN} tags for {num_items} images/videos")
    return turns


@dataclasses.dataclass
class ExampleBuilder:
    """Callable ``(index, record) -> example | BadRecord``; never raises for bad data.

    Example: ``input_ids`` int32 [T], ``loss_mask`` int32 [T] (1 on assistant
    tokens), ``pixel_values`` float32 [N_items, num_frames, H, W, 3] with
    N_items <= ``max_images`` actual items, ``item_mask`` bool [N_items,
    num_frames] (an image fills frame 0; a short video its first frames),
    ``index`` (the record's position in the file). With an anyres processor an
    image item is its whole image plus crops (``1 + max_crops`` frames) and the
    example adds ``image_sizes`` int32 [N_items, 2].
    """

    tokenizer: Tokenizer
    image_processor: ImageProcessor | AnyresProcessor
    image_root: str
    max_images: int
    num_frames: int
    max_length: int
    max_image_pixels: int | None = None

    def __post_init__(self):
        self.media = MediaLoader(self.image_processor, self.num_frames, self.image_root, self.max_image_pixels)

    def __call__(self, index: int, record: Any) -> dict[str, Any] | BadRecord:
        record_id = f"#{index}"
        try:
            record = parse_record(record)
            if "id" in record:
                record_id = str(record["id"])
            return self.build(index, record)
        except MemoryError:
            raise
        except Exception as e:  # any failure of one record makes it a bad record
            return BadRecord(index=index, id=record_id, reason=f"{type(e).__name__}: {e}")

    def build(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        """Like ``__call__`` but raises on bad data."""
        items = self.media.resolve(media_items(record))
        if len(items) > self.max_images:
            raise ValueError(f"{len(items)} images/videos, more than max_images={self.max_images}")
        turns = prepare_conversation(record.get("conversations"), len(items))
        input_ids, loss_mask = self.tokenizer.encode_conversation(turns)
        if len(input_ids) > self.max_length:
            raise ValueError(f"{len(input_ids)} tokens, longer than the largest bucket ({self.max_length})")
        if not loss_mask.any():
            raise ValueError("no assistant tokens after tokenisation")
        pixel_values, item_mask, image_sizes = self.media.load_all(items)
        example = {
            "input_ids": input_ids.astype(np.int32),
            "loss_mask": loss_mask.astype(np.int32),
            "pixel_values": pixel_values,
            "item_mask": item_mask,
            "index": index,
        }
        if self.media.anyres:
            example["image_sizes"] = image_sizes
        return example
