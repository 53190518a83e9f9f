"""Tiny, fully randomised Hugging Face reference models saved with ``save_pretrained`` (shared by tests)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from conversions.random_hf import randomize


def save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def qwen2(path, *, tie=False, kv_heads=2, head_dim=None, layers=2, vocab=300, seed=0, max_shard_size=None):
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, **({"head_dim": head_dim} if head_dim else {}),
    )
    model = randomize(transformers.Qwen2ForCausalLM(cfg), seed)
    if max_shard_size:
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size=max_shard_size)
        return str(path), model
    return save(model, path), model


def llama(path, *, tie=False, kv_heads=2, head_dim=24, layers=2, vocab=300, rope_scaling=True, seed=0):
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_parameters=rope,
    )
    model = randomize(transformers.LlamaForCausalLM(cfg), seed)
    return save(model, path), model


def siglip(path, *, layers=3, seed=0):
    cfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                          num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False)
    model = randomize(transformers.SiglipVisionModel(cfg), seed)
    return save(model, path), model


def clip(path, *, layers=3, seed=0):
    cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                        num_attention_heads=4, image_size=28, patch_size=7)
    model = randomize(transformers.CLIPVisionModel(cfg), seed)
    return save(model, path), model


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def llava(path, *, vision="clip", text="llama", layers=2, vocab=300, tie=False, seed=0, onevision=False):
    """A tiny ``LlavaForConditionalGeneration`` (or ``LlavaOnevisionForConditionalGeneration``); the image token is ``vocab - 1``."""
    if vision == "clip":
        vcfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=28, patch_size=7)
        strategy, feature_layer = "default", -2
    else:
        vcfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=32, patch_size=8)
        strategy, feature_layer = "full", -1
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    tcfg = transformers.Qwen2Config(**common) if text == "qwen2" else transformers.LlamaConfig(head_dim=16, **common)
    kw = dict(vision_config=vcfg, text_config=tcfg, image_token_index=vocab - 1, vision_feature_layer=feature_layer,
              vision_feature_select_strategy=strategy, tie_word_embeddings=tie)
    if onevision:
        model = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(**kw))
    else:
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**kw))
    model = randomize(model, seed)
    return save(model, path), model


def tokenizer(path, vocab_size=280):
    """A tiny byte-level BPE tokenizer with a chat template, saved with ``save_pretrained`` (no ``<image>`` token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(["a red circle and a blue square", "describe the image in one word"] * 8,
                             trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(str(path))
    return str(path), tok


def siglip_full(path, *, seed=0):
    """A tiny full ``SiglipModel`` (vision and text towers, contrastive head)."""
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100))
    model = randomize(transformers.SiglipModel(cfg), seed)
    return save(model, path), model


NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84], [28, 112]]  # multiples of the 28-px CLIP tile
ONEVISION_PINPOINTS = [[32 * a, 32 * b] for a in range(1, 4) for b in range(1, 4)]  # 1x1 .. 3x3 SigLIP tiles


def llava_anyres(path, *, onevision=False, layers=2, vocab=300, seed=0, aspect="anyres_max_2", tile=None, patch=None,
                 pinpoints=None):
    """A tiny ``LlavaNextForConditionalGeneration`` (CLIP 28/7, strategy "default", Llama) or
    ``LlavaOnevisionForConditionalGeneration`` (SigLIP 32/8, strategy "full", Qwen2, ``vision_aspect_ratio=aspect``),
    both 4x4 feature tokens per tile; image token ``vocab - 1``, OneVision's video token ``vocab - 2``.
    ``tile`` / ``patch`` / ``pinpoints`` replace the tower's image and patch size and the canvases."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16384)
    if onevision:
        vcfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=tile or 32, patch_size=patch or 8)
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=vcfg, text_config=transformers.Qwen2Config(**common), image_token_index=vocab - 1,
            video_token_index=vocab - 2, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=pinpoints or ONEVISION_PINPOINTS, vision_aspect_ratio=aspect)
        model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    else:
        vcfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=tile or 28, patch_size=patch or 7)
        cfg = transformers.LlavaNextConfig(
            vision_config=vcfg, text_config=transformers.LlamaConfig(head_dim=16, **common), image_token_index=vocab - 1,
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints or NEXT_PINPOINTS)
        model = transformers.LlavaNextForConditionalGeneration(cfg)
    model = randomize(model, seed)
    return save(model, path), model


def anyres_image_processor(model):
    """HF's PIL image processor matching a :func:`llava_anyres` model (the torchvision ones are not installed)."""
    c = model.config
    tile = c.vision_config.image_size
    if c.model_type == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

        return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=c.image_grid_pinpoints)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=c.image_grid_pinpoints)
