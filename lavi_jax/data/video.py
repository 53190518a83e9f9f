"""Video frames: F frames sampled uniformly from a video file (PyAV) or a folder of frames.

Paths may be URIs (``gs://bucket/videos/a.mp4``), read through :mod:`lavi_jax.storage`:
a video file up to ``WHOLE_READ_BYTES`` is read whole in one request and decoded from
memory; a larger one is decoded from a buffered file object (read in blocks).
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
from PIL import Image

from lavi_jax import storage
from lavi_jax.data.image_processor import ImageTooLargeError, load_image, read_media

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
WHOLE_READ_BYTES = 256 * 2**20


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
    names = sorted((n for n in storage.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
    if not names:
        raise ValueError(f"no frame images in folder {path}")
    return [load_image(storage.join(path, names[i]), max_pixels) for i in sample_indices(len(names), num_frames)]


@contextlib.contextmanager
def _source(path: str):
    """A seekable binary file object for ``path``: its bytes in memory when small, else a buffered file."""
    try:
        whole = storage.size(path) <= WHOLE_READ_BYTES
    except FileNotFoundError:
        read_media(path)  # raises the built-in open's FileNotFoundError
        raise
    if whole:
        yield io.BytesIO(read_media(path))
    else:
        with storage.open(path, "rb") as f:
            yield f


def _open(source):
    import av  # PyAV: loaded when a video is read

    source.seek(0)
    return av.open(source)


def _decode(source, wanted: set[int], max_pixels: int | None) -> tuple[dict[int, Image.Image], int]:
    """Decodes the first video stream once; returns the wanted frames and the frame count."""
    frames, count = {}, 0
    with _open(source) as container:
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
    with _source(path) as source:
        with _open(source) as container:
            if not container.streams.video:
                raise ValueError("file has no video stream")
            declared = container.streams.video[0].frames
        if declared > 0:
            wanted = sample_indices(declared, num_frames)
            frames, count = _decode(source, set(wanted), max_pixels)
            if count == declared:
                return [frames[i] for i in wanted]
        else:
            _, count = _decode(source, set(), max_pixels)
        if count == 0:
            raise ValueError("video has no decodable frames")
        wanted = sample_indices(count, num_frames)
        frames, _ = _decode(source, set(wanted), max_pixels)
        return [frames[i] for i in wanted]


def load_video(path: str, num_frames: int, max_pixels: int | None = None) -> list[Image.Image]:
    """Frames from a video file or a folder of frame images (local paths or URIs)."""
    if storage.isdir(path):
        return read_frame_folder(path, num_frames, max_pixels)
    return read_video(path, num_frames, max_pixels)
