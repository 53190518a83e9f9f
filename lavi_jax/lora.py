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

QLoRA (``quantize`` int8 | int4): the kernel of every target is held quantized
and dequantized on the fly, in the interceptor, to the layer's compute dtype::

    kernel        [*in_dims, *out_dims]  int8 / int4  (names: the kernel's)
    kernel_scale  the kernel's shape with its last input axis divided by the block  (param_dtype)
    W = kernel * kernel_scale  (each scale broadcast over its block of ``quant_block`` rows of that axis)

symmetric absmax blocks along the kernel's last input axis (the contraction's
innermost: ``embed`` for q/k/v/gate/up, ``mlp`` for down, ``head_dim`` for o;
``quant_block`` 0: one scale per output channel). The scale carries the kernel's
logical axis names, so it is sharded like the kernel; neither trains. The
quantized base comes from quantizing a float one (:func:`quantize_params`,
which :func:`lavi_jax.checkpoint.initial_params` applies to whatever base it
loads); :func:`merge` dequantizes and folds the adapters.

qwix's ``LoraProvider`` is not used: it scales by ``alpha / r`` only (no rslora),
creates adapters in the base param's dtype (no f32 adapters on a bf16 base) and
drops our logical axis names; our one ``Dense`` makes an explicit adapter short.
Its quantizer is: ``qwix.quantize`` / ``qwix.dequantize`` (tiled absmax, int8 and
int4) do every (de)quantization here; its QLoRA provider is not used, for the
reasons above and because its weights are quantized per call, not held quantized.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util

from lavi_jax.models.layers import Dense, dtype_of

ADAPTERS = ("lora_a", "lora_b")
SCALE = "kernel_scale"  # the quantized kernel's block scales (QLoRA)
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
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
    quantize: str = "none"  # none | int8 | int4: the frozen kernels of the targets (QLoRA)
    quant_block: int = 64  # rows of the last input axis per scale (0: the whole axis)

    @property
    def qtype(self):
        return QTYPES.get(self.quantize)

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
    quantize = str(c.get("quantize", "none") or "none")
    if quantize not in ("none",) + tuple(QTYPES) or int(c.get("quant_block", 64)) < 0:
        raise ValueError(f"train.lora: quantize must be none | {' | '.join(QTYPES)} and quant_block >= 0, "
                         f"got quantize={quantize!r} quant_block={c.get('quant_block')}")
    return LoraSpec(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.get("dropout", 0.0)),
                    targets=target_patterns(c.get("targets", "llm")), rslora=bool(c.get("rslora", False)),
                    dtype=dtype_of(c.get("dtype", "float32")), quantize=quantize,
                    quant_block=int(c.get("quant_block", 64)))


# ----------------------------------------------------------------------------- quantized kernels (QLoRA)


def scale_shape(kernel_shape: tuple, n_in: int, block: int) -> tuple:
    """The ``kernel_scale`` shape of a kernel [*in(n_in), *out]: its last input axis (size d) divided into blocks
    of ``block`` rows (the largest divisor of d not above ``block``; 0: one block)."""
    ax = n_in - 1
    d = kernel_shape[ax]
    b = d if block <= 0 else max(t for t in range(1, min(block, d) + 1) if d % t == 0)
    return kernel_shape[:ax] + (d // b,) + kernel_shape[ax + 1:]


def quantize_like(w: jax.Array, shape: tuple, qtype, dtype) -> tuple[jax.Array, jax.Array]:
    """``(q, scale)`` of ``w`` blocked as a scale of ``shape`` says (an axis where ``shape`` is smaller is split
    into blocks, every other axis has a scale per index; a stacked ``layers`` axis too): qwix's absmax."""
    tiled = {i: w.shape[i] // n for i, n in enumerate(shape) if n != w.shape[i]}
    qa = qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=tuple(i for i in range(w.ndim) if i not in tiled),
                       tiled_axes=tiled, scale_dtype=dtype)
    return qa.qvalue, qa.scale


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The float kernel (``scale``'s dtype) of a quantized one."""
    return qwix.dequantize(qwix.QArray(q, scale, None, q.dtype))


def _quantized_dense(mod: Dense, x: jax.Array, spec: LoraSpec) -> jax.Array:
    """``mod(x)`` with its kernel held quantized (created so at init: the float init, quantized)."""
    feats = (mod.features,) if isinstance(mod.features, int) else tuple(mod.features)
    axes = tuple(a % x.ndim for a in ((mod.axis,) if isinstance(mod.axis, int) else mod.axis))
    n_in, names = len(axes), tuple(mod.names)
    shape = tuple(x.shape[a] for a in axes) + feats
    s_shape = scale_shape(shape, n_in, spec.quant_block)
    s_names = tuple(None if s_shape[i] == 1 != shape[i] else n for i, n in enumerate(names))
    q = s = None
    if mod.is_initializing() and not mod.has_variable("params", "kernel"):
        init = mod.kernel_init or nn.initializers.lecun_normal(in_axis=tuple(range(n_in)),
                                                               out_axis=tuple(range(n_in, len(shape))))
        q, s = quantize_like(init(mod.make_rng("params"), shape, jnp.float32), s_shape, spec.qtype, mod.param_dtype)
    kernel = mod.param("kernel", nn.with_logical_partitioning(lambda *_: q, names))
    scale = mod.param(SCALE, nn.with_logical_partitioning(lambda *_: s, s_names))
    w = dequantize_kernel(kernel, scale).astype(mod.dtype)
    y = jax.lax.dot_general(x.astype(mod.dtype), w, ((axes, tuple(range(n_in))), ((), ())),
                            preferred_element_type=mod.preferred_element_type)
    if mod.use_bias:
        bias = mod.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), names[n_in:]),
                         feats, mod.param_dtype)
        y = y + bias.astype(mod.dtype)
    return y


def quantize_params(params: Any, target: Any) -> Any:
    """Float ``params`` -> the quantized tree ``target`` describes (ShapeDtypeStructs, e.g. of the QLoRA model's
    init): every kernel whose target is an integer dtype is quantized with the blocks of its ``kernel_scale``;
    other leaves pass through. Run it under ``jax.jit`` with the target's shardings as ``out_shardings``."""
    flat, tflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(target)
    out = dict(flat)
    for k, t in tflat.items():
        if k[-1] == "kernel" and jnp.issubdtype(t.dtype, jnp.integer) and not jnp.issubdtype(flat[k].dtype, jnp.integer):
            st = tflat[k[:-1] + (SCALE,)]
            out[k], out[k[:-1] + (SCALE,)] = quantize_like(flat[k], st.shape, t.dtype, st.dtype)
    return traverse_util.unflatten_dict(out)


def dequantize(params: Any) -> Any:
    """``params`` with every quantized kernel back in float (its scale's dtype) and the scales dropped."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] != SCALE}
    for k, s in flat.items():
        if k[-1] == SCALE:
            out[k[:-1] + ("kernel",)] = dequantize_kernel(flat[k[:-1] + ("kernel",)], s)
    return traverse_util.unflatten_dict(out)


def _interceptor(spec: LoraSpec):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if not isinstance(mod, Dense) or context.method_name != "__call__" or not spec.matches(mod.path):
            return next_fun(*args, **kwargs)
        x = args[0]
        y = next_fun(*args, **kwargs) if spec.qtype is None else _quantized_dense(mod, x, spec)
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
    kernel's dtype; a quantized kernel is dequantized first, to its scale's dtype) and the adapter leaves
    dropped: the float params of the unwrapped model."""
    flat = traverse_util.flatten_dict(dequantize(params))
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
