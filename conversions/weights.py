"""Moving tensors through the mapping: lazy safetensors reading, sharded placement, export.

:class:`SafetensorsReader` opens a single ``model.safetensors`` or a sharded
checkpoint (``model.safetensors.index.json``) and reads one tensor at a time
with numpy; torch is never imported. :func:`load_params` fills a param tree
leaf by leaf, placing each converted tensor straight into its target sharding,
so host memory holds at most one (stacked) leaf beyond what is already placed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from conversions.mapping import Entry

INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
    pass


class SafetensorsReader:
    """Lazy, tensor-by-tensor reader of an HF checkpoint directory (or a single ``.safetensors`` file)."""

    def __init__(self, path: str):
        from safetensors import safe_open  # local: only the converters need it

        self._open = safe_open
        self.path = path
        if os.path.isfile(path):
            files = {None: path}
        elif os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = {None: os.path.join(path, "model.safetensors")}
        else:
            raise FileNotFoundError(f"no model.safetensors or {INDEX} in {path}")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for name, fn in files.items():
            if name is None:
                for n in self._handle(fn).keys():
                    self._where[n] = fn
            else:
                self._where[name] = fn

    def _handle(self, fn: str):
        if fn not in self._handles:
            self._handles[fn] = self._open(fn, framework="numpy")
        return self._handles[fn]

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConversionError(f"missing tensor {name!r} in {self.path}")
        return self._handle(self._where[name]).get_tensor(name)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _leaf(tree: dict, path: tuple[str, ...]):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            raise ConversionError(f"mapping names param {'/'.join(path)!r}, which the model does not have")
        node = node[p]
    return node


def group_entries(entries: Iterable[Entry]) -> dict[tuple[str, ...], list[Entry]]:
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.jax, []).append(e)
    return groups


def host_leaf(entries: list[Entry], get: Callable[[str], np.ndarray], shape: tuple, dtype) -> np.ndarray:
    """Assembles one JAX leaf (stacking scanned layers) from HF tensors, checking every shape."""
    dtype = _np_dtype(dtype)
    stacked = entries[0].layer is not None
    out = np.empty(shape, dtype)
    for e in entries:
        target = shape[1:] if stacked else shape
        x = get(e.hf)
        try:
            y = e.hook.to_jax(x, target)
        except ValueError:
            y = None
        if y is None or tuple(y.shape) != tuple(target):
            raise ConversionError(f"shape mismatch for {e.hf}: checkpoint has {tuple(x.shape)}, "
                                  f"model expects {'/'.join(e.jax)} {tuple(target)} (after {e.hook.name})")
        if stacked:
            out[e.layer] = y.astype(dtype)
        else:
            out[...] = y.astype(dtype)
    return out


def load_params(entries: list[Entry], get: Callable[[str], np.ndarray], params: dict, shardings: Any = None) -> dict:
    """``params`` with every mapped leaf replaced by the converted HF tensor.

    ``params`` is a (possibly abstract) param tree; ``shardings`` a matching tree
    of shardings (default: the existing leaves' shardings, or the default device).
    Leaves the mapping does not name (conditioners, a fresh projector) are kept.
    """
    params = jax.tree.map(lambda x: x, params)  # shallow copy of the dict structure
    flat_shardings = dict(_flatten(shardings)) if shardings is not None else {}
    for path, group in group_entries(entries).items():
        old = _leaf(params, path)
        host = host_leaf(group, get, tuple(old.shape), old.dtype)
        sharding = flat_shardings.get(path, getattr(old, "sharding", None))
        if sharding is None:
            value = jax.device_put(host)
        else:
            value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        node = params
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        del host
    return params


def export_tensors(entries: list[Entry], params: dict, dtype=None) -> dict[str, np.ndarray]:
    """HF name -> numpy tensor for every entry (``dtype``: cast, default keep)."""
    out = {}
    for path, group in group_entries(entries).items():
        value = np.asarray(jax.device_get(_leaf(params, path)))
        if dtype is not None:
            value = value.astype(_np_dtype(dtype))
        for e in group:
            x = value[e.layer] if e.layer is not None else value
            out[e.hf] = np.ascontiguousarray(e.hook.to_hf(x))
    return out


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree
