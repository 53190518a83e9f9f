"""Any-resolution images as LLaVA-NeXT and LLaVA-OneVision tile them (numpy + PIL).

An image of ``(height, width)`` is resized, keeping its aspect ratio, into the
best canvas among ``pinpoints`` (HF ``image_grid_pinpoints``; the one that keeps
the most of the image's pixels, then wastes the least), zero-padded to the
canvas (centred), and cut into ``tile`` x ``tile`` crops in row-major order. An
item is then ``1 + max_crops`` frames::

    frame 0        the whole image resized to tile x tile (HF's first patch)
    frames 1..C    the C = rows * cols crops of the canvas, row by row
    frames C+1..   zeros, mask False (static shapes)

Every frame then goes through the tower's :class:`ImageProcessor` (resize,
crop, rescale, normalise), as ``LlavaNextImageProcessorPil`` /
``LlavaOnevisionImageProcessorPil`` do it. OneVision tiles only an image that
is alone in its prompt; the images of a multi-image prompt are padded to a
square with the mean colour and give one frame (:meth:`AnyresProcessor.square`).

The geometry helpers are plain python (HF's ``select_best_resolution``,
``get_patch_output_size``, ``get_anyres_image_grid_shape``) and are the ones
the model side uses on the host.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from lavi_jax.data.image_processor import ImageProcessor, to_rgb

Pinpoints = tuple[tuple[int, int], ...]


def as_pinpoints(pinpoints: Any) -> Pinpoints:
    """``[[h, w], ...]`` -> ``((h, w), ...)``; raises ``ValueError`` naming a malformed entry."""
    out = []
    for p in pinpoints or ():
        if len(p) != 2 or int(p[0]) <= 0 or int(p[1]) <= 0:
            raise ValueError(f"pinpoint {p!r} is not a positive (height, width)")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps most of a ``size = (h, w)`` image, then wastes least (HF's rule)."""
    height, width = int(size[0]), int(size[1])
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    if best is None:
        raise ValueError(f"no pinpoint fits an image of {height}x{width} (pinpoints {tuple(pinpoints)!r})")
    return best


def patch_output_size(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` of a ``size`` image resized to fit ``target`` keeping its aspect ratio (HF's rounding)."""
    height, width = int(size[0]), int(size[1])
    target_h, target_w = int(target[0]), int(target[1])
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """``(rows, cols)`` of crops for a ``size`` image (HF ``get_anyres_image_grid_shape``)."""
    h, w = select_best_resolution(size, pinpoints)
    return h // tile, w // tile


def num_crops(size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Crops of a ``size`` image, without the base frame."""
    rows, cols = grid_shape(size, pinpoints, tile)
    return rows * cols


def max_grid(pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """The largest ``(rows, cols)`` any pinpoint gives (sizes of the tile-position tables)."""
    return max(int(h) // tile for h, _ in pinpoints), max(int(w) // tile for _, w in pinpoints)


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile: int, max_crops: int) -> Pinpoints:
    """``pinpoints`` as a tuple if every one is a multiple of ``tile`` with at most ``max_crops`` crops."""
    pinpoints = as_pinpoints(pinpoints)
    if not pinpoints:
        raise ValueError("anyres needs at least one pinpoint")
    for h, w in pinpoints:
        if h % tile or w % tile:
            raise ValueError(f"pinpoint {(h, w)} is not a multiple of the tower's image size {tile}")
        if (h // tile) * (w // tile) > max_crops:
            raise ValueError(f"pinpoint {(h, w)} gives {(h // tile) * (w // tile)} crops, more than max_crops={max_crops}")
    return pinpoints


@dataclasses.dataclass(frozen=True)
class AnyresProcessor:
    """An image -> ``(pixels [1 + max_crops, S, S, 3] float32, mask [1 + max_crops] bool)``.

    ``processor`` is the tower's per-frame processor (its output is S x S);
    ``pinpoints`` multiples of S with at most ``max_crops`` crops each;
    ``aspect`` HF's ``vision_aspect_ratio``: with ``"anyres_max_N"`` (OneVision)
    the images of a multi-image sample are not tiled (:meth:`square`).
    """

    processor: ImageProcessor
    pinpoints: Pinpoints
    max_crops: int
    aspect: str = "anyres"

    @classmethod
    def from_config(cls, anyres, processor: ImageProcessor) -> "AnyresProcessor":
        """From ``config.model.anyres`` (pinpoints, max_crops, aspect) around the tower's processor."""
        return cls(processor, anyres.pinpoints, int(anyres.max_crops), str(anyres.get("aspect", "anyres")))

    @property
    def tiles_multi_images(self) -> bool:
        """Whether each image of a multi-image sample is tiled (LLaVA-NeXT) or padded to a square (OneVision)."""
        return not self.aspect.startswith("anyres_max")

    @property
    def output_size(self) -> tuple[int, int]:
        return self.processor.output_size

    def __post_init__(self):
        size = self.processor.output_size
        if size is None or size[0] != size[1]:
            raise ValueError(f"anyres needs square tiles; the image processor gives {size}")
        object.__setattr__(self, "pinpoints", check_pinpoints(self.pinpoints, self.tile, self.max_crops))

    @property
    def tile(self) -> int:
        return int(self.processor.output_size[0])

    @property
    def num_frames(self) -> int:
        return 1 + int(self.max_crops)

    @property
    def _base_size(self) -> int:
        """HF's size of the whole-image frame: size (h) or shortest_edge."""
        size = self.processor.size
        return int(size["shortest_edge"]) if isinstance(size, dict) else int(size[0])

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """The whole image resized to the base size, then the crops of the best canvas (uint8 RGB images)."""
        image = to_rgb(image) if self.processor.do_convert_rgb else image
        size = (image.height, image.width)
        best = select_best_resolution(size, self.pinpoints)
        new_h, new_w = patch_output_size(size, best)
        resized = np.asarray(image.resize((new_w, new_h), resample=self.processor.resample))
        top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
        canvas = np.zeros((best[0], best[1]) + resized.shape[2:], resized.dtype)
        canvas[top : top + new_h, left : left + new_w] = resized
        base = self._base_size
        out = [image.resize((base, base), resample=self.processor.resample)]
        t = self.tile
        for i in range(0, best[0], t):
            for j in range(0, best[1], t):
                out.append(Image.fromarray(np.ascontiguousarray(canvas[i : i + t, j : j + t])))
        return out

    def __call__(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles one image; frames past its crop count are zeros with mask False."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        frames = self.crops(image)
        if len(frames) > self.num_frames:  # unreachable with checked pinpoints; kept as a contract
            raise ValueError(f"{len(frames) - 1} crops, more than max_crops={self.max_crops}")
        t = self.tile
        pixels = np.zeros((self.num_frames, t, t, 3), np.float32)
        mask = np.zeros((self.num_frames,), bool)
        for f, frame in enumerate(frames):
            pixels[f] = self.processor(frame)
            mask[f] = True
        return pixels, mask

    def square(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OneVision's multi-image frame: padded to a square with the mean colour, one frame, no crops."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = to_rgb(image) if self.processor.do_convert_rgb else image
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        height, width = pixels.shape[:2]
        if height != width:
            side = max(height, width)
            fill = [int(m * 255) for m in self.processor.image_mean][: pixels.shape[2]]
            square = np.empty((side, side, pixels.shape[2]), pixels.dtype)
            square[:] = np.asarray(fill, pixels.dtype)
            top, left = (side - height) // 2, (side - width) // 2
            square[top : top + height, left : left + width] = pixels
            pixels = square
        out = np.zeros((self.num_frames, self.tile, self.tile, 3), np.float32)
        mask = np.zeros((self.num_frames,), bool)
        out[0] = self.processor(pixels if pixels.shape[2] > 1 else pixels[..., 0])
        mask[0] = True
        return out, mask
