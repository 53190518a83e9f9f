"""Packed rows in the model: several conversations per row, each with its own images, positions and causality.

Every reference is the unpacked model (each sample alone, or an unpacked batch of them); the packed row is
built by hand here: samples back to back, ``segment_ids`` 1, 2, 3 and padding 0, positions restarting per
segment, the row's k-th placeholder its k-th item.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax.train.step import loss_terms

CFG = "configs/lavi_qwen2_7b_siglip.py:tiny"
LENGTHS = (7, 11, 9)
PLACEHOLDERS = ((), (3,), (2, 6))  # 0, 1 and 2 images
FUSIONS = {"attention": ("modulation", "attention"), "mlp": ("modulation", "mlp"),
           "conv": ("modulation", "conv"), "concat": ("concat", "attention")}


def make_config(fusion="modulation", cond="attention", attention="xla"):
    cfg = lavi_jax.configs.get(CFG).model
    cfg.fusion, cfg.attention = fusion, attention
    cfg.conditioner.type, cfg.conditioner.final_norm = cond, True
    return cfg


def make_params(cfg, seed=0):
    """Init, then random non-zero conditioner output projections (zero-init would make images irrelevant).

    The scale keeps float32 noise under 1e-5: the vision tower's results depend on its batch size at the
    1e-6 level (4 items packed vs 1 or 2 alone), which large deltas amplify; images still move logits by O(1).
    """
    params = nn.unbox(lavi_jax.LaVi(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    return traverse_util.unflatten_dict(
        {k: (0.05 * jax.random.normal(r, v.shape, v.dtype) if any("conditioner" in p for p in k) and "o_proj" in k else v)
         for (k, v), r in zip(flat.items(), keys)})


def make_samples(cfg, seed=0):
    """Three samples [(ids [L], pixels [n, 1, s, s, 3], loss_mask [L])] with 0, 1 and 2 images."""
    rng = np.random.default_rng(seed)
    s, out = cfg.vision.image_size, []
    for L, places in zip(LENGTHS, PLACEHOLDERS):
        ids = rng.integers(0, cfg.image_token_id, L).astype(np.int32)
        ids[list(places)] = cfg.image_token_id
        pix = rng.normal(size=(len(places), 1, s, s, 3)).astype(np.float32)
        loss = (rng.random(L) < 0.7).astype(np.float32)
        loss[0] = 0.0
        loss[list(places)] = 0.0
        out.append((ids, pix, loss))
    return out


def pack(samples, T, n_items=4):
    """One packed row of length T (+ padding) with ``n_items`` item slots (the last ones padding)."""
    s = samples[0][1].shape[2]
    row = {"input_ids": np.zeros((1, T), np.int32), "attention_mask": np.zeros((1, T), np.int32),
           "loss_mask": np.zeros((1, T), np.float32), "segment_ids": np.zeros((1, T), np.int32),
           "positions": np.zeros((1, T), np.int32), "pixel_values": np.zeros((1, n_items, 1, s, s, 3), np.float32),
           "item_mask": np.zeros((1, n_items, 1), bool)}
    t = k = 0
    for seg, (ids, pix, loss) in enumerate(samples, start=1):
        L = len(ids)
        row["input_ids"][0, t:t + L], row["loss_mask"][0, t:t + L] = ids, loss
        row["attention_mask"][0, t:t + L], row["segment_ids"][0, t:t + L] = 1, seg
        row["positions"][0, t:t + L] = np.arange(L)
        row["pixel_values"][0, k:k + len(pix)], row["item_mask"][0, k:k + len(pix)] = pix, True
        t, k = t + L, k + len(pix)
    return {key: jnp.asarray(v) for key, v in row.items()}


def unpacked(samples):
    """The same samples as an ordinary right-padded batch (no segment_ids / positions)."""
    B, T, N = len(samples), max(LENGTHS), max(len(p) for p in PLACEHOLDERS)
    s = samples[0][1].shape[2]
    b = {"input_ids": np.zeros((B, T), np.int32), "attention_mask": np.zeros((B, T), np.int32),
         "loss_mask": np.zeros((B, T), np.float32), "pixel_values": np.zeros((B, N, 1, s, s, 3), np.float32),
         "item_mask": np.zeros((B, N, 1), bool)}
    for i, (ids, pix, loss) in enumerate(samples):
        b["input_ids"][i, :len(ids)], b["attention_mask"][i, :len(ids)], b["loss_mask"][i, :len(ids)] = ids, 1, loss
        b["pixel_values"][i, :len(pix)], b["item_mask"][i, :len(pix)] = pix, True
    return {key: jnp.asarray(v) for key, v in b.items()}


def packed_logits(model, params, row):
    return jax.jit(lambda p, r: model.apply({"params": p}, r["input_ids"], r["pixel_values"], r["item_mask"],
                                            attention_mask=r["attention_mask"], position_ids=r["positions"],
                                            segment_ids=r["segment_ids"]))(params, row)


def alone_logits(model, params, ids, pix):
    """A sample run alone, unpacked, exactly as today (text-only when it has no image)."""
    apply = jax.jit(model.apply)
    if len(pix) == 0:
        return apply({"params": params}, jnp.asarray(ids)[None])[0]
    return apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(pix)[None], jnp.ones((1,) + pix.shape[:2], bool))[0]


def segments(logits, row):
    """Per-segment logits of a packed row, in order."""
    seg = np.asarray(row["segment_ids"][0])
    return [np.asarray(logits[0])[seg == s] for s in range(1, seg.max() + 1)]


@pytest.mark.parametrize("variant", list(FUSIONS))
def test_packed_logits_equal_each_sample_alone(variant):
    cfg = make_config(*FUSIONS[variant])
    model, params, samples = lavi_jax.LaVi(cfg), make_params(make_config(*FUSIONS[variant])), make_samples(cfg)
    row = pack(samples, T=32)
    assert not np.any(np.asarray(row["loss_mask"])[np.diff(np.asarray(row["segment_ids"]), prepend=0) != 0])
    got = segments(packed_logits(model, params, row), row)
    for (ids, pix, _), seg_logits in zip(samples, got):
        np.testing.assert_allclose(seg_logits, np.asarray(alone_logits(model, params, ids, pix)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["attention", "concat"])
def test_packed_loss_and_gradients_equal_unpacked_batch(variant):
    cfg = make_config(*FUSIONS[variant])
    model, params, samples = lavi_jax.LaVi(cfg), make_params(cfg), make_samples(cfg, seed=1)

    def mean_loss(p, b):
        num, den = loss_terms(model, p, b)
        return num / den, den

    grad = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))
    (loss_p, den_p), g_p = grad(params, pack(samples, T=32))
    (loss_u, den_u), g_u = grad(params, unpacked(samples))
    assert float(den_p) == float(den_u) > 0
    np.testing.assert_allclose(float(loss_p), float(loss_u), atol=1e-5, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["attention", "mlp", "concat"])
def test_changing_one_segment_leaves_the_others_bit_identical(variant):
    cfg = make_config(*FUSIONS[variant])
    model, params, samples = lavi_jax.LaVi(cfg), make_params(cfg), make_samples(cfg, seed=2)
    base = segments(packed_logits(model, params, pack(samples, T=32)), pack(samples, T=32))
    ids, pix, loss = samples[1]
    new_text = samples[:1] + [(np.where(np.arange(len(ids)) == 5, (ids + 1) % cfg.image_token_id, ids), pix, loss)] + samples[2:]
    ids2, pix2, loss2 = samples[2]
    new_image = samples[:2] + [(ids2, pix2 + np.float32(1.0) * (np.arange(len(pix2)) == 0)[:, None, None, None, None], loss2)]
    for changed, index in ((new_text, 1), (new_image, 2)):
        got = segments(packed_logits(model, params, pack(changed, T=32)), pack(changed, T=32))
        assert not np.array_equal(got[index], base[index])  # the change shows where it was made ...
        for j in set(range(3)) - {index}:  # ... and nowhere else
            np.testing.assert_array_equal(got[j], base[j])


@pytest.mark.parametrize("variant", ["attention", "concat"])
def test_splash_packed_equals_xla_packed(variant):
    fusion, cond = FUSIONS[variant]
    cfg = make_config(fusion, cond, "xla")
    params, samples = make_params(cfg), make_samples(cfg, seed=3)
    # concat: T_out = T + 4 items * (16 - 1) must tile by 128 for splash to serve it
    row = pack(samples, T=128 if fusion == "modulation" else 196)
    xla = packed_logits(lavi_jax.LaVi(cfg), params, row)
    splash_model = lavi_jax.LaVi(make_config(fusion, cond, "splash"))
    jaxpr = jax.make_jaxpr(lambda p: splash_model.apply({"params": p}, row["input_ids"], row["pixel_values"], row["item_mask"],
                                                        attention_mask=row["attention_mask"], segment_ids=row["segment_ids"]))
    assert "pallas_call" in str(jaxpr(params))
    splash = packed_logits(splash_model, params, row)
    real = np.asarray(row["attention_mask"])[0] == 1
    np.testing.assert_allclose(np.asarray(splash)[0, real], np.asarray(xla)[0, real], atol=1e-5, rtol=0)


def test_unpacked_segment_ids_give_todays_logits():
    """segment_ids = attention_mask with positions = cumsum - 1 is an unpacked batch: today's logits exactly."""
    cfg = make_config()
    model, params = lavi_jax.LaVi(cfg), make_params(cfg)
    b = unpacked(make_samples(cfg, seed=4))
    today = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["item_mask"],
                        attention_mask=b["attention_mask"])
    mask = b["attention_mask"]
    same = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["item_mask"], attention_mask=mask,
                       position_ids=jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), segment_ids=mask)
    real = np.asarray(mask) == 1
    np.testing.assert_array_equal(np.asarray(same)[real], np.asarray(today)[real])
