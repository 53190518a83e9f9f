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
LLAVA_TYPES = ("llava", "llava_onevision")

# transformers' defaults for fields that config.json files may leave out (the
# nested text_config of LLaVA checkpoints often lists only what differs).
LLM_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=32768),
}


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
    hf = {**LLM_DEFAULTS[mt], **hf}
    if hf.get("use_sliding_window") or (mt == "mistral" and hf.get("sliding_window")):
        raise UnsupportedModel(f"{mt}: sliding-window attention is not supported (sliding_window={hf.get('sliding_window')})")
    if hf.get("mlp_bias"):
        raise UnsupportedModel(f"{mt}: mlp_bias=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{mt}: hidden_act={hf['hidden_act']!r} is not supported (silu)")
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


def llava_from_hf(hf: dict, **vision_overrides) -> tuple[C.ConfigDict, C.ConfigDict, dict]:
    """``(llm config, vision config, extras)`` from a LLaVA / LLaVA-OneVision ``config.json``.

    ``vision_feature_layer`` becomes ``vision.feature_layers``; the
    ``vision_feature_select_strategy`` ``"default"`` (drop the CLS token) maps to
    ``drop_cls`` for CLIP towers. ``extras`` holds ``image_token_id`` and the
    source's ``model_type``.
    """
    mt = hf.get("model_type")
    if mt not in LLAVA_TYPES:
        raise UnsupportedModel(f"unsupported LLaVA model_type {mt!r} (supported: {list(LLAVA_TYPES)})")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedModel(f"{mt}: projector_hidden_act={hf['projector_hidden_act']!r} is not supported (gelu)")
    if hf.get("multimodal_projector_bias") is False:
        raise UnsupportedModel(f"{mt}: multimodal_projector_bias=False is not supported")
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    llm = llm_from_hf(text)
    vis = dict(hf.get("vision_config") or {})
    vis.setdefault("model_type", "clip_vision_model")
    layer = hf.get("vision_feature_layer", -2 if mt == "llava" else -1)
    layers = tuple(int(i) for i in (layer if isinstance(layer, (list, tuple)) else [layer]))
    strategy = hf.get("vision_feature_select_strategy", "default" if mt == "llava" else "full")
    if strategy not in ("default", "full"):
        raise UnsupportedModel(f"{mt}: vision_feature_select_strategy={strategy!r} is not supported (default, full)")
    kind = VISION_TYPES.get(vis["model_type"])
    if strategy == "default" and kind == "siglip":
        raise UnsupportedModel(f"{mt}: vision_feature_select_strategy='default' drops the first SigLIP patch token, "
                               "which lavi_jax does not model (use 'full')")
    vision = vision_from_hf(vis, **dict(dict(feature_layers=layers, drop_cls=strategy == "default"), **vision_overrides))
    image_token_id = hf.get("image_token_id", hf.get("image_token_index", 32000 if mt == "llava" else 151646))
    return llm, vision, {"image_token_id": int(image_token_id), "model_type": mt}
