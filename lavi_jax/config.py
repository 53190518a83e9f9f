"""Every default, in one place: the config schema (ml_collections) and the loader for ``configs/*.py:arg`` files.

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
    # 2: each frame of a video (an item of several frames; modulation without anyres) resized bilinearly to
    # ceil(side / 2) per side after projection, as LLaVA-OneVision pools video tokens (27x27 -> 14x14)
    c.video_pool = 1
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
    # attention only: "none" (each norm projects its own visual keys/values), "all" (one K/V projection shared by
    # every conditioner) or "k" (a digit string: one per group of k consecutive modulated layers; unrolled layers
    # only); each norm keeps its own query and output projections
    c.kv_share = "none"
    c.conv_kernel = 3  # conv conditioner only: spatial kernel over each frame's token grid
    c.update(overrides)
    return c


def anyres(**overrides) -> ConfigDict:
    """Any-resolution images as LLaVA-NeXT / LLaVA-OneVision tile them (``config.model.anyres``).

    An image item is ``1 + max_crops`` frames: the whole image at the tower's size, then the crops of the
    best canvas among ``pinpoints`` in row-major order (masked past the image's own crop count).
    """
    c = ConfigDict()
    c.enabled = False  # anyres tiling on/off for images
    c.pinpoints = ()  # ((h, w), ...): canvases, multiples of vision.image_size (HF image_grid_pinpoints)
    c.max_crops = 0  # static maximum crops per image item (>= rows * cols of every pinpoint)
    # "anyres" (LLaVA-NeXT) | "anyres_max_N" (OneVision: tile features larger than N tiles are bilinearly
    # downsampled to about N tiles; videos are pooled 2x2 with one newline per video)
    c.aspect = "anyres"
    c.newline = True  # concat: an ``image_newline`` embedding after each feature row
    c.tile_embedding = "grid"  # modulation (LaVi-HD): "grid" (learned tile-position embedding) | "temporal"
    c.update(overrides)
    return c


# image_grid_pinpoints of llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf (config.json), with 384-px tiles,
# vision_aspect_ratio "anyres_max_9": canvases of 1x1 up to 6x6 tiles (max_crops=36).
ONEVISION_PINPOINTS = (
    (384, 384), (384, 768), (384, 1152), (384, 1536), (384, 1920), (384, 2304),
    (768, 384), (768, 768), (768, 1152), (768, 1536), (768, 1920), (768, 2304),
    (1152, 384), (1152, 768), (1152, 1152), (1152, 1536), (1152, 1920), (1152, 2304),
    (1536, 384), (1536, 768), (1536, 1152), (1536, 1536), (1536, 1920), (1536, 2304),
    (1920, 384), (1920, 768), (1920, 1152), (1920, 1536), (1920, 1920), (1920, 2304),
    (2304, 384), (2304, 768), (2304, 1152), (2304, 1536), (2304, 1920), (2304, 2304),
)


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
    c.remat_policy = "none"  # "none" | "full" | "offload" (full, layer inputs in host memory) | "dots" | "dots_with_no_batch_dims"
    c.attention = "auto"  # "auto" (splash on TPU, cudnn on GPU, xla on CPU) | "xla" | "splash" | "cudnn"
    c.anyres = anyres()
    c.update(overrides)
    return c


# Mixed-precision presets, (config.model.dtype, config.model.param_dtype): the compute / activation dtype and the
# stored parameters' (MaxText's dtype / weight_dtype; the optimizer state follows the params). In every preset the
# norms' statistics, attention softmax, logits and the loss are float32. Config files take them as an argument:
# ``configs/lavi_qwen2_7b_siglip.py:mixed``, ``...:tiny,bf16``.
PRECISIONS = {
    "f32": ("float32", "float32"),  # the default: reference numerics (float32 parity with HF transformers)
    "mixed": ("bfloat16", "float32"),  # training: float32 master params and AdamW state, bfloat16 compute
    "bf16": ("bfloat16", "bfloat16"),  # inference: bfloat16 params and compute (half the weight memory)
}


def set_precision(model_config: ConfigDict, preset: str) -> ConfigDict:
    """Sets ``dtype`` and ``param_dtype`` of ``model_config`` (in place) to a :data:`PRECISIONS` preset."""
    if preset not in PRECISIONS:
        raise ValueError(f"unknown precision preset {preset!r} (one of {', '.join(PRECISIONS)})")
    model_config.dtype, model_config.param_dtype = PRECISIONS[preset]
    return model_config


def data(**overrides) -> ConfigDict:
    """``config.data``: the input pipeline."""
    c = ConfigDict()
    c.train_json = ""  # LLaVA .json / .jsonl with the training records
    c.eval_json = ""  # held-out records in the same format ("" = none)
    c.image_root = ""  # folder that the records' "image" / "video" paths are relative to
    c.tokenizer = "byte"  # "byte" (built-in demo tokenizer) or a local HF tokenizer directory
    c.processor = "siglip"  # "siglip" | "clip" | a HF directory with preprocessor_config.json
    c.image_size = 384  # processor output side (must match the vision tower)
    c.max_images = 1  # N_items: images / videos per sample; fewer are padded with item_mask False
    c.num_frames = 1  # N_frames: frames sampled uniformly per video; an image uses frame 0
    c.seq_buckets = (512, 1024, 2048)  # padded sequence lengths; longer samples are skipped as bad
    c.max_bad_records = 100  # distinct bad records skipped per process before the run stops
    c.max_image_pixels = 89_478_485  # larger images are rejected (decompression bombs); PIL's default
    c.num_threads = 8  # decoding threads per process
    c.packing = False  # training packs records into rows of max(seq_buckets) tokens
    c.pack_window = 8  # open rows of the first-fit packer; the fullest is emitted when a record fits none
    c.pack_max_images = 0  # visual items per packed row (its N_items; max_images stays per sample); 0: max_images
    c.update(overrides)
    return c


def lora(**overrides) -> ConfigDict:
    """``config.train.lora``: low-rank adapters on the frozen base (``rank`` 0: off; see lavi_jax/lora.py)."""
    c = ConfigDict()
    c.rank = 0  # adapter rank r (0: no LoRA)
    c.alpha = 16.0  # scale alpha / r (alpha / sqrt(r) with rslora)
    c.dropout = 0.0  # dropout on the adapter input, training only
    c.targets = "llm"  # a preset (llm | vision | llm+vision) or comma-separated regexes over Dense module paths
    c.rslora = False
    c.dtype = "float32"  # adapter param dtype (the base keeps config.model.param_dtype)
    c.quantize = "none"  # QLoRA: none | int8 | int4, the frozen kernels of the targets held quantized
    c.quant_block = 64  # rows of the kernel's last input axis per quantization scale (0: per output channel)
    c.update(overrides)
    return c


def train(**overrides) -> ConfigDict:
    """``config.train``: optimisation and loop settings."""
    c = ConfigDict()
    c.num_steps = 1000
    c.batch_size = 32  # global batch (all processes)
    c.grad_accum = 1  # micro-batches per step (batch_size must divide evenly)
    c.loss_chunk = 0  # positions per chunk of LM head + cross-entropy, recomputed in the backward (0: whole rows)
    c.learning_rate = 1e-4
    c.warmup_steps = 100
    c.end_lr_fraction = 0.0  # cosine decays to learning_rate * end_lr_fraction
    c.b1, c.b2, c.eps = 0.9, 0.95, 1e-8
    c.weight_decay = 0.0
    c.clip_grad_norm = 1.0
    c.trainable = "projector+conditioners"  # a stage name (lavi_jax.train.optimizer.STAGES) or comma-separated regexes
    c.lr_mults = ()  # ((regex, multiplier), ...): per-param learning-rate factors, first match wins
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.max_nonfinite = 10  # consecutive non-finite steps before the run stops
    c.lora = lora()
    c.update(overrides)
    return c


# Benchmark tasks with a settings block under ``config.evals``; each is set as
# ``--config.evals.<task>.questions=...``. ``name`` (the scorer) defaults to the task's key.
EVAL_TASKS = ("llava_json", "vqav2", "textvqa", "gqa", "pope", "mme", "mmbench", "mmbench_cn", "seed_bench",
              "scienceqa_img", "mvbench", "videomme")


def eval_task(**overrides) -> ConfigDict:
    """One benchmark's settings (``config.evals.<task>``); empty values take the ``config.evals`` defaults."""
    c = ConfigDict()
    c.name = ""  # scorer (lavi_jax.eval.scorers); "" = the task's key
    c.questions = ""  # the benchmark's question file (llava_json: default config.data.eval_json)
    c.annotations = ""  # its answer / annotation file or folder, where the benchmark has one
    c.image_root = ""  # folder the questions' media paths are relative to (llava_json: default config.data.image_root)
    c.max_new_tokens = 0  # 0: config.evals.max_new_tokens
    c.limit = 0  # 0: config.evals.limit
    c.options = ConfigDict()  # extra scorer options, e.g. metric="exact", prompt_suffix="none"
    c.update(overrides)
    return c


def evals(**overrides) -> ConfigDict:
    """``config.evals``: evaluation during training (``every``) and by eval.py."""
    c = ConfigDict()
    c.every = 0  # evaluate every N training steps (0: at the end only)
    c.exact_match = True  # teacher-forced exact match on data.eval_json at the end of training
    c.batch_size = 0  # global eval batch (0: train.batch_size)
    c.tasks = ""  # comma-separated task keys to run by generation, e.g. "pope,textvqa"
    c.max_new_tokens = 64
    c.limit = 0  # samples per task (0: all)
    for name in EVAL_TASKS:
        c[name] = eval_task()
    c.update(overrides)
    return c


def experiment(model_config: ConfigDict) -> ConfigDict:
    """A full run config around ``model_config``: model, data, train, mesh, init, evals."""
    c = ConfigDict()
    c.model = model_config
    c.data = data(image_size=model_config.vision.image_size, processor=model_config.vision.type)
    c.train = train()
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: fill with the remaining devices
    c.init = ConfigDict({"checkpoint": "", "hf_llm": "", "hf_vision": ""})  # used when the workdir has no checkpoint
    c.evals = evals()
    c.dry_run = False  # compile the train step and print per-device memory and FLOPs instead of training
    # Compile for a TPU slice from any host (needs libtpu, no TPU): "v5e:8x8", "v5p:4x4x4", ... ("": the devices
    # at hand). Implies dry_run. Chips, HBM and peaks: lavi_jax/train/topology.py.
    c.dry_run_topology = ""
    c.dry_run_programs = "train"  # comma-separated: train, prefill, decode (generation at the evals batch size)
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
