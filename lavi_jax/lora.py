"""LoRA: low-rank adapters on the frozen projections of a model (``config.train.lora``).

Every :class:`lavi_jax.models.layers.Dense` whose module path (``/``-joined,
e.g. ``llm/layers_0/self_attn/q_proj`` or, scanned,
``llm/blocks/layers_0/self_attn/q_proj``) matches one of ``targets`` gets two
params next to its kernel::

    kernel [*in_dims, *out_dims]  ->  lora_a [*in_dims, r]  (names: the kernel's input names, None)
                                      lora_b [r, *out_dims] (names: None, the kernel's output names)
    y = x @ kernel + scale * dropout(x) @ lora_a @ lora_b,   scale = alpha / r  (alpha / sqrt(r) with rslora)

exactly PEFT's ``LoraLayer`` (``lora_A`` = ``lora_a.T``, ``lora_B`` = ``lora_b.T``). The adapters carry
the logical axis names of the kernel they adapt, so the one rules table in
:mod:`lavi_jax.sharding` shards them like their kernel (the rank axis is replicated);
``lora_a`` starts Kaiming-uniform and ``lora_b`` at zero, as in PEFT, so a fresh
adapter leaves the model's output unchanged.

:func:`wrap` returns the model with the adapters switched on (its ``init`` /
``apply`` run under a flax method interceptor, so the model code itself stays
untouched); :func:`merge` folds the adapters into the kernels and returns plain
params of the unwrapped model (what evaluation, generation and export use).

qwix's ``LoraProvider`` is not used: it scales by ``alpha / r`` only (no rslora),
creates adapters in the base param's dtype (no f32 adapters on a bf16 base) and
drops our logical axis names; our one ``Dense`` makes an explicit adapter short.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lavi_jax.models.layers import Dense, dtype_of

ADAPTERS = ("lora_a", "lora_b")
ADAPTER_PATTERN = r"/lora_[ab]$"  # the trainable-param regex of every adapter
LLM_TARGETS = r"^llm/(.+/)?(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$"
VISION_TARGETS = r"^vision/(.+/)?(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
TARGET_PRESETS = {"llm": (LLM_TARGETS,), "vision": (VISION_TARGETS,), "llm+vision": (LLM_TARGETS, VISION_TARGETS)}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = (LLM_TARGETS,)
    rslora: bool = False
    dtype: Any = jnp.float32

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def matches(self, module_path) -> bool:
        name = "/".join(str(p) for p in module_path)
        return any(re.search(t, name) for t in self.targets)


def target_patterns(targets) -> tuple[str, ...]:
    """A preset name (``TARGET_PRESETS``), comma-separated regexes or a sequence of regexes -> regexes."""
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = tuple(str(t) for t in targets)
    for t in out:
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"train.lora.targets: {t!r} is neither a preset ({sorted(TARGET_PRESETS)}) nor a regex: {e}")
    if not out:
        raise ValueError("train.lora.targets is empty")
    return out


def spec_from_config(c) -> LoraSpec | None:
    """``config.train.lora`` -> a :class:`LoraSpec`, or None when LoRA is off (no ``lora`` block or rank 0)."""
    if c is None or not int(c.get("rank", 0) or 0):
        return None
    if int(c.rank) < 0 or not 0.0 <= float(c.get("dropout", 0.0)) < 1.0:
        raise ValueError(f"train.lora: rank must be > 0 and dropout in [0, 1), got rank={c.rank} dropout={c.dropout}")
    return LoraSpec(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.get("dropout", 0.0)),
                    targets=target_patterns(c.get("targets", "llm")), rslora=bool(c.get("rslora", False)),
                    dtype=dtype_of(c.get("dtype", "float32")))


def _interceptor(spec: LoraSpec):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if not isinstance(mod, Dense) or context.method_name != "__call__" or not spec.matches(mod.path):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        feats = (mod.features,) if isinstance(mod.features, int) else tuple(mod.features)
        axes = tuple(a % x.ndim for a in ((mod.axis,) if isinstance(mod.axis, int) else mod.axis))
        n_in = len(axes)
        in_shape, names = tuple(x.shape[a] for a in axes), tuple(mod.names)
        init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=n_in)
        a = mod.param("lora_a", nn.with_logical_partitioning(init_a, names[:n_in] + (None,)), in_shape + (spec.rank,),
                      spec.dtype)
        b = mod.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,) + names[n_in:]),
                      (spec.rank,) + feats, spec.dtype)
        if spec.dropout and mod.scope.has_rng("dropout"):
            keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
        xa = jax.lax.dot_general(x.astype(mod.dtype), a.astype(mod.dtype), ((axes, tuple(range(n_in))), ((), ())))
        delta = jax.lax.dot_general(xa, b.astype(mod.dtype), (((xa.ndim - 1,), (0,)), ((), ())))
        return y + (spec.scale * delta).astype(y.dtype)

    return intercept


class LoraModel:
    """``model`` with adapters: ``init`` / ``apply`` as the model's (params gain ``lora_a`` / ``lora_b`` under
    every target); other attributes are the wrapped model's."""

    def __init__(self, model: nn.Module, spec: LoraSpec):
        self.model, self.spec = model, spec

    def init(self, *args, **kwargs):
        with nn.intercept_methods(_interceptor(self.spec)):
            return self.model.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        with nn.intercept_methods(_interceptor(self.spec)):
            return self.model.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


def wrap(model: nn.Module, spec: LoraSpec | None):
    """``model`` with adapters per ``spec`` (``model`` itself when ``spec`` is None)."""
    return model if spec is None else LoraModel(model, spec)


def unwrap(model):
    return model.model if isinstance(model, LoraModel) else model


def is_adapter(path) -> bool:
    return str(getattr(path[-1], "key", path[-1])) in ADAPTERS


def split(params: Any) -> tuple[dict, dict]:
    """``(adapters, rest)``: nested dicts with disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] in ADAPTERS}),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in ADAPTERS}))


def delta(a: jax.Array, b: jax.Array, kernel_shape: tuple, scale: float) -> jax.Array:
    """``scale * a @ b`` in the kernel's layout. a: [*lead, *in, r], b: [*lead, r, *out] (``lead``: a stacked
    ``layers`` axis of scanned params) -> [*lead, *in, *out] = ``kernel_shape``, float32."""
    n_out = len(kernel_shape) - a.ndim + 1
    lead = b.shape[: b.ndim - 1 - n_out]
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(lead + (-1, r))
    b2 = b.astype(jnp.float32).reshape(lead + (r, -1))
    return (scale * jnp.matmul(a2, b2)).reshape(kernel_shape)


def merge(params: Any, spec: LoraSpec) -> dict:
    """Params with every adapter folded into its kernel (``kernel + scale * a @ b``, rounded once to the
    kernel's dtype) and the adapter leaves dropped: the params of the unwrapped model."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in ADAPTERS}
    for k, a in flat.items():
        if k[-1] == "lora_a":
            kk = k[:-1] + ("kernel",)
            w = flat[kk]
            out[kk] = (w.astype(jnp.float32) + delta(a, flat[k[:-1] + ("lora_b",)], w.shape, spec.scale)).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def count(params: Any) -> tuple[int, int]:
    """``(adapter params, all params)``."""
    flat = traverse_util.flatten_dict(params)
    n = lambda items: int(sum(math.prod(v.shape) for _, v in items))
    return n((k, v) for k, v in flat.items() if k[-1] in ADAPTERS), n(flat.items())
