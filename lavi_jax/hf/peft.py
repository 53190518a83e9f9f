"""LoRA adapters <-> PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

An adapter directory written here loads as it is with
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/llm), OUT/lora)``;
one trained with PEFT on a Qwen2 / LLaMA causal LM imports onto the same base.
Tensor names are PEFT's (``base_model.model.<module>.lora_A.weight`` [r, in],
``lora_B.weight`` [out, r]), placed through the same name mapping as the base
weights (:mod:`lavi_jax.hf.mapping`), so unrolled and scanned layouts both work.

Supported: plain LoRA on any projection the mapping covers (the LLM's q/k/v/o and
MLP projections; the vision tower's q/k/v/out_proj and fc1/fc2), one rank and one
alpha for every module, ``use_rslora``, ``lora_dropout``. Anything else (DoRA,
``fan_in_fan_out``, trained biases, ``modules_to_save``, per-module ranks, adapters
on embeddings or ``lm_head``, ...) fails at import with :class:`UnsupportedModel`
naming it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import jax
import numpy as np

from lavi_jax import lora, storage
from lavi_jax.hf import mapping
from lavi_jax.hf.errors import ConversionError, UnsupportedModel
from lavi_jax.hf.placement import flatten, hf_tensor_specs, unflatten
from lavi_jax.hf.safetensors_io import SafetensorsReader, write_safetensors

CONFIG_FILE, WEIGHTS_STEM = "adapter_config.json", "adapter_model"
PREFIX = "base_model.model."
LLM_ADAPTER_DIR, VISION_ADAPTER_DIR = "lora", "vision_lora"  # beside OUT/llm and OUT/vision in an export

# adapter_config.json options lavi_jax cannot honour: (key, the value that is fine).
UNSUPPORTED = (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None),
               ("rank_pattern", {}), ("alpha_pattern", {}), ("layer_replication", None), ("use_qalora", False),
               ("lora_bias", False), ("target_parameters", None), ("trainable_token_indices", None),
               ("megatron_config", None), ("alora_invocation_tokens", None))


def _hook_a(n_in: int) -> mapping.Hook:
    """JAX lora_a [*in, r] <-> PEFT lora_A.weight [r, in] (``n_in``: the kernel's input dims)."""
    return mapping.Hook(f"lora_A{n_in}", lambda x, shape: np.ascontiguousarray(x.T).reshape(shape),
                        lambda x: np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T),
                        lambda s: (s[-1], math.prod(s[:-1])), "other")


def _hook_b(n_in: int) -> mapping.Hook:
    """JAX lora_b [r, *out] <-> PEFT lora_B.weight [out, r]."""
    return mapping.Hook(f"lora_B{n_in}", lambda x, shape: np.ascontiguousarray(x.T).reshape(shape),
                        lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T),
                        lambda s: (math.prod(s[1:]), s[0]), "other")


def hf_module(entry: mapping.Entry) -> str:
    return entry.hf[: -len(".weight")]


def adapter_entries(kernel_entries: list[mapping.Entry], spec: lora.LoraSpec | None = None) -> list[mapping.Entry]:
    """``lora_a`` / ``lora_b`` entries (PEFT names) for the kernels among ``kernel_entries`` that ``spec``
    targets (every linear kernel when ``spec`` is None)."""
    out = []
    for e in kernel_entries:
        if e.jax[-1] != "kernel" or not e.hf.endswith(".weight") or e.hook.name not in ("linear1", "linear2"):
            continue
        if spec is not None and not spec.matches(e.jax[:-1]):
            continue
        m, n_in = PREFIX + hf_module(e), int(e.hook.name[-1])
        out.append(dataclasses.replace(e, jax=e.jax[:-1] + ("lora_a",), hf=f"{m}.lora_A.weight", hook=_hook_a(n_in)))
        out.append(dataclasses.replace(e, jax=e.jax[:-1] + ("lora_b",), hf=f"{m}.lora_B.weight", hook=_hook_b(n_in)))
    return out


def _target_modules(modules: list[str], all_modules: list[str]) -> list[str]:
    """PEFT ``target_modules``: the short names (``q_proj``) when every module of those names is adapted,
    else the full module names (PEFT matches a target equal to the name, or a suffix after a dot)."""
    short = lambda m: m.rsplit(".", 1)[-1]
    names = sorted({short(m) for m in modules})
    if sorted(m for m in all_modules if short(m) in names) == sorted(modules):
        return names
    return sorted(modules)


def export_adapter(kernel_entries: list[mapping.Entry], params: dict, spec: lora.LoraSpec, out: str, *,
                   base_model: str = "", dtype=None) -> str | None:
    """Writes the adapters of ``params`` on ``kernel_entries``' modules as a PEFT adapter directory ``out``
    (None, nothing written, when none of those modules has one). Returns ``out``."""
    flat = dict(flatten(params))
    entries = [e for e in adapter_entries(kernel_entries, spec) if e.jax in flat]
    if not entries:
        return None
    modules = sorted({e.hf[len(PREFIX): -len(".lora_A.weight")] for e in entries if e.hook.name.startswith("lora_A")})
    every = sorted({hf_module(e) for e in kernel_entries if e.jax[-1] == "kernel" and e.hook.name.startswith("linear")})
    write_safetensors(out, hf_tensor_specs(entries, params, dtype), stem=WEIGHTS_STEM)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": spec.rank,
           "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
           "target_modules": _target_modules(modules, every), "bias": "none", "fan_in_fan_out": False,
           "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "use_dora": False}
    storage.write_json(storage.join(out, CONFIG_FILE), cfg, indent=2, sort_keys=True)
    return out


def read_adapter_config(path: str) -> dict:
    file = storage.join(path, CONFIG_FILE)
    if not storage.exists(file):
        raise ConversionError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    cfg = storage.read_json(file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModel(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, fine in UNSUPPORTED:
        v = cfg.get(key, fine)
        if v != fine and not (fine is None and not v) and not (fine == {} and not v):
            raise UnsupportedModel(f"{file}: {key}={v!r} is not supported by lavi_jax's LoRA (needs {fine!r})")
    return cfg


def import_adapter(path: str, kernel_entries: list[mapping.Entry], target: dict) -> tuple[lora.LoraSpec, dict]:
    """``(spec, adapter params)`` of the PEFT adapter directory ``path`` on the modules of ``kernel_entries``
    (names as in an HF checkpoint of the base). ``target``: the base's abstract params (their ``kernel``
    shapes size the adapters); the adapters come back as numpy arrays in lavi_jax's layout (a scanned
    ``layers`` axis stacked), zero on stacked layers the adapter does not cover."""
    cfg = read_adapter_config(path)
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    reader = SafetensorsReader(storage.join(path, f"{WEIGHTS_STEM}.safetensors"))
    entries = {e.hf: e for e in adapter_entries(kernel_entries)}
    names = reader.names()
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise UnsupportedModel(f"{path}: adapter tensor {unknown[0]!r} is on a module lavi_jax does not adapt "
                               f"(LoRA on the linear projections of the decoder / vision tower only)")
    flat_t = dict(flatten(target))
    arrays, covered = {}, defaultdict(set)
    for n in names:
        e = entries[n]
        kernel = flat_t[e.jax[:-1] + ("kernel",)]
        kshape = tuple(kernel.shape[1:] if e.layer is not None else kernel.shape)
        n_in = int(e.hook.name[-1])
        shape = kshape[:n_in] + (r,) if e.jax[-1] == "lora_a" else (r,) + kshape[n_in:]
        x = reader.get(n).astype(np.float32)
        if tuple(x.shape) != tuple(e.hook.hf_shape(shape)):
            raise ConversionError(f"{path}: {n} has shape {tuple(x.shape)}, expected {e.hook.hf_shape(shape)} "
                                  f"for r={r} (per-module ranks are not supported)")
        key = e.jax
        if e.layer is None:
            arrays[key] = e.hook.to_jax(x, shape)
        else:
            stack = arrays.setdefault(key, np.zeros((kernel.shape[0],) + shape, np.float32))
            stack[e.layer] = e.hook.to_jax(x, shape)
        covered[hf_module_of(n)].add(e.jax[-1])
    half = [m for m, s in covered.items() if len(s) != 2]
    if half:
        raise ConversionError(f"{path}: module {half[0]!r} has only one of lora_A / lora_B")
    if not arrays:
        raise ConversionError(f"{path}: no adapter tensors")
    modules = sorted({"/".join(k[:-1]) for k in arrays})
    spec = lora.LoraSpec(rank=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                         targets=tuple(f"^{re.escape(m)}$" for m in modules), rslora=bool(cfg.get("use_rslora")))
    reader.close()
    return spec, unflatten(arrays)


def hf_module_of(name: str) -> str:
    return name[len(PREFIX):].rsplit(".lora_", 1)[0]


def place(adapters: dict, target: dict) -> dict:
    """Numpy adapters -> arrays in the shardings of the matching ``target`` leaves (ShapeDtypeStructs)."""
    flat_t = dict(flatten(target))
    return unflatten({k: jax.device_put(v.astype(flat_t[k].dtype), flat_t[k].sharding) for k, v in flatten(adapters)})


def lora_config(spec: lora.LoraSpec) -> dict:
    """``config.train.lora`` values for ``spec``."""
    return {"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "targets": ",".join(spec.targets),
            "rslora": spec.rslora}


def attach(model_cfg, params: dict, mesh, llm_adapter: str | None = None, vision_adapter: str | None = None,
           dtype: str = "float32") -> tuple[lora.LoraSpec, dict]:
    """``(spec, params with adapters)``: the PEFT adapters trained on the LLM (``llm_adapter``) and / or the
    vision tower (``vision_adapter``) of ``params``' base, placed in their shards on ``mesh``."""
    from lavi_jax.checkpoint import abstract_params_for

    base = abstract_params_for(model_cfg, mesh)
    specs, adapters = [], {}
    if llm_adapter:
        s, a = import_adapter(llm_adapter, mapping.llm_entries(model_cfg), base)
        specs.append(s)
        adapters.update(flatten(a))
    if vision_adapter:
        if model_cfg.fusion == "none":
            raise ConversionError("a vision adapter needs a model with a vision tower")
        s, a = import_adapter(vision_adapter, mapping.vision_entries(model_cfg, hf_prefix="vision_model."), base)
        specs.append(s)
        adapters.update(flatten(a))
    if not specs:
        raise ValueError("attach: no adapter directory given")
    key = lambda s: (s.rank, s.alpha, s.rslora)
    if len({key(s) for s in specs}) > 1:
        raise UnsupportedModel(f"the LLM and vision adapters differ in r / lora_alpha / use_rslora: {[key(s) for s in specs]}")
    spec = dataclasses.replace(specs[0], targets=tuple(t for s in specs for t in s.targets),
                               dropout=max(s.dropout for s in specs), dtype=lora.dtype_of(dtype))
    target = abstract_params_for(model_cfg, mesh, spec=spec)
    flat_t = dict(flatten(target))
    missing = [k for k in flat_t if k[-1] in lora.ADAPTERS and k not in adapters]
    if missing:
        raise ConversionError(f"adapter params {'/'.join(missing[0])} not found in the adapter")
    placed = place(unflatten(adapters), target)
    return spec, unflatten({**dict(flatten(params)), **dict(flatten(placed))})
