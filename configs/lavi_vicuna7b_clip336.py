"""LaVi-Image: Vicuna-7B (LLaMA architecture) with CLIP ViT-L/14-336, penultimate-layer features."""

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
    if arg == "tiny":
        C.make_tiny(model)
    return C.experiment(model)
