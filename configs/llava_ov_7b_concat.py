"""LLaVA-OneVision-7B geometry (Qwen2-7B + SigLIP-so400m, mlp2x_gelu) with fusion="concat": the baseline LaVi is measured against."""

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
    if arg == "tiny":
        C.make_tiny(model)
    return C.experiment(model)
