"""LaVi on Qwen2-7B with SigLIP-so400m-patch14-384: the paper's main setting.

    python train.py --config configs/lavi_qwen2_7b_siglip.py        # full size
    python train.py --config configs/lavi_qwen2_7b_siglip.py:tiny   # few-MB variant, same structure
    python train.py --config configs/lavi_qwen2_7b_siglip.py:mixed  # bf16 compute, f32 params (training)
    python train.py --config configs/lavi_qwen2_7b_siglip.py:hd     # LaVi-HD: OneVision's anyres tiles
    python train.py --config configs/lavi_qwen2_7b_siglip.py:hd,tiny

Precision: float32 by default (parity with HF transformers); ``mixed`` (bf16 compute, f32 params and AdamW
state) is what the TPU benchmark trains with, ``bf16`` (bf16 params too) is for inference
(``lavi_jax.config.PRECISIONS``).

``hd``: each image is its whole image plus up to 36 crops of 384 px (LLaVA-OneVision-7B's
pinpoints, ``anyres_max_9``) with a learned tile-position embedding; in ``tiny`` the
pinpoints are scaled to the tiny tower's image size.
"""

from lavi_jax import config as C


def get_config(arg: str = ""):
    model = C.model(
        fusion="modulation",
        image_token_id=151646,
        llm=C.llm(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                  num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768),
        vision=C.vision(type="siglip", hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                        image_size=384, patch_size=14, layer_norm_eps=1e-6, feature_layers=(-1,)),
        projector=C.projector(type="mlp2x_gelu"),
        conditioner=C.conditioner(type="attention", width=512, num_heads=8),
    )
    args = set(filter(None, arg.split(",")))
    known = {"tiny", "hd", *C.PRECISIONS}
    if args - known:
        raise ValueError(f"unknown config args {sorted(args - known)} (tiny, hd, {', '.join(C.PRECISIONS)})")
    if "tiny" in args:
        C.make_tiny(model)
    for preset in args & set(C.PRECISIONS):
        C.set_precision(model, preset)
    if "hd" in args:
        s = model.vision.image_size
        model.anyres.update(enabled=True, pinpoints=tuple((h // 384 * s, w // 384 * s) for h, w in C.ONEVISION_PINPOINTS),
                            max_crops=36, aspect="anyres_max_9", tile_embedding="grid")
    config = C.experiment(model)
    if not model.anyres.enabled:  # packed rows: ~2.8x bucketing's real tokens per FLOP here (benchmarks/packing.py)
        config.data.update(packing=True, pack_max_images=10)
    return config
