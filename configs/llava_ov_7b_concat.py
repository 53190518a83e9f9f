"""LLaVA-OneVision-7B geometry (Qwen2-7B + SigLIP-so400m, mlp2x_gelu) with fusion="concat": the baseline LaVi is measured against.

    configs/llava_ov_7b_concat.py[:tiny][,mixed|bf16][,anyres]

``anyres``: OneVision's own image handling, as imported from ``llava-onevision-qwen2-7b-ov-hf``: each
image is its whole image plus up to 36 crops of 384 px (its pinpoints, ``anyres_max_9``), features
unpadded with an ``image_newline`` per row, no temporal embedding; in ``tiny`` the pinpoints are scaled
to the tiny tower's image size.

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
    known = {"tiny", "anyres", *C.PRECISIONS}
    if args - known:
        raise ValueError(f"unknown config args {sorted(args - known)} (tiny, anyres, {', '.join(C.PRECISIONS)})")
    if "tiny" in args:
        C.make_tiny(model)
    for preset in args & set(C.PRECISIONS):
        C.set_precision(model, preset)
    if "anyres" in args:
        s = model.vision.image_size
        model.anyres.update(enabled=True, pinpoints=tuple((h // 384 * s, w // 384 * s) for h, w in C.ONEVISION_PINPOINTS),
                            max_crops=36, aspect="anyres_max_9", newline=True)
        model.projector.temporal_embedding = False
    return C.experiment(model)
