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
    """Under attention="splash" a prefill into an empty KV cache (index 0) attends to its own tokens, which splash
    serves (equal to xla's within float32 rounding); a T=1 step against the cache falls back to xla."""
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
        outs[attn] = (pre.logits, pre.cache["k"], step.logits)
    for a, b in zip(outs["splash"], outs["xla"]):  # logits, the keys written, the step's logits
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_splash_pads_a_length_that_is_not_a_multiple_of_128():
    """T = 200 runs at 256 with segment-0 padding after the sequence; real queries never see it."""
    B, T, H, K, D = 2, 200, 4, 2, 32
    r = np.random.default_rng(3)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    valid = _valid(B, T, "right")
    mask = AttentionMask(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), valid, aligned=True)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask, scale=D**-0.5, implementation="splash"))(q, k, v)
    ref = _reference(q, k, v, valid, D**-0.5)
    np.testing.assert_allclose(np.asarray(out * valid[:, :, None, None]), np.asarray(ref * valid[:, :, None, None]),
                               atol=1e-5, rtol=0)


def _vision(attn, image_size):
    from lavi_jax.models.vit import VisionTower

    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny").model.vision
    cfg.image_size = image_size
    tower = VisionTower(cfg, attention=attn)
    pix = jax.random.normal(jax.random.key(4), (2, image_size, image_size, 3))
    params = tower.init(jax.random.key(0), pix)["params"]
    fn = jax.jit(lambda p: tower.apply({"params": p}, pix))
    return fn(params), jax.make_jaxpr(fn)(params)


def test_vision_tower_splash_matches_xla():
    """Bidirectional, unmasked: 27 x 27 = 729 patches (SigLIP-so400m's count), splash at 768 with a full mask."""
    xla, _ = _vision("xla", 27 * 8)
    splash, jaxpr = _vision("splash", 27 * 8)
    assert xla.shape[1] == 729 and "pallas_call" in str(jaxpr)
    np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), atol=1e-5, rtol=0)


def test_conditioner_cross_attention_serves_splash_with_xla():
    """The conditioner's text-to-visual attention with its per-query item mask is not splash's case: xla serves it."""
    from lavi_jax.models.conditioner import Conditioner, VisualContext

    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny").model.conditioner
    B, T, P = 2, 128, 16
    r = np.random.default_rng(5)
    x = jnp.asarray(r.standard_normal((B, T, 64)), jnp.float32)
    visual = VisualContext(jnp.asarray(r.standard_normal((B, 1, 1, P, cfg.width)), jnp.float32),
                           jnp.asarray([[[3]], [[40]]], jnp.int32), jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                           (4, 4))
    out = {}
    for attn in ("xla", "splash"):
        cond = Conditioner(cfg, features=64, attention=attn)
        params = cond.init(jax.random.key(0), x, visual)["params"]
        params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape, a.dtype), params)
        fn = lambda p: cond.apply({"params": p}, x, visual)
        assert "pallas_call" not in str(jax.make_jaxpr(fn)(params))
        out[attn] = fn(params)
    assert float(jnp.abs(out["xla"][0]).max()) > 0
    for a, b in zip(out["splash"], out["xla"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_splash_under_a_mesh_runs_per_shard_and_matches_xla():
    """Decoder logits with splash in shard_map over (data, fsdp) x tensor on 8 devices equal xla's."""
    from lavi_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    B, T = 4, 128
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 500, (B, T)), jnp.int32)
    valid = _valid(B, T, "left")
    out = {}
    with sharding.use_mesh(mesh):
        for attn in ("xla", "splash"):
            out[attn], (dec, params) = _decoder_logits(attn, ids, valid, True)
        jaxpr = str(jax.make_jaxpr(lambda p: dec.apply({"params": p}, ids, attention_mask=valid).logits)(params))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    np.testing.assert_allclose(np.asarray(out["splash"] * valid[:, :, None]), np.asarray(out["xla"] * valid[:, :, None]),
                               atol=1e-5, rtol=0)
