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
"""

from __future__ import annotations

import json

from lavi_jax import storage
from lavi_jax.checkpoint import load, read_config, tokenizer_dir
from lavi_jax.hf import config as hf_config
from lavi_jax.hf import mapping
from lavi_jax.hf.placement import hf_tensor_specs
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


def export_hf(ckpt: str, out: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, mesh=None) -> list[str]:
    """Loads ``ckpt`` (any lavi_jax checkpoint) and exports it to ``out``."""
    config = read_config(ckpt)
    _, params = load(ckpt, mesh=mesh)
    return export_params(config.model, params, out, dtype=dtype, tokenizer=tokenizer_dir(ckpt),
                         max_shard_bytes=max_shard_bytes)
