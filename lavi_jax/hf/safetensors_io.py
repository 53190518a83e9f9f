"""Safetensors files, one tensor at a time: reading with the ``safetensors`` library, streamed writing.

:class:`SafetensorsReader` opens a single ``model.safetensors`` or a sharded
checkpoint (``model.safetensors.index.json``) and reads one tensor (or a range of
its rows) at a time into a fresh numpy array, with no torch; bfloat16 comes
through ``ml_dtypes``. :func:`write_safetensors` writes tensors to one file or
to shards with an index, producing and writing them one at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from lavi_jax.hf.errors import ConversionError

INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}

# Tensors larger than this are read in row chunks of about this size, each through a fresh handle.
READ_CHUNK_BYTES = 32 * 2**20


def np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def checkpoint_files(path: str) -> list[str]:
    """The ``.safetensors`` files of a checkpoint directory (single file or index), or ``[path]`` for a file."""
    if os.path.isfile(path):
        return [path]
    if os.path.exists(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(path, fn) for fn in weight_map.values()})
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    if os.path.isdir(path) and any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ConversionError(f"{path} holds pickled PyTorch weights only; convert them to safetensors first "
                              "(pickles are never loaded here)")
    raise FileNotFoundError(f"no model.safetensors or {INDEX} in {path}")


@contextlib.contextmanager
def _open(file: str, name: str | None = None):
    """``safe_open`` on ``file``; its errors become ConversionErrors naming the file (and tensor)."""
    what = f"{file}" + (f", tensor {name!r}" if name else "")
    try:
        with safe_open(file, framework="np") as f:
            yield f
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: file not found") from None
    except (SafetensorError, OSError, TypeError, AttributeError) as e:
        raise ConversionError(f"{what}: unreadable safetensors data ({e})") from None


class SafetensorsReader:
    """Lazy, tensor-by-tensor reader of an HF checkpoint directory (or a single ``.safetensors`` file).

    Every read opens its file anew: an open handle memory-maps the file, and the
    pages read through it count in the process's memory until it closes. Tensors
    over :data:`READ_CHUNK_BYTES` are read in row chunks, so reading one adds
    the tensor plus one chunk to host memory.
    """

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, str] = {}
        self._info: dict[str, tuple[np.dtype, tuple]] = {}
        for file in checkpoint_files(path):
            with _open(file) as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    code = view.get_dtype()
                    if code not in DTYPES:
                        raise ConversionError(f"{file}: tensor {name!r} has unsupported dtype {code}")
                    self._where[name] = file
                    self._info[name] = (DTYPES[code], tuple(view.get_shape()))

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _check(self, name: str) -> tuple[np.dtype, tuple]:
        if name not in self._where:
            raise ConversionError(f"missing tensor {name!r} in {self.path}")
        return self._info[name]

    def shape(self, name: str) -> tuple:
        return self._check(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._check(name)[0]

    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self._info.values())

    def get(self, name: str) -> np.ndarray:
        dtype, shape = self._check(name)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= READ_CHUNK_BYTES:
            with _open(self._where[name], name) as f:
                return self._checked(name, f.get_tensor(name), dtype, shape)
        out = np.empty(shape, dtype)
        step = max(1, READ_CHUNK_BYTES // (nbytes // shape[0]))
        for r in range(0, shape[0], step):
            out[r:r + step] = self.read_rows(name, r, r + step)
        return out

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the leading axis."""
        dtype, shape = self._check(name)
        stop = min(stop, shape[0])
        with _open(self._where[name], name) as f:
            x = f.get_slice(name)[start:stop]
        return self._checked(name, x, dtype, (stop - start,) + shape[1:])

    def _checked(self, name, x: np.ndarray, dtype: np.dtype, shape: tuple) -> np.ndarray:
        if x.dtype != dtype or tuple(x.shape) != tuple(shape):
            raise ConversionError(f"{self._where[name]}: tensor {name!r} read as {x.shape} {x.dtype}, "
                                  f"header says {shape} {dtype}")
        return x

    def close(self):
        """Nothing stays open between reads; kept so callers can close every reader alike."""


# ----------------------------------------------------------------------------- writing


def _header(specs) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(directory: str, specs, max_shard_bytes: int = 5 * 2**30, stem: str = "model") -> list[str]:
    """Writes ``specs`` (``(name, shape, dtype, produce)`` rows, e.g. from
    :func:`lavi_jax.hf.placement.hf_tensor_specs`) as ``stem.safetensors`` or as shards with an index.

    Tensors are produced and written one at a time. Returns the written file names.
    """
    # Not safetensors.numpy.save_file: it takes a dict holding every tensor of a file in memory at once.
    os.makedirs(directory, exist_ok=True)
    shards, size = [[]], 0
    for s in specs:
        n = math.prod(s[1]) * s[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    names = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fn, shard in zip(names, shards):
        header = _header(shard)
        with open(os.path.join(directory, fn), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for name, shape, dtype, produce in shard:
                x = produce()
                if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
                    raise ConversionError(f"{name}: produced {x.shape} {x.dtype}, expected {shape} {dtype}")
                f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
                weight_map[name] = fn
                total += x.nbytes
                del x
    if len(shards) > 1:
        with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names
