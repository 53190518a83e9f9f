"""Hugging Face checkpoints -> lavi_jax params.

    python -m conversions.import_hf --llm HF_DIR [--vision HF_DIR] [--config CONFIG] \\
        [--dtype float32|bfloat16] --out CKPT_DIR

The model config is derived from the HF ``config.json`` files (the LaVi-only
parts, fusion, projector and conditioner, come from ``--config`` or the
defaults); parameters are created sharded on the mesh, then every mapped
tensor is read from safetensors and placed into its shard. Conditioners and
projector keep their fresh initialisation (zero output projections).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from conversions import hf_config, mapping
from conversions.weights import ConversionError, SafetensorsReader, load_params
from lavi_jax import config as C
from lavi_jax import sharding
from lavi_jax.models.lavi import LaVi


def model_config_from_hf(llm_dir: str, vision_dir: str | None = None, base: C.ConfigDict | None = None) -> C.ConfigDict:
    """A LaVi model config whose LLM (and vision tower) geometry is the HF checkpoints'."""
    m = C.model() if base is None else C.ConfigDict(base.to_dict())
    m.llm = hf_config.llm_from_hf(hf_config.read_config(llm_dir))
    if vision_dir is not None:
        keep = {k: m.vision[k] for k in ("feature_layers", "drop_cls")}
        m.vision = hf_config.vision_from_hf(hf_config.read_config(vision_dir), **keep)
    elif m.fusion != "none":
        raise ValueError(f"fusion={m.fusion!r} needs a vision tower: pass --vision (or use fusion='none')")
    if m.image_token_id >= m.llm.vocab_size:
        m.image_token_id = m.llm.vocab_size - 1
    return m


def import_hf(llm_dir: str, vision_dir: str | None = None, base: C.ConfigDict | None = None, *,
              mesh=None, seed: int = 0, strict: bool = True) -> tuple[C.ConfigDict, dict]:
    """Returns ``(model_config, params)`` with params sharded on ``mesh`` (default: all devices, data-parallel)."""
    cfg = model_config_from_hf(llm_dir, vision_dir, base)
    mesh = mesh or sharding.make_mesh()
    model = LaVi(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = sharding.init_params(model, jax.random.key(seed), ids, mesh=mesh)
    readers = {llm_dir: SafetensorsReader(llm_dir)}
    if vision_dir is not None:
        readers.setdefault(vision_dir, SafetensorsReader(vision_dir))
    entries = {llm_dir: llm_source_entries(cfg, readers[llm_dir].names())}
    if vision_dir is not None:
        entries.setdefault(vision_dir, [])
        entries[vision_dir] = entries[vision_dir] + vision_source_entries(cfg, readers[vision_dir].names())
    for path, reader in readers.items():
        if strict:
            check_names(reader, entries[path])
        params = load_params(entries[path], reader.get, params)
    return cfg, params


def llm_source_entries(cfg: C.ConfigDict, names: list[str]) -> list[mapping.Entry]:
    """LLM entries renamed to where the checkpoint keeps the LLM (plain causal LM or inside LLaVA)."""
    prefix = mapping.detect_prefix(names, "embed_tokens.weight", mapping.LLM_PREFIXES)
    if prefix is None:
        raise ConversionError("no LLM found in checkpoint: no tensor named like 'model.embed_tokens.weight'")
    head = mapping.detect_prefix(names, "lm_head.weight", ("", "language_model.")) or ""
    return mapping.rename(mapping.llm_entries(cfg), lambda n: prefix + n[len("model."):] if n.startswith("model.") else head + n)


def vision_source_entries(cfg: C.ConfigDict, names: list[str]) -> list[mapping.Entry]:
    prefix = mapping.detect_prefix(names, "embeddings.patch_embedding.weight", mapping.VISION_PREFIXES)
    if prefix is None:
        raise ConversionError("no vision tower found in checkpoint: no tensor named like 'embeddings.patch_embedding.weight'")
    return mapping.rename(mapping.vision_entries(cfg), lambda n: prefix + n)


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Parts of the source checkpoints LaVi has no use for: the SigLIP pooling head, CLIP/SigLIP text towers and
# contrastive heads. Anything else that the mapping does not name is an error.
IGNORED_PREFIXES = ("vision_model.head.", "head.", "text_model.", "logit_scale", "logit_bias", "text_projection.",
                    "visual_projection.")


def check_names(reader: SafetensorsReader, entries: list[mapping.Entry]) -> None:
    """Fails on tensors the mapping needs but the checkpoint lacks, and on unknown extra tensors."""
    wanted = {e.hf for e in entries}
    have = set(reader.names())
    missing = sorted(wanted - have)
    if missing:
        raise ConversionError(f"missing tensor {missing[0]!r} in {reader.path}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in have - wanted if not n.endswith(IGNORED_SUFFIXES) and not n.startswith(IGNORED_PREFIXES))
    if extra:
        raise ConversionError(f"{len(extra)} unknown tensor(s) in {reader.path} not used by the mapping: {extra[:10]}")
