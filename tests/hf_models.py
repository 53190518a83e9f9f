"""Tiny, fully randomised Hugging Face reference models saved with ``save_pretrained`` (shared by tests)."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, norms included (norm weights around 1, everything else small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


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
