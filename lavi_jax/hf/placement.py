"""Converted tensors straight into their shards, and back out for export.

:func:`place_entries` reads, converts and places each HF tensor into its
target sharding before reading the next, so host memory holds one HF tensor
(and its converted copy) at a time; scanned (stacked) leaves are filled layer
by layer on device. :func:`hf_tensor_specs` is the export direction: one
``(hf name, shape, dtype, produce)`` row per tensor, fetched and converted
only when written.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lavi_jax.hf.errors import ConversionError
from lavi_jax.hf.mapping import Entry
from lavi_jax.hf.safetensors_io import SafetensorsReader, np_dtype


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
