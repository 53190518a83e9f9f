"""Image preprocessing with the numerics of Hugging Face's SigLIP and CLIP processors.

``ImageProcessor`` reproduces ``SiglipImageProcessor`` (resize to a fixed
height x width) and ``CLIPImageProcessor`` (resize the shortest edge, then
center-crop) step for step: RGB conversion (transparency composited onto
white), PIL resampling on uint8 pixels, rescale in float64 then cast to
float32, normalise in float32. The output is float32 ``[H, W, 3]``
(channels last), the layout the vision towers take.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from lavi_jax import storage

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = int(Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; images with an alpha band or a transparency
    key are composited onto a white background first (as Hugging Face does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _hw(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int, (height, width) or {{'height', 'width'}}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """HF-compatible resize -> center crop -> rescale -> normalise.

    Attributes:
      size: ``(height, width)`` for a fixed-size resize (SigLIP), or
        ``{"shortest_edge": n}`` to scale the shorter side to ``n`` keeping the
        aspect ratio (CLIP).
      crop_size: ``(height, width)`` of the center crop, or None for no crop.
      resample: PIL resampling filter (3 = bicubic).
      rescale_factor: multiplies the uint8 pixels (1/255).
      image_mean, image_std: per-channel normalisation.
    """

    size: Any = (384, 384)
    crop_size: tuple[int, int] | None = None
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self):
        if isinstance(self.size, dict) and "shortest_edge" in self.size:
            if set(self.size) != {"shortest_edge"}:
                raise ValueError(f"unsupported size {self.size!r}: only 'shortest_edge' or height/width")
            object.__setattr__(self, "size", {"shortest_edge": int(self.size["shortest_edge"])})
        else:
            object.__setattr__(self, "size", _hw(self.size, "size"))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", _hw(self.crop_size, "crop_size"))
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output, or None when it depends on the input."""
        if self.crop_size is not None:
            return self.crop_size
        if self.do_resize and not isinstance(self.size, dict):
            return self.size
        return None

    def _resize_hw(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, dict):
            return self.size
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target, int(target * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Preprocesses one image (PIL, or uint8 ``[H, W]`` / ``[H, W, C]`` array)
        into float32 ``[H, W, 3]``."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_resize:
            height, width = self._resize_hw(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self.crop_size is not None:
            pixels = center_crop(pixels, self.crop_size)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

    @classmethod
    def siglip(cls, image_size: int = 384) -> ImageProcessor:
        """SigLIP: bicubic resize to ``image_size`` square, mean = std = 0.5."""
        return cls(size=(image_size, image_size))

    @classmethod
    def clip(cls, image_size: int = 336) -> ImageProcessor:
        """CLIP: bicubic shortest-edge resize, center crop, OpenAI CLIP mean/std."""
        return cls(
            size={"shortest_edge": image_size},
            crop_size=(image_size, image_size),
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ImageProcessor:
        """Builds from the contents of a HF ``preprocessor_config.json``."""
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "").lower()
        clip_like = "clip" in kind and "siglip" not in kind
        default = cls.clip() if clip_like else cls.siglip()
        size = config.get("size", default.size)
        if isinstance(size, int):  # legacy configs: an int is the shortest edge
            size = {"shortest_edge": size}
        do_center_crop = config.get("do_center_crop", default.crop_size is not None)
        crop_size = config.get("crop_size", default.crop_size) if do_center_crop else None
        return cls(
            size=size,
            crop_size=crop_size,
            resample=int(config.get("resample", default.resample)),
            rescale_factor=float(config.get("rescale_factor", default.rescale_factor)),
            image_mean=tuple(config.get("image_mean", default.image_mean)),
            image_std=tuple(config.get("image_std", default.image_std)),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
            do_convert_rgb=config.get("do_convert_rgb") is not False,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> ImageProcessor:
        """Reads ``<path>/preprocessor_config.json`` (or that file itself); ``path`` may be a URI."""
        if storage.isdir(path):
            path = storage.join(path, "preprocessor_config.json")
        return cls.from_hf_config(storage.read_json(path))


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Center-crops ``[H, W, C]`` to ``size``, zero-padding images that are too small."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def make_image_processor(processor: str, image_size: int) -> ImageProcessor:
    """``"siglip"`` | ``"clip"`` at ``image_size``, or a HF directory with a
    ``preprocessor_config.json`` (a local path or a URI)."""
    if processor == "siglip":
        return ImageProcessor.siglip(image_size)
    if processor == "clip":
        return ImageProcessor.clip(image_size)
    if storage.exists(processor):
        return ImageProcessor.from_hf_dir(processor)
    raise ValueError(f"processor must be 'siglip', 'clip' or a HF processor directory, got {processor!r}")


def read_media(path: str) -> bytes:
    """The bytes of a media file (local path or URI), in one request; a missing one raises the
    ``FileNotFoundError`` the built-in ``open`` raises (``[Errno 2] No such file or directory: 'path'``)."""
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None


class ImageTooLargeError(ValueError):
    """Raised for images whose pixel count exceeds the configured limit."""


def load_image(path, max_pixels: int | None = None) -> Image.Image:
    """Opens and fully decodes an image file, rejecting decompression bombs.

    ``path`` is a local path or a URI (read whole, in one request, through
    :mod:`lavi_jax.storage`), or an open binary file object.

    The pixel count is checked from the header, before any pixel is decoded,
    against ``max_pixels`` (default: PIL's ``Image.MAX_IMAGE_PIXELS``).
    Truncated or corrupt files raise ``OSError`` here rather than later. PIL
    itself refuses images above twice its global limit whatever ``max_pixels``.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    source = io.BytesIO(read_media(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else path
    with Image.open(source) as image:
        if limit is not None and image.width * image.height > limit:
            raise ImageTooLargeError(
                f"image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                f"above the limit of {limit} (possible decompression bomb)"
            )
        image.load()
        return image
