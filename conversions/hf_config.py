"""Hugging Face ``config.json`` <-> lavi_jax config, in one place.

``llm_from_hf`` / ``vision_from_hf`` read the HF dicts (as in ``config.json``)
into :func:`lavi_jax.config.llm` / :func:`lavi_jax.config.vision` configs;
``llm_to_hf`` / ``vision_to_hf`` write dicts that ``transformers`` loads.
Anything we cannot represent exactly fails here, with the field named.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lavi_jax import config as C

LLM_TYPES = {"qwen2": "qwen2", "llama": "llama", "mistral": "llama"}
VISION_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip", "siglip": "siglip", "clip": "clip"}


class UnsupportedModel(ValueError):
    pass


def read_config(path: str) -> dict:
    """``config.json`` of an HF directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(file) as f:
        return json.load(f)


def llm_from_hf(hf: dict) -> C.ConfigDict:
    mt = hf.get("model_type")
    if mt not in LLM_TYPES:
        raise UnsupportedModel(f"unsupported LLM model_type {mt!r} (supported: {sorted(LLM_TYPES)})")
    if hf.get("use_sliding_window") or (mt == "mistral" and hf.get("sliding_window")):
        raise UnsupportedModel(f"{mt}: sliding-window attention is not supported (sliding_window={hf.get('sliding_window')})")
    if hf.get("mlp_bias"):
        raise UnsupportedModel(f"{mt}: mlp_bias=True is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"{mt}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
        if kind == "default":
            scaling = None
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    return C.llm(
        arch=LLM_TYPES[mt],
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )


def llm_to_hf(cfg: Any) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = dict(cfg.rope_scaling, rope_theta=cfg.rope_theta)
        rope.setdefault("rope_type", rope.pop("type", "default"))
    out = dict(
        model_type=cfg.arch,
        architectures=["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_parameters=rope,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
    )
    if cfg.arch == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    elif not cfg.attention_bias:
        raise UnsupportedModel("qwen2 always has q/k/v bias; attention_bias=False cannot be exported as qwen2")
    return out


def vision_from_hf(hf: dict, **overrides) -> C.ConfigDict:
    """From a vision config, or a full SigLIP/CLIP config (its ``vision_config``)."""
    if hf.get("model_type") in ("siglip", "clip") and "vision_config" in hf:
        hf = dict(hf["vision_config"], model_type=hf["model_type"] + "_vision_model")
    mt = hf.get("model_type")
    if mt not in VISION_TYPES:
        raise UnsupportedModel(f"unsupported vision model_type {mt!r} (supported: {sorted(VISION_TYPES)})")
    kind = VISION_TYPES[mt]
    act = hf.get("hidden_act", "gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu")
    expected = "gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu"
    if act != expected:
        raise UnsupportedModel(f"{mt}: hidden_act={act!r} is not supported (expected {expected!r})")
    cfg = C.vision(
        type=kind,
        hidden_size=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 3072),
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16 if kind == "siglip" else 32),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6 if kind == "siglip" else 1e-5),
    )
    cfg.update(overrides)
    return cfg


def vision_to_hf(cfg: Any) -> dict:
    kind = cfg.type
    return dict(
        model_type=f"{kind}_vision_model",
        architectures=["SiglipVisionModel" if kind == "siglip" else "CLIPVisionModel"],
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu",
        **({"vision_use_head": False} if kind == "siglip" else {}),
    )
