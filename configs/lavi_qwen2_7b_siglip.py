"""LaVi on Qwen2-7B with SigLIP-so400m-patch14-384: the paper's main setting.

    python train.py --config configs/lavi_qwen2_7b_siglip.py        # full size
    python train.py --config configs/lavi_qwen2_7b_siglip.py:tiny   # few-MB variant, same structure
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
    if arg == "tiny":
        C.make_tiny(model)
    return C.experiment(model)
