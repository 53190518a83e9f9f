"""Hugging Face (and LaVi export) checkpoints -> a lavi_jax checkpoint.

    python -m conversions.import_hf --llm HF_DIR [--vision HF_DIR] --out CKPT_DIR
    python -m conversions.import_hf --llava HF_DIR --out CKPT_DIR          # LLM + vision tower (+ projector)
    python -m conversions.import_hf --lavi EXPORT_DIR --out CKPT_DIR       # a conversions.export_hf directory
    python -m conversions.import_hf --llm Qwen/Qwen2-7B-Instruct --out gs://bucket/ckpt   # a Hub id, a bucket
    python -m conversions.import_hf --llm BASE --lora ADAPTER_DIR --out CKPT_DIR   # + a PEFT LoRA adapter
        [--config CONFIG[:arg]] [--fusion modulation|concat|none] [--dtype float32|bfloat16]
        [--mesh-data -1] [--mesh-fsdp 1] [--mesh-tensor 1] [--scan] [--overwrite]

The conversion is :func:`lavi_jax.hf.import_hf` (sources, defaults and what is
not imported are described there). LaVi-only knobs and the rest of the run
config come from ``--config``; the mesh is ``--config``'s ``mesh`` (default: all
devices, data-parallel) with any ``--mesh-*`` size replacing its axis. The
checkpoint is written with :func:`lavi_jax.checkpoint.save_params`; the LLM's
tokenizer files are copied to ``CKPT_DIR/tokenizer``.

``--lora`` (an adapter PEFT trained on the LLM) and ``--vision-lora`` (on the
vision tower) add the adapters to the imported base: the checkpoint holds base
and adapters, its ``config.train.lora`` is the adapter's, and training from it
(``--config.init.checkpoint=CKPT_DIR`` with the same ``train.lora``) continues
the adapters (:mod:`lavi_jax.hf.peft`).

Every directory may be a local path or a URI (``gs://bucket/dir``); ``--llm``,
``--vision`` and ``--llava`` may also be Hugging Face Hub ids
(``org/name[@revision]``), fetched into (or, with ``HF_HUB_OFFLINE=1``, found
in) the Hub cache (:mod:`lavi_jax.hf.hub`).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from conversions.output_dir import fresh_output_dir
from lavi_jax import config as C
from lavi_jax import sharding, storage
from lavi_jax.checkpoint import save_params
from lavi_jax.hf import (ConversionError, UnsupportedModel, copy_tokenizer, full_config, hub, import_hf,
                         tokenizer_source)
from lavi_jax.hf import peft

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(args, config: C.ConfigDict | None) -> dict[str, int] | None:
    """``config.mesh`` with the axes given as ``--mesh-<axis>`` replaced; None: the default mesh."""
    shape = dict(config.mesh) if config is not None and "mesh" in config else {}
    shape.update({a: getattr(args, f"mesh_{a}") for a in MESH_AXES if getattr(args, f"mesh_{a}") is not None})
    return shape or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversions.import_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", help="HF causal-LM directory, URI or Hub id (Qwen2 / LLaMA / Mistral)")
    p.add_argument("--vision", help="HF SigLIP / CLIP (vision) model directory, URI or Hub id")
    p.add_argument("--llava", help="HF LLaVA / LLaVA-NeXT / LLaVA-OneVision directory, URI or Hub id "
                                   "(LLM + vision tower + projector)")
    p.add_argument("--lavi", help="a directory (or URI) written by conversions.export_hf (llm/, vision/, lavi/)")
    p.add_argument("--lora", help="PEFT LoRA adapter directory (adapter_config.json) trained on the LLM")
    p.add_argument("--vision-lora", "--vision_lora", dest="vision_lora",
                   help="PEFT LoRA adapter directory trained on the vision model")
    p.add_argument("--config", help="config file (path.py[:arg]) for the LaVi knobs and the rest of the run config")
    p.add_argument("--fusion", choices=["modulation", "concat", "none"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="param dtype (default: the config's)")
    for axis in MESH_AXES:
        p.add_argument(f"--mesh-{axis}", f"--mesh_{axis}", dest=f"mesh_{axis}", type=int, metavar="N",
                       help=f"size of the mesh's {axis!r} axis (-1: the remaining devices; default: the config's)")
    p.add_argument("--scan", action="store_true", help="scanned layer layout")
    p.add_argument("--seed", type=int, default=0, help="init seed of the freshly initialised params")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="ignore unknown extra tensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CKPT_DIR")
    p.add_argument("--out", required=True, help="CKPT_DIR to write (local or a URI)")
    a = p.parse_args(argv)
    try:
        out = fresh_output_dir(a.out, a.overwrite)
        a.llm, a.vision, a.llava = hub.resolve(a.llm), hub.resolve(a.vision), hub.resolve(a.llava)
        base_config = C.get(a.config) if a.config else None
        base = base_config.model if base_config is not None else None
        mesh = sharding.make_mesh(mesh_shape(a, base_config))
        t0 = time.time()
        cfg, params = import_hf(a.llm, a.vision, base, llava_dir=a.llava, lavi_dir=a.lavi, fusion=a.fusion,
                                dtype=a.dtype, scan=True if a.scan else None, mesh=mesh, seed=a.seed,
                                strict=a.strict, log=print)
        config = full_config(cfg, base_config)
        if a.lora or a.vision_lora:
            spec, params = peft.attach(cfg, params, mesh, a.lora, a.vision_lora)
            config.train.lora.update(peft.lora_config(spec))
            print(f"LoRA r={spec.rank} alpha={spec.alpha}{' rslora' if spec.rslora else ''} on "
                  f"{len(spec.targets)} module path pattern(s)")
        tok_src = tokenizer_source(a.llm, a.llava, a.lavi)
        storage.makedirs(out)
        tok_dst = storage.join(out, "tokenizer")
        if copy_tokenizer(tok_src, tok_dst):
            config.data.tokenizer = tok_dst
        else:
            print(f"no tokenizer files in {tok_src}; data.tokenizer stays {config.data.tokenizer!r}")
        save_params(out, config, params)
        n = sum(int(x.size) for x in jax.tree.leaves(params))
        print(f"wrote {out}: {cfg.fusion} model, {n / 1e6:.1f}M params ({cfg.param_dtype}, "
              f"{'scanned' if cfg.scan_layers else 'unrolled'} layers) in {time.time() - t0:.1f}s")
    except (ConversionError, UnsupportedModel, OSError, ValueError) as e:  # OSError: storage.StorageError too
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
