"""Hugging Face ``config.json`` <-> lavi_jax config, in one place.

``llm_from_hf`` / ``vision_from_hf`` / ``llava_from_hf`` read HF dicts (as in
``config.json``) into :func:`lavi_jax.config.llm` / :func:`lavi_jax.config.vision`
configs; the fields a file leaves out take the defaults ``transformers`` itself
gives them (``AutoConfig.for_model``; a LLaVA ``text_config`` often lists only what
differs). ``llm_to_hf`` / ``vision_to_hf`` write dicts that ``transformers`` loads.
Anything we cannot represent exactly fails here, with the field named.
"""

from __future__ import annotations

from typing import Any

from lavi_jax import config as C
from lavi_jax import storage
from lavi_jax.hf.errors import UnsupportedModel

LLM_TYPES = {"qwen2": "qwen2", "llama": "llama", "mistral": "llama"}
VISION_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip", "siglip": "siglip", "clip": "clip"}
LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
ANYRES_TYPES = ("llava_next", "llava_onevision")  # tiled images, unpadded features, image_newline


def with_defaults(hf: dict) -> dict:
    """``hf`` with every field it leaves out set as ``transformers.AutoConfig.for_model`` sets it."""
    import transformers  # here, not at import: transformers' config classes import torch where it is installed

    fields = {k: v for k, v in hf.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(hf["model_type"], **fields).to_dict()
    except Exception as e:  # transformers' (and huggingface_hub's) validation errors have no common base
        raise UnsupportedModel(f"{hf['model_type']}: transformers rejects this config ({' '.join(str(e).split())})") from None


def read_config(path: str) -> dict:
    """``config.json`` of an HF directory (or the file itself), local or behind a URI."""
    file = storage.join(path, "config.json") if storage.isdir(path) else path
    if not storage.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}")
    return storage.read_json(file)


def llm_from_hf(hf: dict) -> C.ConfigDict:
    mt = hf.get("model_type")
    if mt not in LLM_TYPES:
        raise UnsupportedModel(f"unsupported LLM model_type {mt!r} (supported: {sorted(LLM_TYPES)})")
    hf = with_defaults(hf)
    if hf.get("use_sliding_window") or (mt == "mistral" and hf.get("sliding_window")):
        raise UnsupportedModel(f"{mt}: sliding-window attention is not supported (sliding_window={hf.get('sliding_window')})")
    if hf.get("mlp_bias"):
        raise UnsupportedModel(f"{mt}: mlp_bias=True is not supported")
    if hf["hidden_act"] != "silu":
        raise UnsupportedModel(f"{mt}: hidden_act={hf['hidden_act']!r} is not supported (silu)")
    rope = dict(hf["rope_parameters"])  # transformers moves rope_theta and a legacy rope_scaling in here
    theta = rope.pop("rope_theta")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModel(f"{mt}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    if "rope_type" in rope:
        rope.pop("type", None)
    scaling = None if kind == "default" else rope
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
        rms_norm_eps=hf["rms_norm_eps"],
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        attention_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf["max_position_embeddings"],
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
    if hf.get("model_type") in ("siglip", "clip"):
        hf = dict(hf.get("vision_config") or {}, model_type=hf["model_type"] + "_vision_model")
    mt = hf.get("model_type")
    if mt not in VISION_TYPES:
        raise UnsupportedModel(f"unsupported vision model_type {mt!r} (supported: {sorted(VISION_TYPES)})")
    kind = VISION_TYPES[mt]
    hf = with_defaults(hf)
    expected = "gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu"
    if hf["hidden_act"] != expected:
        raise UnsupportedModel(f"{mt}: hidden_act={hf['hidden_act']!r} is not supported (expected {expected!r})")
    cfg = C.vision(
        type=kind,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        layer_norm_eps=hf["layer_norm_eps"],
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
    ``drop_cls`` for CLIP towers. ``extras`` holds ``image_token_id``, the
    source's ``model_type`` and, for LLaVA-NeXT / LLaVA-OneVision, ``anyres``
    (:func:`anyres_from_hf`; None otherwise).
    """
    mt = hf.get("model_type")
    if mt not in LLAVA_TYPES:
        raise UnsupportedModel(f"unsupported LLaVA model_type {mt!r} (supported: {list(LLAVA_TYPES)})")
    raw, hf = hf, with_defaults(hf)
    if hf["projector_hidden_act"] != "gelu":
        raise UnsupportedModel(f"{mt}: projector_hidden_act={hf['projector_hidden_act']!r} is not supported (gelu)")
    if hf.get("multimodal_projector_bias") is False:
        raise UnsupportedModel(f"{mt}: multimodal_projector_bias=False is not supported")
    text = dict(hf["text_config"])
    if "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    llm = llm_from_hf(text)
    vis = hf["vision_config"]
    layer = hf["vision_feature_layer"]
    layers = tuple(int(i) for i in (layer if isinstance(layer, (list, tuple)) else [layer]))
    strategy = hf["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise UnsupportedModel(f"{mt}: vision_feature_select_strategy={strategy!r} is not supported (default, full)")
    kind = VISION_TYPES.get(vis["model_type"])
    if strategy == "default" and kind == "siglip":
        raise UnsupportedModel(f"{mt}: vision_feature_select_strategy='default' drops the first SigLIP patch token, "
                               "which lavi_jax does not model (use 'full')")
    vision = vision_from_hf(vis, **dict(dict(feature_layers=layers, drop_cls=strategy == "default"), **vision_overrides))
    image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
    anyres = anyres_from_hf(hf, vision) if mt in ANYRES_TYPES else None
    return llm, vision, {"image_token_id": int(image_token_id), "model_type": mt, "anyres": anyres}


def anyres_from_hf(hf: dict, vision: C.ConfigDict) -> C.ConfigDict:
    """``config.model.anyres`` of a LLaVA-NeXT / LLaVA-OneVision config (``hf`` with transformers' defaults):
    ``image_grid_pinpoints``, OneVision's ``vision_aspect_ratio``, ``max_crops`` from the largest pinpoint."""
    from lavi_jax.models import anyres as geometry  # the checks the model makes when it is built

    pins = tuple((int(h), int(w)) for h, w in hf["image_grid_pinpoints"])
    tile = vision.image_size
    cfg = C.anyres(enabled=True, pinpoints=pins, aspect=hf.get("vision_aspect_ratio") or "anyres", newline=True,
                   max_crops=max((h // tile) * (w // tile) for h, w in pins) if pins else 0)
    try:
        geometry.validate(C.ConfigDict({"anyres": cfg, "vision": vision}))
    except ValueError as e:
        raise UnsupportedModel(f"{hf['model_type']}: image_grid_pinpoints / vision_aspect_ratio: {e}") from None
    return cfg

