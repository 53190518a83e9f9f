"""Safetensors files, one tensor at a time, on local disk or behind a URI: ranged reads, streamed writing.

:class:`SafetensorsReader` opens a single ``model.safetensors`` or a sharded
checkpoint (``model.safetensors.index.json``), parses each file's header (its
8-byte length and JSON, two ranged reads) and reads one tensor (or a range of
its rows) at a time with one ranged read (:func:`lavi_jax.storage.read_bytes`)
into a numpy array, with no torch and never the whole file; bfloat16 comes
through ``ml_dtypes``. Local files and ``gs://`` objects go through the same
code. :func:`write_safetensors` writes tensors to one file or to shards with an
index, producing and writing them one at a time (to a URI: through a temp file
on local disk, uploaded whole).
"""

from __future__ import annotations

import json
import math
import struct

import ml_dtypes
import numpy as np

from lavi_jax import storage
from lavi_jax.hf.errors import ConversionError

INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}

# Tensors larger than this are read in row chunks of about this size, one ranged read each.
READ_CHUNK_BYTES = 32 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # as the safetensors library: a larger header is a corrupt file


def np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def checkpoint_files(path: str) -> list[str]:
    """The ``.safetensors`` files of a checkpoint directory (single file or index), or ``[path]`` for a file."""
    if storage.isfile(path):
        return [path]
    index = storage.join(path, INDEX)
    if storage.exists(index):
        weight_map = storage.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no 'weight_map'")
        return sorted({storage.join(path, fn) for fn in weight_map.values()})
    if storage.exists(storage.join(path, "model.safetensors")):
        return [storage.join(path, "model.safetensors")]
    if storage.isdir(path) and any(f.endswith((".bin", ".pt", ".pth")) for f in storage.listdir(path)):
        raise ConversionError(f"{path} holds pickled PyTorch weights only; convert them to safetensors first "
                              "(pickles are never loaded here)")
    raise FileNotFoundError(f"no model.safetensors or {INDEX} in {path}")


def _read(file: str, start: int, end: int, what: str) -> bytes:
    """Bytes ``[start, end)`` of ``file`` in one ranged read; short reads and storage errors name ``what``."""
    try:
        data = storage.read_bytes(file, start, end)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: file not found") from None
    except OSError as e:
        raise ConversionError(f"{what}: {e}") from None
    if len(data) != end - start:
        raise ConversionError(f"{what}: unreadable safetensors data (file ends before byte {end}: truncated)")
    return data


def read_header(file: str) -> tuple[int, dict[str, tuple[np.dtype, tuple, int, int]]]:
    """``(data start, {name: (dtype, shape, begin, end)})`` of one safetensors file, offsets from the file's start,
    checked against the shapes and the file's size."""
    bad = f"{file}: unreadable safetensors data"
    (n,) = struct.unpack("<Q", _read(file, 0, 8, file))
    if n > MAX_HEADER_BYTES:
        raise ConversionError(f"{bad} (header length {n} is too large)")
    try:
        header = json.loads(_read(file, 8, 8 + n, file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{bad} (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{bad} (header is not a JSON object)")
    base, available = 8 + n, storage.size(file) - 8 - n
    info = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{file}: tensor {name!r}: unreadable safetensors header entry {h!r}") from None
        if code not in DTYPES:
            raise ConversionError(f"{file}: tensor {name!r} has unsupported dtype {code}")
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= available) \
                or end - begin != nbytes or min(shape, default=0) < 0:
            raise ConversionError(f"{file}: tensor {name!r}: data_offsets {[begin, end]} do not fit shape "
                                  f"{list(shape)} {code} ({nbytes} bytes) in the file's {available} data bytes")
        info[name] = (DTYPES[code], shape, base + begin, base + end)
    return base, info


class SafetensorsReader:
    """Lazy, tensor-by-tensor reader of an HF checkpoint directory (or a single ``.safetensors`` file), local or
    behind a URI.

    Only the headers are read up front; each tensor is read with one ranged read
    (nothing is memory-mapped or kept open). Tensors over :data:`READ_CHUNK_BYTES`
    are read in row chunks, so reading one adds the tensor plus one chunk to host memory.
    """

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, str] = {}
        self._info: dict[str, tuple[np.dtype, tuple]] = {}
        self._span: dict[str, tuple[int, int]] = {}
        for file in checkpoint_files(path):
            _, info = read_header(file)
            for name, (dtype, shape, begin, end) in info.items():
                self._where[name] = file
                self._info[name] = (dtype, shape)
                self._span[name] = (begin, end)

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
        if nbytes <= READ_CHUNK_BYTES or not shape:
            return self._bytes_to_array(name, *self._span[name], dtype, shape)
        out = np.empty(shape, dtype)
        step = max(1, READ_CHUNK_BYTES // (nbytes // shape[0]))
        for r in range(0, shape[0], step):
            out[r:r + step] = self.read_rows(name, r, r + step)
        return out

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the leading axis."""
        dtype, shape = self._check(name)
        if not shape:
            raise ConversionError(f"{self._where[name]}: tensor {name!r} is a scalar; it has no rows")
        start, stop = max(0, start), min(stop, shape[0])
        stop = max(start, stop)
        row = math.prod(shape[1:]) * dtype.itemsize
        begin = self._span[name][0]
        return self._bytes_to_array(name, begin + start * row, begin + stop * row, dtype, (stop - start,) + shape[1:])

    def _bytes_to_array(self, name: str, begin: int, end: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
        if begin == end:
            return np.empty(shape, dtype)
        file = self._where[name]
        data = _read(file, begin, end, f"{file}, tensor {name!r}")
        return np.frombuffer(data, dtype).reshape(shape)

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
    storage.makedirs(directory)
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
        with storage.write_file(storage.join(directory, fn)) as f:
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
        storage.write_json(storage.join(directory, f"{stem}.safetensors.index.json"),
                           {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    return names
