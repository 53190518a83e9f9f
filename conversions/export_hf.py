"""A lavi_jax checkpoint -> Hugging Face directories PyTorch tools load as they are.

    python -m conversions.export_hf --ckpt CKPT_DIR --out OUT [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]
        [--merge-lora]

writes ``OUT/llm`` (``AutoModelForCausalLM``, with the checkpoint's tokenizer
files), ``OUT/vision`` (``SiglipVisionModel`` / ``CLIPVisionModel``) and
``OUT/lavi`` (projector and conditioner tensors, read by
:mod:`conversions.torch_lavi` and by ``conversions.import_hf --lavi OUT``); the
conversion is :func:`lavi_jax.hf.export_hf`. A LoRA checkpoint also writes PEFT
adapter directories ``OUT/lora`` (and ``OUT/vision_lora``) for
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT + "/llm"), OUT + "/lora")``;
``--merge-lora`` folds the adapters into the exported weights instead.
"""

from __future__ import annotations

import argparse
import sys
import time

from conversions.output_dir import fresh_output_dir
from lavi_jax.hf import ConversionError, UnsupportedModel, export_hf

DTYPES = ("float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"`` or a plain byte count -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversions.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="lavi_jax checkpoint (workdir, checkpoint dir or step dir)")
    p.add_argument("--out", required=True, help="output directory, local or a URI (llm/, vision/, lavi/)")
    p.add_argument("--dtype", choices=DTYPES, help="cast tensors (default: keep the param dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="fold a LoRA checkpoint's adapters into the weights (default: PEFT adapter dirs beside them)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = p.parse_args(argv)
    try:
        out = fresh_output_dir(a.out, a.overwrite)
        t0 = time.time()
        dirs = export_hf(a.ckpt, out, dtype=a.dtype, max_shard_bytes=parse_size(a.max_shard_size),
                         merge_lora=a.merge_lora)
        print(f"wrote {', '.join(dirs)} in {time.time() - t0:.1f}s")
    except (ConversionError, UnsupportedModel, OSError, ValueError) as e:  # OSError: storage.StorageError too
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
