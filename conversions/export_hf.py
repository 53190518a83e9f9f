"""A lavi_jax checkpoint -> Hugging Face directories PyTorch tools load as they are.

    python -m conversions.export_hf --ckpt CKPT_DIR --out OUT [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]

writes

* ``OUT/llm``: ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (``AutoModelForCausalLM.from_pretrained``),
  with the checkpoint's tokenizer files when it has them;
* ``OUT/vision``: ``SiglipVisionModel`` / ``CLIPVisionModel`` (models with a vision tower);
* ``OUT/lavi``: the projector and conditioner tensors (``model.safetensors``) and
  ``config.json`` (``{"model_type": "lavi", "model": <config.model>, "modulated_norms": [...]}``),
  read by :mod:`conversions.torch_lavi` and by ``conversions.import_hf --lavi OUT``.

Tensor names come from the same mapping the import uses; tensors are fetched
and written one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from conversions import hf_config, mapping
from conversions.weights import ConversionError, fresh_output_dir, hf_tensor_specs, np_dtype, write_safetensors

LAVI_FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def _write_config(directory: str, cfg: dict) -> None:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def lavi_config(model_cfg) -> dict:
    """The ``lavi/config.json`` contents for a model config."""
    return {"model_type": "lavi", "format_version": LAVI_FORMAT_VERSION,
            "modulated_norms": mapping.modulated_norms(model_cfg),
            "model": json.loads(model_cfg.to_json_best_effort())}


def export_params(model_cfg, params, out: str, *, dtype: str | None = None, tokenizer: str | None = None,
                  max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Writes ``OUT/llm`` (+ ``OUT/vision``, ``OUT/lavi``) for ``params`` of ``model_cfg``. Returns the dirs."""
    m = model_cfg
    torch_dtype = str(np_dtype(dtype or m.param_dtype))
    written = []

    llm_dir = os.path.join(out, "llm")
    write_safetensors(llm_dir, hf_tensor_specs(mapping.llm_entries(m), params, dtype), max_shard_bytes)
    _write_config(llm_dir, dict(hf_config.llm_to_hf(m.llm), dtype=torch_dtype))
    if tokenizer:
        for f in os.listdir(tokenizer):
            if os.path.isfile(os.path.join(tokenizer, f)):
                shutil.copy2(os.path.join(tokenizer, f), os.path.join(llm_dir, f))
    written.append(llm_dir)

    if m.fusion != "none":
        vision_dir = os.path.join(out, "vision")
        write_safetensors(vision_dir, hf_tensor_specs(mapping.vision_entries(m, hf_prefix="vision_model."), params, dtype),
                          max_shard_bytes)
        _write_config(vision_dir, dict(hf_config.vision_to_hf(m.vision), dtype=torch_dtype))
        lavi_dir = os.path.join(out, "lavi")
        write_safetensors(lavi_dir, hf_tensor_specs(mapping.lavi_entries(m), params, dtype), max_shard_bytes)
        _write_config(lavi_dir, lavi_config(m))
        written += [vision_dir, lavi_dir]
    return written


def export_hf(ckpt: str, out: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, mesh=None) -> list[str]:
    """Loads ``ckpt`` (any lavi_jax checkpoint) and exports it to ``out``."""
    import lavi_jax
    from lavi_jax.checkpoint import read_config, tokenizer_dir

    config = read_config(ckpt)
    _, params = lavi_jax.load(ckpt, mesh=mesh)
    return export_params(config.model, params, out, dtype=dtype, tokenizer=tokenizer_dir(ckpt),
                         max_shard_bytes=max_shard_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversions.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="lavi_jax checkpoint (workdir, checkpoint dir or step dir)")
    p.add_argument("--out", required=True, help="output directory (llm/, vision/, lavi/)")
    p.add_argument("--dtype", choices=DTYPES, help="cast tensors (default: keep the param dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = p.parse_args(argv)
    try:
        out = fresh_output_dir(a.out, a.overwrite)
        t0 = time.time()
        dirs = export_hf(a.ckpt, out, dtype=a.dtype, max_shard_bytes=parse_size(a.max_shard_size))
        print(f"wrote {', '.join(dirs)} in {time.time() - t0:.1f}s")
    except (ConversionError, hf_config.UnsupportedModel, FileNotFoundError, ValueError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
