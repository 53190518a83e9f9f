"""Mixed-precision presets (lavi_jax.config.PRECISIONS): the bf16-vs-f32 logit gap is bounded, and the pieces that
must stay float32 (norm statistics, attention softmax, logits, the loss) do."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax import config as C
from lavi_jax.models.attention import AttentionMask, attention
from lavi_jax.models.decoder import Decoder, RMSNorm
from lavi_jax.train.step import loss_terms

# max |logits(preset) - logits(f32)| as a fraction of max |logits(f32)| on the tiny configs with random weights
# (measured: mixed 1.9-2.0 %, bf16 1.9-3.3 %).
BOUND = {"mixed": 0.04, "bf16": 0.06}


def _inputs(m):
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, 500, (2, 48)), jnp.int32).at[:, 2].set(m.image_token_id)
    pix = jnp.asarray(r.standard_normal((2, 1, 1, 32, 32, 3)), jnp.float32)
    return ids, pix


@pytest.mark.parametrize("path", [pytest.param("configs/lavi_qwen2_7b_siglip.py:tiny", marks=pytest.mark.slow),  # ~40 s
                                  "configs/llava_ov_7b_concat.py:tiny"])
def test_bf16_logits_stay_within_the_bound_of_f32(path):
    m = C.get(path).model
    assert (m.dtype, m.param_dtype) == C.PRECISIONS["f32"]
    ids, pix = _inputs(m)
    model = lavi_jax.LaVi(m)
    params = model.init(jax.random.key(0), ids, pix)["params"]
    # Perturb every weight (the conditioners' zero-initialised outputs too) so every path carries signal.
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    ref = model.apply({"params": params}, ids, pix)
    for preset, bound in BOUND.items():
        mm = C.set_precision(m.copy_and_resolve_references(), preset)
        p = jax.tree.map(lambda a: a.astype(mm.param_dtype), params)
        out = lavi_jax.LaVi(mm).apply({"params": p}, ids, pix)
        assert out.dtype == jnp.float32
        gap = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
        assert 0 < gap <= bound, (preset, gap)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_head_gives_float32_logits_of_a_float32_matmul(tied):
    """The LM head (and the tied embedding) multiply bf16 hidden states by bf16 weights into float32: the logits are
    the float32 product, not a bf16 result cast up (which moves in steps of 0.125 above 16)."""
    m = C.set_precision(C.get("configs/lavi_qwen2_7b_siglip.py:tiny").model, "bf16")
    m.llm.tie_word_embeddings = tied
    dec = Decoder(m.llm, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, m.llm.vocab_size, (2, 16)), jnp.int32)
    params = nn.unbox(dec.init(jax.random.key(0), ids)["params"])
    head = ("embed_tokens", "embedding") if tied else ("lm_head", "kernel")
    params[head[0]][head[1]] = (params[head[0]][head[1]] * 60).astype(jnp.bfloat16)  # logits well above 16
    out = dec.apply({"params": params}, ids)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    w = params[head[0]][head[1]].astype(jnp.float32)
    ref = jnp.einsum("btd,dv->btv" if not tied else "btd,vd->btv", out.hidden.astype(jnp.float32), w,
                     precision=jax.lax.Precision.HIGHEST)
    big = np.abs(np.asarray(ref)) > 16
    assert big.mean() > 0.05
    # float32 summation order only: ~1e-6 of the logits' scale (a bf16 result is off by up to 2^-9 of each value)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))
    assert np.any(np.asarray(out.logits)[big] % 0.125 != 0)


def test_config_args_select_presets():
    c = C.get("configs/llava_ov_7b_concat.py:tiny,mixed").model
    assert (c.dtype, c.param_dtype) == ("bfloat16", "float32") and c.llm.hidden_size == 64
    assert C.get("configs/llava_ov_7b_concat.py:bf16").model.param_dtype == "bfloat16"
    with pytest.raises(ValueError, match="fp8"):
        C.get("configs/llava_ov_7b_concat.py:fp8")


def _jaxpr_lines(fn, *args, op):
    return [l for l in str(jax.make_jaxpr(fn)(*args)).splitlines() if f" {op}" in l]


def test_norm_softmax_and_loss_run_in_float32_under_bf16_compute():
    x = jnp.ones((2, 8, 64), jnp.bfloat16)
    norm = RMSNorm(1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = norm.init(jax.random.key(0), x)
    rsqrt = _jaxpr_lines(lambda p: norm.apply(p, x), params, op="rsqrt")
    assert rsqrt and all("f32[" in l and "bf16[" not in l for l in rsqrt)

    q = jnp.ones((2, 16, 4, 32), jnp.bfloat16)
    mask = AttentionMask(jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)), jnp.ones((2, 16), bool)).with_dense()
    exp = _jaxpr_lines(lambda q: attention(q, q, q, mask, scale=0.1, implementation="xla"), q, op="exp")
    assert exp and all("f32[" in l for l in exp)

    m = C.get("configs/llava_ov_7b_concat.py:tiny,bf16").model
    ids, pix = _inputs(m)
    model = lavi_jax.LaVi(m)
    params = model.init(jax.random.key(0), ids, pix)["params"]
    batch = {"input_ids": ids, "pixel_values": pix, "attention_mask": jnp.ones_like(ids),
             "loss_mask": jnp.ones(ids.shape, jnp.float32).at[:, 0].set(0)}
    num, den = loss_terms(model, params, batch)
    assert num.dtype == jnp.float32 and den.dtype == jnp.float32
