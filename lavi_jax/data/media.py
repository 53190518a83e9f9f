"""A sample's images and videos -> ``pixel_values`` [N, F, H, W, 3] and ``item_mask`` [N, F].

Training records (``llava.ExampleBuilder``) and benchmark samples (the eval
runner) load their media here. A sample's visual items, in placeholder order:
its images (``"image"``: a path or a list of paths), else one embedded image
(``metadata.image_base64``, as some benchmark files carry them), then its videos
(``"video"``). An image fills frame 0 of its item; a video its first frames,
sampled uniformly (``video.load_video``); unused items and frames are zeros
with ``item_mask`` False.

Paths never leave the image root: LLaVA records give paths relative to it
(``records.resolve_path``), benchmark samples paths already joined with it
(``joined=True``, checked by :func:`inside_root`). Images above ``max_pixels``
are refused (``ImageTooLargeError``).

With an :class:`~lavi_jax.data.anyres.AnyresProcessor` an image item is
``1 + max_crops`` frames (the whole image, then its crops; see ``anyres``),
items have ``max(num_frames, 1 + max_crops)`` frames, and :meth:`MediaLoader.load_all`
also returns ``image_sizes`` int32 [N, 2]: each image's original (height, width),
(0, 0) for videos and padding.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from lavi_jax import storage
from lavi_jax.data.anyres import AnyresProcessor
from lavi_jax.data.image_processor import ImageProcessor, load_image
from lavi_jax.data.records import resolve_path
from lavi_jax.data.video import load_video

IMAGE, BASE64, VIDEO = "image", "base64", "video"
Item = tuple[str, Any]  # (IMAGE, path) | (BASE64, text) | (VIDEO, path)


def _paths(sample: dict[str, Any], key: str) -> list[Any]:
    value = sample.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    raise ValueError(f'"{key}" must be a path or a non-empty list of paths, got {value!r}')


def media_items(sample: dict[str, Any]) -> list[Item]:
    """The sample's visual items in placeholder order; raises ``ValueError`` for a malformed ``image`` / ``video``."""
    items = [(IMAGE, p) for p in _paths(sample, "image")]
    embedded = (sample.get("metadata") or {}).get("image_base64")
    if not items and embedded:
        items.append((BASE64, embedded))
    return items + [(VIDEO, p) for p in _paths(sample, "video")]


def inside_root(root: str | None, path: str) -> str:
    """``path`` if it lies inside ``root`` (lexically; no root: any path); raises ``ValueError`` otherwise.
    ``root`` and ``path`` may be URIs (``gs://bucket/images``); a URI is never made absolute."""
    if not root:
        return path
    relative = storage.relpath(path, root)
    try:
        return resolve_path(root, relative)
    except ValueError:
        raise ValueError(f"media path {path!r} is outside the image root {root!r}") from None


@dataclasses.dataclass(frozen=True)
class MediaLoader:
    """Loads a sample's visual items with ``processor``; raises for unusable media.

    ``loader(sample, num_items)`` -> ``(pixel_values [num_items, item_frames, H, W, 3]
    float32, item_mask [num_items, item_frames] bool)``; ``num_items`` defaults to
    the sample's own count. ``resolve`` + ``load`` split the two steps, for
    callers that check paths before tokenising. ``num_frames`` is the frames
    sampled per video; ``item_frames`` the frame axis (more with anyres).
    """

    processor: ImageProcessor | AnyresProcessor
    num_frames: int = 1
    image_root: str | None = None
    max_pixels: int | None = None
    joined: bool = False  # paths already joined with image_root (benchmark samples), else relative to it

    def __post_init__(self):
        if self.processor.output_size is None:
            raise ValueError("the image processor must produce a fixed output size")

    @property
    def anyres(self) -> bool:
        return isinstance(self.processor, AnyresProcessor)

    @property
    def item_frames(self) -> int:
        """Frames per item: ``num_frames``, or ``max(num_frames, 1 + max_crops)`` with anyres."""
        return max(self.num_frames, self.processor.num_frames) if self.anyres else self.num_frames

    def __call__(self, sample: dict[str, Any], num_items: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.load(self.resolve(media_items(sample)), num_items)

    def load_sample(self, sample: dict[str, Any], num_items: int | None = None):
        """Like ``__call__``, returning ``(pixel_values, item_mask, image_sizes)``."""
        return self.load_all(self.resolve(media_items(sample)), num_items)

    def resolve(self, items: list[Item]) -> list[Item]:
        """Items with their paths checked against the image root (``ValueError`` for a path outside it)."""
        return [(kind, value if kind == BASE64 else self.path(value)) for kind, value in items]

    def path(self, path: Any) -> str:
        if self.joined:
            return inside_root(self.image_root, path)
        return resolve_path(self.image_root or "", path)

    def frames(self, kind: str, value: Any) -> list[Image.Image]:
        """The frames of one resolved item: one for an image, up to ``num_frames`` for a video."""
        if kind == BASE64:
            return [load_image(io.BytesIO(base64.b64decode(value)), self.max_pixels)]
        if kind == IMAGE:
            return [load_image(value, self.max_pixels)]
        return load_video(value, self.num_frames, self.max_pixels)

    def load(self, items: list[Item], num_items: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Resolved items -> ``(pixel_values, item_mask)`` of ``num_items`` items (default: ``len(items)``)."""
        return self.load_all(items, num_items)[:2]

    def load_all(self, items: list[Item], num_items: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Resolved items -> ``(pixel_values, item_mask, image_sizes)`` of ``num_items`` items."""
        n = len(items) if num_items is None else int(num_items)
        if len(items) > n:
            raise ValueError(f"{len(items)} images/videos, more than {n}")
        loaded = [(kind, self.frames(kind, value)) for kind, value in items]
        return self._stack(loaded, n)

    def _stack(self, items: list[tuple[str, list[Image.Image]]], num_items: int):
        """Each item's frames, preprocessed, into zero-padded ``(pixel_values, item_mask, image_sizes)``."""
        h, w = self.processor.output_size
        F = self.item_frames
        pixel_values = np.zeros((num_items, F, h, w, 3), np.float32)
        item_mask = np.zeros((num_items, F), bool)
        image_sizes = np.zeros((num_items, 2), np.int32)
        frame_processor = self.processor.processor if self.anyres else self.processor
        tile = self.anyres and (self.processor.tiles_multi_images or sum(k != VIDEO for k, _ in items) == 1)
        for i, (kind, frames) in enumerate(items):
            if self.anyres and kind != VIDEO:
                image = frames[0]
                pixels, mask = self.processor(image) if tile else self.processor.square(image)
                pixel_values[i, : len(mask)], item_mask[i, : len(mask)] = pixels, mask
                image_sizes[i] = image.height, image.width
                continue
            for f, frame in enumerate(frames[: self.num_frames]):
                pixel_values[i, f] = frame_processor(frame)
                item_mask[i, f] = True
        return pixel_values, item_mask, image_sizes

    def empty(self, num_items: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero ``(pixel_values, item_mask)`` of ``num_items`` items (rows with no usable media)."""
        return self._stack([], num_items)[:2]
