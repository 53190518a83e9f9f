"""LLaVA-OneVision-7B geometry (Qwen2-7B + SigLIP-so400m, mlp2x_gelu) with fusion="concat": the baseline LaVi is measured against.

    configs/llava_ov_7b_concat.py[:tiny][,mixed|bf16]

Precision: float32 by default; ``mixed`` (bf16 compute, f32 params, as the TPU benchmark trains it) or ``bf16``
(inference), see ``lavi_jax.config.PRECISIONS``.
"""

from lavi_jax import config as C


def get_config(arg: str = ""):
    model = C.model(
        fusion="concat",
        image_token_id=151646,
        llm=C.llm(arch="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28,
                  num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768),
        vision=C.vision(type="siglip", hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                        image_size=384, patch_size=14, layer_norm_eps=1e-6, feature_layers=(-1,)),
        projector=C.projector(type="mlp2x_gelu"),
    )
    args = set(filter(None, arg.split(",")))
    if args - {"tiny", *C.PRECISIONS}:
        raise ValueError(f"unknown config args {sorted(args - {'tiny', *C.PRECISIONS})} (tiny, {', '.join(C.PRECISIONS)})")
    if "tiny" in args:
        C.make_tiny(model)
    for preset in args & set(C.PRECISIONS):
        C.set_precision(model, preset)
    return C.experiment(model)
