"""LaVi-Image: Vicuna-7B (LLaMA architecture) with CLIP ViT-L/14-336, penultimate-layer features.

    configs/lavi_vicuna7b_clip336.py[:tiny][,mixed|bf16]

Precision: float32 by default; ``mixed`` for training (bf16 compute, f32 params), ``bf16`` for inference
(``lavi_jax.config.PRECISIONS``).
"""

from lavi_jax import config as C


def get_config(arg: str = ""):
    model = C.model(
        fusion="modulation",
        image_token_id=32000,
        llm=C.llm(arch="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10_000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, attention_bias=False, max_position_embeddings=4096),
        vision=C.vision(type="clip", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                        image_size=336, patch_size=14, layer_norm_eps=1e-5, feature_layers=(-2,), drop_cls=True),
        projector=C.projector(type="mlp2x_gelu"),
        conditioner=C.conditioner(type="attention", width=512, num_heads=8),
    )
    args = set(filter(None, arg.split(",")))
    if args - {"tiny", *C.PRECISIONS}:
        raise ValueError(f"unknown config args {sorted(args - {'tiny', *C.PRECISIONS})} (tiny, {', '.join(C.PRECISIONS)})")
    if "tiny" in args:
        C.make_tiny(model)
    for preset in args & set(C.PRECISIONS):
        C.set_precision(model, preset)
    config = C.experiment(model)
    config.data.update(packing=True, pack_max_images=10)  # packed rows: see benchmarks/packing.py
    return config
