"""The attention knob: splash (Pallas interpret mode on CPU) against XLA attention, fallbacks, the decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax.models.attention import AttentionMask, attention, implementation_for, resolve_attention
from lavi_jax.models.decoder import Decoder, init_cache


def _valid(B, T, pad):
    """bool [B, T]: row 0 padded on the ``pad`` side (37 tokens), row 1 padded 56 tokens on the other side."""
    v = np.ones((B, T), bool)
    if pad == "left":
        v[0, :37] = False
        v[1, :56] = False
    elif pad == "right":
        v[0, T - 37:] = False
        v[1, T - 56:] = False
    return jnp.asarray(v)


def _reference(q, k, v, valid, scale):
    """jax.nn.dot_product_attention(implementation="xla") with the decoder's causal + key-padding mask."""
    T, S = q.shape[1], k.shape[1]
    mask = (jnp.arange(S)[None, None, :] <= jnp.arange(T)[None, :, None]) & valid[:, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")


CASES = {  # name: (H, K, D, padding)
    "causal": (4, 4, 64, None),
    "left_pad": (4, 4, 64, "left"),
    "right_pad": (4, 4, 64, "right"),
    "gqa": (4, 2, 64, "left"),
    "head_dim_32": (4, 2, 32, "right"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_xla_forward_and_grad(case):
    H, K, D, pad = CASES[case]
    B, T, scale = 2, 256, D**-0.5
    r = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D)])
    valid = _valid(B, T, pad)
    w = w * valid[:, :, None, None]  # outputs at padded queries are unspecified: weigh them out
    mask = AttentionMask(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), valid, aligned=True)
    assert implementation_for("splash", jax.default_backend(), q.shape, k.shape, q.dtype, True) == "splash"

    splash = jax.jit(lambda q, k, v: attention(q, k, v, mask, scale=scale, implementation="splash"))
    ref = _reference(q, k, v, valid, scale)
    np.testing.assert_allclose(np.asarray(splash(q, k, v) * valid[:, :, None, None]),
                               np.asarray(ref * valid[:, :, None, None]), atol=1e-5, rtol=0)

    g_splash = jax.jit(jax.grad(lambda q, k, v: jnp.sum(splash(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(lambda q, k, v: jnp.sum(_reference(q, k, v, valid, scale) * w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_splash, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_resolve_attention():
    assert resolve_attention("auto", "cpu") == "xla"
    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("splash", "cpu") == "splash"
    with pytest.raises(ValueError, match="attention"):
        resolve_attention("flash", "cpu")
    assert lavi_jax.config.model().attention == "auto"


def test_fallbacks_to_xla():
    q, kv = (2, 256, 4, 64), (2, 256, 2, 64)
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert implementation_for("splash", "tpu", q, kv, bf16, aligned=True) == "splash"
    assert implementation_for("splash", "tpu", q, kv, bf16, aligned=False) == "xla"  # a KV-cached call
    assert implementation_for("splash", "tpu", (2, 1, 4, 64), kv, bf16, aligned=False) == "xla"  # decode step
    assert implementation_for("splash", "tpu", (2, 100, 4, 64), (2, 100, 2, 64), bf16, aligned=True) == "splash"  # padded
    assert implementation_for("cudnn", "gpu", q, kv, bf16, aligned=True) == "cudnn"
    assert implementation_for("cudnn", "gpu", q, kv, f32, aligned=True) == "xla"
    assert implementation_for("cudnn", "cpu", q, kv, bf16, aligned=True) == "xla"
    assert implementation_for("cudnn", "gpu", (2, 256, 4, 260), (2, 256, 2, 260), bf16, aligned=True) == "xla"


def _decoder_logits(attn, ids, valid, scan):
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny").model.llm
    dec = Decoder(cfg, scan_layers=scan, attention=attn)
    params = dec.init(jax.random.key(0), ids)["params"]
    return jax.jit(lambda p: dec.apply({"params": p}, ids, attention_mask=valid).logits)(params), (dec, params)


@pytest.mark.parametrize("scan", [False, True])
def test_decoder_splash_logits_match_xla(scan):
    B, T = 2, 256
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 500, (B, T)), jnp.int32)
    valid = _valid(B, T, "left")
    xla, _ = _decoder_logits("xla", ids, valid, scan)
    splash, (dec, params) = _decoder_logits("splash", ids, valid, scan)
    assert "pallas_call" in str(jax.make_jaxpr(lambda p: dec.apply({"params": p}, ids, attention_mask=valid).logits)(params))
    np.testing.assert_allclose(np.asarray(splash * valid[:, :, None]), np.asarray(xla * valid[:, :, None]), atol=1e-5, rtol=0)


def test_decoder_splash_cached_decode_falls_back():
    """A prefill into a KV cache and a T=1 step are served by xla under attention="splash"."""
    B, T, S = 1, 16, 32
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 500, (B, T + 1)), jnp.int32)
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny").model.llm
    outs = {}
    for attn in ("xla", "splash"):
        dec = Decoder(cfg, attention=attn)
        params = dec.init(jax.random.key(0), ids[:, :T])["params"]
        valid = jnp.zeros((B, S), bool).at[:, :T].set(True)
        pre = dec.apply({"params": params}, ids[:, :T], attention_mask=valid, cache=init_cache(cfg, B, S), cache_index=0)
        step = dec.apply({"params": params}, ids[:, T:], attention_mask=valid.at[:, T].set(True), cache=pre.cache, cache_index=T)
        outs[attn] = (pre.logits, step.logits)
    for a, b in zip(outs["splash"], outs["xla"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
