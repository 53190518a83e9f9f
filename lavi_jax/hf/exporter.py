"""A lavi_jax model -> Hugging Face directories PyTorch tools load as they are.

:func:`export_params` writes

* ``OUT/llm``: ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (``AutoModelForCausalLM.from_pretrained``),
  with the tokenizer files when given;
* ``OUT/vision``: ``SiglipVisionModel`` / ``CLIPVisionModel`` (models with a vision tower);
* ``OUT/lavi``: the projector and conditioner tensors (``model.safetensors``) and
  ``config.json`` (``{"model_type": "lavi", "model": <config.model>, "modulated_norms": [...]}``),
  read by ``conversions.torch_lavi`` and by :func:`lavi_jax.hf.import_hf` (``lavi_dir=OUT``).

Tensor names come from the same mapping the import uses; tensors are fetched
and written one at a time.

A LoRA checkpoint exports its frozen base as above plus PEFT adapter directories
``OUT/lora`` (the LLM's adapters) and ``OUT/vision_lora`` (the vision tower's, if
any) that ``PeftModel.from_pretrained`` loads onto ``OUT/llm`` / ``OUT/vision``
(:mod:`lavi_jax.hf.peft`); with ``merge_lora`` the adapters are folded into the
weights instead.
"""

from __future__ import annotations

import json

from lavi_jax import lora, storage
from lavi_jax.checkpoint import load, lora_spec, read_config, restore_run_params, tokenizer_dir
from lavi_jax.hf import config as hf_config
from lavi_jax.hf import mapping, peft
from lavi_jax.hf.errors import ConversionError
from lavi_jax.hf.placement import flatten, hf_tensor_specs
from lavi_jax.hf.safetensors_io import np_dtype, write_safetensors

LAVI_FORMAT_VERSION = 1


def _write_config(directory: str, cfg: dict) -> None:
    storage.write_json(storage.join(directory, "config.json"), cfg, indent=2, sort_keys=True)


def lavi_config(model_cfg) -> dict:
    """The ``lavi/config.json`` contents for a model config."""
    return {"model_type": "lavi", "format_version": LAVI_FORMAT_VERSION,
            "modulated_norms": mapping.modulated_norms(model_cfg),
            "model": json.loads(model_cfg.to_json_best_effort())}


def export_params(model_cfg, params, out: str, *, dtype: str | None = None, tokenizer: str | None = None,
                  max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Writes ``OUT/llm`` (+ ``OUT/vision``, ``OUT/lavi``) for ``params`` of ``model_cfg`` (``out`` local or a URI;
    ``tokenizer``: a directory whose files are copied into ``OUT/llm``). Returns the dirs."""
    m = model_cfg
    torch_dtype = str(np_dtype(dtype or m.param_dtype))
    written = []

    llm_dir = storage.join(out, "llm")
    write_safetensors(llm_dir, hf_tensor_specs(mapping.llm_entries(m), params, dtype), max_shard_bytes)
    _write_config(llm_dir, dict(hf_config.llm_to_hf(m.llm), dtype=torch_dtype))
    if tokenizer:
        storage.copy_tree(tokenizer, llm_dir)
    written.append(llm_dir)

    if m.fusion != "none":
        vision_dir = storage.join(out, "vision")
        write_safetensors(vision_dir, hf_tensor_specs(mapping.vision_entries(m, hf_prefix="vision_model."), params, dtype),
                          max_shard_bytes)
        _write_config(vision_dir, dict(hf_config.vision_to_hf(m.vision), dtype=torch_dtype))
        lavi_dir = storage.join(out, "lavi")
        write_safetensors(lavi_dir, hf_tensor_specs(mapping.lavi_entries(m), params, dtype), max_shard_bytes)
        _write_config(lavi_dir, lavi_config(m))
        written += [vision_dir, lavi_dir]
    return written


def export_adapters(model_cfg, params, spec: lora.LoraSpec, out: str, *, dtype: str | None = None) -> list[str]:
    """Writes the LoRA adapters of ``params`` as PEFT adapter directories ``OUT/lora`` (LLM) and
    ``OUT/vision_lora`` (vision tower), each only where it has adapters. Returns the dirs."""
    entries = mapping.llm_entries(model_cfg) + (mapping.vision_entries(model_cfg) if model_cfg.fusion != "none" else [])
    exported = {e.jax for e in peft.adapter_entries(entries, spec)}
    stray = [k for k, _ in flatten(params) if k[-1] in lora.ADAPTERS and k not in exported]
    if stray:
        raise ConversionError(f"adapter {'/'.join(stray[0])} is on a module PEFT's LLM / vision models do not have; "
                              "export with merge_lora (--merge-lora)")
    llm = peft.export_adapter(mapping.llm_entries(model_cfg, hf_prefix=""), params, spec,
                              storage.join(out, peft.LLM_ADAPTER_DIR), base_model=storage.join(out, "llm"), dtype=dtype)
    vision = None
    if model_cfg.fusion != "none":
        vision = peft.export_adapter(mapping.vision_entries(model_cfg, hf_prefix="vision_model."), params, spec,
                                     storage.join(out, peft.VISION_ADAPTER_DIR), base_model=storage.join(out, "vision"),
                                     dtype=dtype)
    return [d for d in (llm, vision) if d]


def export_hf(ckpt: str, out: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, mesh=None,
              merge_lora: bool = False) -> list[str]:
    """Loads ``ckpt`` (any lavi_jax checkpoint) and exports it to ``out``; a LoRA checkpoint's adapters go
    to PEFT adapter directories beside the base, or with ``merge_lora`` into the weights."""
    config = read_config(ckpt)
    spec = lora_spec(config)
    if spec is None or merge_lora:
        _, params = load(ckpt, mesh=mesh)
        return export_params(config.model, params, out, dtype=dtype, tokenizer=tokenizer_dir(ckpt),
                             max_shard_bytes=max_shard_bytes)
    _, params = restore_run_params(ckpt, mesh)
    params = lora.dequantize(params)  # a QLoRA base is exported in float
    dirs = export_params(config.model, params, out, dtype=dtype, tokenizer=tokenizer_dir(ckpt),
                         max_shard_bytes=max_shard_bytes)
    return dirs + export_adapters(config.model, params, spec, out, dtype=dtype)
