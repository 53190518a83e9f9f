"""Moving tensors through the mapping: safetensors reading and writing, sharded placement, export.

:class:`SafetensorsReader` opens a single ``model.safetensors`` or a sharded
checkpoint (``model.safetensors.index.json``) and reads one tensor at a time
into a fresh numpy buffer (plain file reads, no memory map, no torch; bfloat16
and float8 through ``ml_dtypes``). :func:`place_entries` converts and places
tensors straight into their target shardings, so host memory holds one HF
tensor (and its converted copy) at a time; scanned leaves are filled layer by
layer on device. :func:`write_safetensors` streams tensors to (sharded)
safetensors files the same way.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import shutil
import struct
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from conversions.mapping import Entry

INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class ConversionError(ValueError):
    pass


def fresh_output_dir(path: str, overwrite: bool) -> str:
    """Absolute ``path``, emptied when ``overwrite``; a non-empty directory otherwise raises ValueError."""
    out = os.path.abspath(path)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    return out


def np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


# ----------------------------------------------------------------------------- reading


class SafetensorsFile:
    """One ``.safetensors`` file: the header is parsed once, tensors are read on demand."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb", buffering=0)
        head = self._f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(self._f.read(n))
        except ValueError as e:
            raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple, int, int]] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self.tensors[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ConversionError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")
        return self._read_into(np.empty(shape, dtype), begin, name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the leading axis (one contiguous byte range)."""
        dtype, shape, begin, end = self.tensors[name]
        row = (end - begin) // shape[0]
        return self._read_into(np.empty((stop - start,) + shape[1:], dtype), begin + start * row, name)

    def _read_into(self, out: np.ndarray, offset: int, name: str) -> np.ndarray:
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._f.seek(self._start + offset)
        got = 0
        while got < view.nbytes:
            n = self._f.readinto(view[got:])
            if not n:
                raise ConversionError(f"{self.path}: truncated while reading {name!r}")
            got += n
        return out

    def close(self):
        self._f.close()


class SafetensorsReader:
    """Lazy, tensor-by-tensor reader of an HF checkpoint directory (or a single ``.safetensors`` file)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isfile(path):
            files = [path]
        elif os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, fn) for fn in weight_map.values()})
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
        elif os.path.isdir(path) and any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
            raise ConversionError(f"{path} holds pickled PyTorch weights only; convert them to safetensors first "
                                  "(pickles are never loaded here)")
        else:
            raise FileNotFoundError(f"no model.safetensors or {INDEX} in {path}")
        self._files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for n in f.tensors:
                self._where[n] = f

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _info(self, name: str):
        if name not in self._where:
            raise ConversionError(f"missing tensor {name!r} in {self.path}")
        return self._where[name].tensors[name]

    def shape(self, name: str) -> tuple:
        return self._info(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._info(name)[0]

    def nbytes(self) -> int:
        return sum(end - begin for f in self._files for _, _, begin, end in f.tensors.values())

    def get(self, name: str) -> np.ndarray:
        self._info(name)
        return self._where[name].read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        self._info(name)
        return self._where[name].read_rows(name, start, stop)

    def close(self):
        for f in self._files:
            f.close()


# ----------------------------------------------------------------------------- checking and placing


def group_entries(entries: Iterable[Entry]) -> dict[tuple[str, ...], list[Entry]]:
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.jax, []).append(e)
    return groups


def check_shapes(entries: list[Entry], shape_of: Callable[[str], tuple], targets: dict) -> None:
    """Fails with a one-line error on the first HF tensor whose shape does not fit its JAX leaf."""
    for e in entries:
        if e.jax not in targets:
            raise ConversionError(f"mapping names param {'/'.join(e.jax)!r}, which the model does not have")
        leaf = tuple(targets[e.jax].shape)
        target = leaf[1:] if e.layer is not None else leaf
        want, have = tuple(e.hook.hf_shape(target)), tuple(shape_of(e.hf))
        if want != have:
            raise ConversionError(f"shape mismatch for {e.hf}: checkpoint has {have}, model expects {want} "
                                  f"(for {'/'.join(e.jax)} {target})")


def to_jax(e: Entry, x: np.ndarray, shape: tuple, dtype) -> np.ndarray:
    try:
        y = e.hook.to_jax(x, tuple(shape))
    except ValueError:
        y = None
    if y is None or tuple(y.shape) != tuple(shape):
        raise ConversionError(f"shape mismatch for {e.hf}: checkpoint has {tuple(x.shape)}, "
                              f"model expects {'/'.join(e.jax)} {tuple(shape)} (after {e.hook.name})")
    return y if y.dtype == np_dtype(dtype) else y.astype(np_dtype(dtype))


# Tensors larger than this that need a converting copy (transpose or dtype cast) are read in row chunks
# straight into the converted buffer, so the unconverted tensor is never held whole.
CHUNK_BYTES = 32 * 2**20


def host_value(e: Entry, get, shape: tuple, dtype) -> np.ndarray:
    """The JAX-layout host array for entry ``e`` (``get``: a callable name -> array, or a reader)."""
    dt = np_dtype(dtype)
    if isinstance(get, SafetensorsReader) and e.hook.kind in ("reshape", "transpose"):
        src_shape, src_dtype = get.shape(e.hf), get.dtype(e.hf)
        nbytes = math.prod(src_shape) * src_dtype.itemsize
        want = tuple(e.hook.hf_shape(tuple(shape)))
        if (e.hook.kind == "transpose" or src_dtype != dt) and nbytes > CHUNK_BYTES and want == tuple(src_shape):
            n = src_shape[0]
            step = max(1, CHUNK_BYTES // (nbytes // n))
            if e.hook.kind == "transpose":
                out = np.empty((src_shape[1], n), dt)
                for r in range(0, n, step):
                    out[:, r:r + step] = get.read_rows(e.hf, r, min(n, r + step)).T
            else:
                out = np.empty(src_shape, dt)
                for r in range(0, n, step):
                    out[r:r + step] = get.read_rows(e.hf, r, min(n, r + step))
            return out.reshape(shape)
    return to_jax(e, (get.get if isinstance(get, SafetensorsReader) else get)(e.hf), shape, dtype)


def put(host: np.ndarray, sharding) -> jax.Array:
    """A host array placed into ``sharding`` (each device receives only its shard); waits for the copy, so
    the host buffer can be freed as soon as this returns."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.block_until_ready(jax.device_put(host, sharding))
    return jax.block_until_ready(jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]))


def _slice_sharding(sharding):
    """Sharding of one layer of a stacked leaf (the leading ``layers`` axis removed)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if spec and spec[0] is not None:
            raise ConversionError(f"stacked layers axis is sharded ({sharding.spec}); layer-by-layer import needs it unsharded")
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding


# Stacked (scanned) leaves up to this size are assembled on the host and placed once; larger ones are
# allocated on device and filled layer by layer, so the host never holds more than one layer of them.
HOST_STACK_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
    update = lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x, i, 0)
    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return lib


def release_host_memory() -> None:
    """Returns freed host buffers to the OS (glibc otherwise keeps freed mid-sized blocks in its heap)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def place_entries(entries: list[Entry], get, targets: dict) -> dict:
    """``{jax path: jax.Array}`` for every leaf the entries name.

    ``get`` is a :class:`SafetensorsReader` (or any callable name -> array);
    ``targets`` maps each JAX path to a ``jax.ShapeDtypeStruct`` carrying its
    sharding. Each HF tensor is read, converted, placed and dropped before the
    next is read; a scanned (stacked) leaf is allocated on device and filled
    layer by layer in place.
    """
    out = {}
    for path, group in group_entries(entries).items():
        t = targets[path]
        sharding = getattr(t, "sharding", None)
        if group[0].layer is None:
            if len(group) != 1:
                raise ConversionError(f"{len(group)} HF tensors map to {'/'.join(path)}: {[e.hf for e in group]}")
            out[path] = put(host_value(group[0], get, t.shape, t.dtype), sharding)
            release_host_memory()
            continue
        layers = sorted(e.layer for e in group)
        if layers != list(range(t.shape[0])):
            raise ConversionError(f"stacked param {'/'.join(path)} has {t.shape[0]} layers, mapping fills {layers}")
        if math.prod(t.shape) * np_dtype(t.dtype).itemsize <= HOST_STACK_BYTES:
            host = np.empty(t.shape, np_dtype(t.dtype))
            for e in group:
                host[e.layer] = host_value(e, get, t.shape[1:], t.dtype)
            out[path] = put(host, sharding)
            del host
            release_host_memory()
            continue
        value = _zeros(tuple(t.shape), jnp.dtype(t.dtype), sharding)()
        per_layer = _slice_sharding(sharding)
        for e in group:
            layer = put(host_value(e, get, t.shape[1:], t.dtype), per_layer)
            value = jax.block_until_ready(_set_layer(sharding)(value, layer, e.layer))
            del layer
            release_host_memory()
        out[path] = value
    return out


def load_params(entries: list[Entry], get: Callable[[str], np.ndarray], params: dict, shardings: Any = None) -> dict:
    """``params`` (a concrete param tree) with every mapped leaf replaced by the converted HF tensor.

    ``shardings`` is a matching tree of shardings (default: the existing leaves'
    shardings). Leaves the mapping does not name are kept.
    """
    flat = dict(flatten(params))
    flat_shardings = dict(flatten(shardings)) if shardings is not None else {}
    targets = {}
    for path in group_entries(entries):
        if path not in flat:
            raise ConversionError(f"mapping names param {'/'.join(path)!r}, which the model does not have")
        old = flat[path]
        targets[path] = jax.ShapeDtypeStruct(old.shape, old.dtype,
                                             sharding=flat_shardings.get(path, getattr(old, "sharding", None)))
    flat.update(place_entries(entries, get, targets))
    return unflatten(flat)


# ----------------------------------------------------------------------------- export


def _leaf(flat: dict, path: tuple[str, ...]):
    if path not in flat:
        raise ConversionError(f"mapping names param {'/'.join(path)!r}, which the checkpoint does not have")
    return flat[path]


def hf_tensor_specs(entries: list[Entry], params: dict, dtype=None) -> list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]]:
    """``(hf name, shape, dtype, produce)`` per entry; ``produce()`` fetches and converts one tensor."""
    flat = dict(flatten(params))
    specs = []
    for e in entries:
        leaf = _leaf(flat, e.jax)
        shape = tuple(leaf.shape[1:] if e.layer is not None else leaf.shape)
        dt = np_dtype(dtype if dtype is not None else leaf.dtype)

        def produce(leaf=leaf, e=e, dt=dt):
            value = leaf[e.layer] if e.layer is not None else leaf
            x = np.asarray(jax.device_get(value))
            return np.ascontiguousarray(e.hook.to_hf(x if x.dtype == dt else x.astype(dt)))

        specs.append((e.hf, tuple(e.hook.hf_shape(shape)), dt, produce))
    return specs


def export_tensors(entries: list[Entry], params: dict, dtype=None) -> dict[str, np.ndarray]:
    """HF name -> numpy tensor for every entry (``dtype``: cast, default keep)."""
    return {name: produce() for name, _, _, produce in hf_tensor_specs(entries, params, dtype)}


def _header(specs) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(directory: str, specs, max_shard_bytes: int = 5 * 2**30, stem: str = "model") -> list[str]:
    """Writes ``specs`` (from :func:`hf_tensor_specs`) as ``stem.safetensors`` or as shards with an index.

    Tensors are produced and written one at a time. Returns the written file names.
    """
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


# ----------------------------------------------------------------------------- trees


def flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out
