"""Config schema (ml_collections) and the loader for ``configs/*.py:arg`` files.

A config file in ``configs/`` defines ``get_config(arg)`` and builds its model
config from the constructors below, so every knob has one default and one
docstring. The model sees ``config.model`` only.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

ConfigDict = ml_collections.ConfigDict


def llm(**overrides) -> ConfigDict:
    """Decoder-only LLM (Qwen2 / LLaMA family)."""
    c = ConfigDict()
    c.arch = "qwen2"  # "qwen2" (q/k/v bias) | "llama" (LLaMA, Vicuna, Mistral-without-sliding-window)
    c.vocab_size = 151936
    c.hidden_size = 3584
    c.intermediate_size = 18944
    c.num_layers = 28
    c.num_heads = 28
    c.num_kv_heads = 4
    c.head_dim = 128
    c.rope_theta = 1_000_000.0
    # None, or {"rope_type": "linear"|"llama3", "factor", ...} as in HF config.json.
    c.rope_scaling = None
    c.rms_norm_eps = 1e-6
    c.tie_word_embeddings = False
    c.attention_bias = True
    c.max_position_embeddings = 32768
    c.update(overrides)
    return c


def vision(**overrides) -> ConfigDict:
    """ViT vision tower with HF SigLIP or CLIP numerics (patch features; SigLIP's pooling head is not part of it)."""
    c = ConfigDict()
    c.type = "siglip"  # "siglip" | "clip"
    c.hidden_size = 1152
    c.intermediate_size = 4304
    c.num_layers = 27
    c.num_heads = 16
    c.image_size = 384
    c.patch_size = 14
    c.layer_norm_eps = 1e-6
    # Indices into HF's ``hidden_states`` tuple (0 = embeddings, -1 = last layer,
    # before post-layernorm). Several indices are concatenated along features.
    c.feature_layers = (-2,)
    c.drop_cls = True  # CLIP only: drop the CLS token from the features
    # Initial position embeddings of a randomly initialised tower: "normal" (HF's
    # initialisation) or "sincos2d" (fixed 2-D sin-cos values, as big_vision's
    # from-scratch ViTs; still trained). Imported weights replace either.
    c.posemb_init = "normal"
    c.update(overrides)
    return c


def projector(**overrides) -> ConfigDict:
    """Visual features -> conditioning width (modulation) or LLM width (concat)."""
    c = ConfigDict()
    c.type = "mlp2x_gelu"  # "mlp2x_gelu" | "linear"
    c.pool = 1  # spatial average pooling window (2 = 2x2 pooling, 4x fewer tokens)
    c.max_frames = 32  # size of the learned temporal embedding table
    c.temporal_embedding = True  # add a learned per-frame embedding before concatenating frames
    c.update(overrides)
    return c


def conditioner(**overrides) -> ConfigDict:
    """Delta generators producing token-wise (dgamma, dbeta) for modulated RMSNorms."""
    c = ConfigDict()
    c.type = "attention"  # "attention" | "mlp" | "conv"
    c.width = 512  # conditioning width: the projector's output and the conditioner's inner width
    c.num_heads = 8  # attention conditioner only
    c.norms = ("attn", "mlp")  # sublayer norms modulated: "attn" (input_layernorm), "mlp" (post_attention_layernorm)
    c.final_norm = False  # also modulate the final norm before the LM head
    c.params = ("scale", "shift")  # affine parameters receiving deltas
    c.every = 1  # modulate layers offset, offset+every, ...
    c.offset = 0
    c.layers = ()  # explicit modulated layer indices, e.g. (0, 4, 8); empty: every/offset
    c.shared = False  # one conditioner for every modulated norm instead of one per norm
    c.conv_kernel = 3  # conv conditioner only: spatial kernel over each frame's token grid
    c.update(overrides)
    return c


def model(**overrides) -> ConfigDict:
    """The whole LaVi model."""
    c = ConfigDict()
    c.fusion = "modulation"  # "modulation" (LaVi) | "concat" (LLaVA baseline) | "none" (text only)
    c.image_token_id = 151646
    c.llm = llm()
    c.vision = vision()
    c.projector = projector()
    c.conditioner = conditioner()
    c.dtype = "float32"  # compute dtype
    c.param_dtype = "float32"
    c.scan_layers = False
    c.remat_policy = "none"  # "none" | "full" | "dots" | "dots_with_no_batch_dims"
    c.update(overrides)
    return c


def get(spec: str) -> ConfigDict:
    """Loads ``path/to/config.py[:arg]`` by calling its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.exists(here):
            path = here
        else:
            raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_lavi_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def make_tiny(model_config: ConfigDict) -> ConfigDict:
    """Shrinks a model config in place to a few MB, keeping its structure (arch, towers, fusion, knobs)."""
    m = model_config
    m.llm.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=2048)
    m.image_token_id = 511
    m.vision.update(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=32, patch_size=8)
    m.projector.max_frames = 8
    m.conditioner.update(width=32, num_heads=4)
    return m


def experiment(model_config: ConfigDict) -> ConfigDict:
    """A full run config around ``model_config``: model, data, train, mesh, init, evals."""
    from lavi_jax.data.config import data_config
    from lavi_jax.train_lib import train_config

    c = ConfigDict()
    c.model = model_config
    c.data = data_config(image_size=model_config.vision.image_size, processor=model_config.vision.type)
    c.train = train_config()
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: fill with the remaining devices
    c.init = ConfigDict({"checkpoint": "", "hf_llm": "", "hf_vision": ""})  # used when the workdir has no checkpoint
    # every=0: at the end only. exact_match: teacher-forced exact match on data.eval_json. tasks: benchmark
    # evaluations by generation (see README, "Evaluating a checkpoint"), e.g. "pope,textvqa".
    c.evals = ConfigDict({"every": 0, "exact_match": True, "batch_size": 0, "tasks": "", "max_new_tokens": 64, "limit": 0})
    c.dry_run = False
    return c
