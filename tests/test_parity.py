"""Logit / hidden-state parity with Hugging Face transformers' PyTorch models (float32, max abs < 1e-4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavi_jax import config as C
from lavi_jax.hf import SafetensorsReader, import_hf, load_params, mapping
from lavi_jax.models.vit import VisionTower
from tests import hf_models

ATOL = 1e-4


def padded_batch(vocab, seed=0):
    """Two rows: one full, one left-padded by 3; positions as HF's generate computes them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos


LLMS = {
    "qwen2-gqa": lambda p: hf_models.qwen2(p, kv_heads=2),
    "qwen2-tied-mha": lambda p: hf_models.qwen2(p, tie=True, kv_heads=4),
    "llama3-rope-gqa-headdim": lambda p: hf_models.llama(p, kv_heads=2, head_dim=24),
    "llama-tied-plain-rope": lambda p: hf_models.llama(p, tie=True, kv_heads=1, head_dim=16, rope_scaling=False),
}


@pytest.mark.parametrize("name", list(LLMS))
@pytest.mark.parametrize("scan", [False, True])
def test_llm_logits_match_hf(tmp_path, name, scan):
    path, hf = LLMS[name](tmp_path)
    cfg, params = import_hf(path, base=C.model(fusion="none", scan_layers=scan))
    ids, mask, pos = padded_batch(cfg.llm.vocab_size)
    from lavi_jax.models.lavi import LaVi

    ours = np.asarray(LaVi(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(pos).long()).logits.numpy()
    valid = mask.astype(bool)
    err = np.abs(ours[valid] - ref[valid]).max()
    print(f"{name} scan={scan}: max abs logit diff {err:.2e}")
    assert err < ATOL, err
    assert np.abs(ref[valid]).max() > 0.1  # a non-degenerate reference


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_vision_hidden_states_match_hf(tmp_path, kind):
    path, hf = getattr(hf_models, kind)(tmp_path)
    from lavi_jax.hf import config as hf_config

    vcfg = hf_config.vision_from_hf(hf_config.read_config(path))
    m = C.model(vision=vcfg)
    init = VisionTower(vcfg).init(jax.random.key(0), jnp.zeros((1, vcfg.image_size, vcfg.image_size, 3)))["params"]
    entries = mapping.vision_entries(m, jax_prefix="")
    params = load_params(entries, SafetensorsReader(path).get, nn.unbox(init))
    pix = np.random.default_rng(0).normal(size=(2, vcfg.image_size, vcfg.image_size, 3)).astype(np.float32)
    hidden, post = VisionTower(vcfg).apply({"params": params}, jnp.asarray(pix), return_all=True)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2)), output_hidden_states=True)
    assert len(hidden) == len(out.hidden_states) == vcfg.num_layers + 1
    errs = [np.abs(np.asarray(h) - r.numpy()).max() for h, r in zip(hidden, out.hidden_states)]
    if kind == "siglip":  # post_layernorm over all tokens
        errs.append(np.abs(np.asarray(post) - out.last_hidden_state.numpy()).max())
    else:  # CLIP applies post_layernorm to the CLS token only (the pooled output)
        errs.append(np.abs(np.asarray(post)[:, 0] - out.pooler_output.numpy()).max())
    print(f"{kind}: max abs diff per hidden state {['%.1e' % e for e in errs]}")
    assert max(errs) < ATOL, errs
