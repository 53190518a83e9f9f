"""Video frames: F frames sampled uniformly from a video file (PyAV) or a folder of frames."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from lavi_jax.data.image_processor import ImageTooLargeError, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``[0, total - 1]``, first and
    last frame included. Videos shorter than ``num_frames`` give all their frames."""
    if total <= 0:
        return []
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_frame_folder(path: str, num_frames: int, max_pixels: int | None = None) -> list[Image.Image]:
    """Frames from a folder of images, ordered by natural sort of file names
    (``frame_2`` before ``frame_10``)."""
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not names:
        raise ValueError(f"no frame images in folder {path}")
    return [load_image(os.path.join(path, names[i]), max_pixels) for i in sample_indices(len(names), num_frames)]


def _decode(path: str, wanted: set[int], max_pixels: int | None) -> tuple[dict[int, Image.Image], int]:
    """Decodes the first video stream once; returns the wanted frames and the frame count."""
    import av  # PyAV: loaded when a video is read

    frames, count = {}, 0
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        if limit is not None and stream.width * stream.height > limit:
            raise ImageTooLargeError(f"video frames are {stream.width}x{stream.height}, above {limit} pixels")
        for frame in container.decode(stream):
            if count in wanted:
                frames[count] = frame.to_image()
            count += 1
    return frames, count


def read_video(path: str, num_frames: int, max_pixels: int | None = None) -> list[Image.Image]:
    """``num_frames`` RGB frames sampled uniformly from a video file.

    Uses the container's frame count when it has one (one decoding pass) and
    counts frames by decoding otherwise, or when the count turns out wrong.
    Raises ``ValueError`` for files without decodable frames and PyAV errors
    for corrupt files.
    """
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("file has no video stream")
        declared = container.streams.video[0].frames
    if declared > 0:
        wanted = sample_indices(declared, num_frames)
        frames, count = _decode(path, set(wanted), max_pixels)
        if count == declared:
            return [frames[i] for i in wanted]
    else:
        _, count = _decode(path, set(), max_pixels)
    if count == 0:
        raise ValueError("video has no decodable frames")
    wanted = sample_indices(count, num_frames)
    frames, _ = _decode(path, set(wanted), max_pixels)
    return [frames[i] for i in wanted]


def load_video(path: str, num_frames: int, max_pixels: int | None = None) -> list[Image.Image]:
    """Frames from a video file or a folder of frame images."""
    if os.path.isdir(path):
        return read_frame_folder(path, num_frames, max_pixels)
    return read_video(path, num_frames, max_pixels)
