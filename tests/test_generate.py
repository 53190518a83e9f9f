"""Cached generation: greedy decode equals a full forward's argmax, padding, stop tokens, sampling, compilation, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax import sharding
from lavi_jax.generate import GenerationConfig, Generator, generate, measure_speed, sample, top_k_mask, top_p_mask
from test_lavi import tiny

LENGTHS = (12, 9, 4, 7)  # real prompt tokens per row; row 2 holds only the first image
PLACEHOLDERS = (2, 5)
MAX_NEW = 6


def prompts(cfg, frames, seed=0):
    """Right-padded prompts of different lengths [B, 12], their mask, pixels and item mask (one padded frame)."""
    rng = np.random.default_rng(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    ids = rng.integers(1, cfg.image_token_id, (B, T)).astype(np.int32)
    ids[:, list(PLACEHOLDERS)] = cfg.image_token_id
    mask = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 0)
    s = cfg.vision.image_size
    pix = rng.normal(size=(B, 2, frames, s, s, 3)).astype(np.float32)
    item_mask = np.ones((B, 2, frames), bool)
    if frames > 1:
        item_mask[1, 1, frames - 1] = False
    return ids, mask, pix, item_mask


@functools.lru_cache(maxsize=None)
def random_params(fusion):
    """Random parameters for the model's shapes (numpy, no init compile); every conditioner output is non-zero,
    so images change the logits. Returns (params, logical partition specs)."""
    cfg = tiny(fusion=fusion)
    ids, _, _, _ = prompts(cfg, 1)
    shapes, specs = sharding.abstract_params(lavi_jax.LaVi(cfg), jnp.asarray(ids))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # norm weights
            return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), s.dtype)
        std = 0.02 if (len(s.shape) < 2 or "embed" in name) else float(np.prod(s.shape[:-1])) ** -0.5
        return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes), specs


@functools.lru_cache(maxsize=None)
def case(fusion, frames):
    """(model, params, inputs, generator, greedy tokens, lengths) shared by the tests of one setting."""
    cfg = tiny(fusion=fusion)
    ids, mask, pix, item_mask = prompts(cfg, frames)
    model = lavi_jax.LaVi(cfg)
    params, _ = random_params(fusion)
    gen = Generator(model, max_new_tokens=MAX_NEW, buckets=(16,))
    tokens, lengths = gen(params, ids, mask, pix, item_mask)
    return model, params, (ids, mask, pix, item_mask), gen, np.asarray(tokens), np.asarray(lengths)


def full_forward(model, params, inputs, tokens):
    """Logits of a full forward over left-padded prompt + generated tokens: [B, T + n, V] and the prompt width T."""
    ids, mask, pix, item_mask = inputs
    B, T = ids.shape
    lens = mask.sum(1)
    left = np.zeros_like(ids)
    left_mask = np.zeros_like(mask)
    for b in range(B):
        left[b, T - lens[b]:] = ids[b, :lens[b]]
        left_mask[b, T - lens[b]:] = 1
    seq = np.concatenate([left, tokens], axis=1)
    seq_mask = np.concatenate([left_mask, np.ones_like(tokens)], axis=1)
    visual = () if pix is None else (jnp.asarray(pix), jnp.asarray(item_mask))
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(seq), *visual, attention_mask=jnp.asarray(seq_mask))
    return np.asarray(logits), T


def assert_greedy(logits, T, tokens):
    """Every generated token is the argmax of the full forward at the position before it."""
    n = tokens.shape[1]
    step_logits = logits[:, T - 1:T - 1 + n]  # [B, n, V]
    chosen = np.take_along_axis(step_logits, tokens[:, :, None], axis=2)[..., 0]
    assert (chosen >= step_logits.max(-1) - 1e-4).all(), (tokens, step_logits.argmax(-1))
    assert (tokens == step_logits.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("fusion,frames", [("modulation", 1), ("modulation", 3), ("concat", 1), ("concat", 2)])
def test_greedy_equals_full_forward_argmax(fusion, frames):
    model, params, inputs, gen, tokens, lengths = case(fusion, frames)
    assert tokens.shape == (len(LENGTHS), MAX_NEW) and (lengths == MAX_NEW).all()
    logits, T = full_forward(model, params, inputs, tokens)
    assert_greedy(logits, T, tokens)


def test_same_bucket_never_recompiles():
    model, params, (ids, mask, pix, item_mask), gen, tokens, _ = case("modulation", 1)
    before = dict(gen.num_traces)
    # Shorter prompt width (same bucket) and other parameter values: no new compilation.
    params2 = jax.tree.map(lambda x: x * 1.01, params)
    gen(params2, ids[:, :11], mask[:, :11], pix, item_mask)
    out, _ = gen(params, ids, mask, pix, item_mask)
    assert gen.num_traces == before
    np.testing.assert_array_equal(np.asarray(out), tokens)
    # Temperature and top_p are runtime values: one compilation for the sampling switch (top_k 5), not per value.
    gen(params, ids, mask, pix, item_mask, sampling=GenerationConfig(temperature=0.7, top_k=5, top_p=0.9))
    gen(params, ids, mask, pix, item_mask, sampling=GenerationConfig(temperature=1.3, top_k=5, top_p=0.5),
        rng=jax.random.key(3))
    assert gen.num_traces == {"prefill": before["prefill"], "decode": before["decode"] + 1}


def test_stop_tokens_end_a_row():
    model, params, inputs, _, tokens, _ = case("modulation", 1)
    row = next(b for b in range(len(LENGTHS)) if tokens[b, 2] not in tokens[b, :2])
    stop = int(tokens[row, 2])
    out, lengths = generate(model, params, *inputs, max_new_tokens=MAX_NEW, stop_ids=(stop, 10**6), pad_id=0)
    out, lengths = np.asarray(out), np.asarray(lengths)
    for b in range(len(LENGTHS)):
        hits = np.flatnonzero(tokens[b] == stop)
        n = int(hits[0]) if hits.size else MAX_NEW
        assert lengths[b] == n
        np.testing.assert_array_equal(out[b, :n], tokens[b, :n])
        if n < MAX_NEW:
            assert out[b, n] == stop and (out[b, n + 1:] == 0).all()
    assert lengths[row] == 2


def test_near_zero_temperature_and_top_k_1_equal_greedy():
    model, params, inputs, gen, tokens, _ = case("modulation", 1)
    for sampling in (GenerationConfig(temperature=1e-6), GenerationConfig(temperature=1.0, top_k=1)):
        out, _ = gen(params, *inputs, sampling=sampling, rng=jax.random.key(7))
        np.testing.assert_array_equal(np.asarray(out), tokens)


def test_top_k_and_top_p_masks_on_a_hand_made_distribution():
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x)[0])).tolist())
    assert kept(top_k_mask(logits, 1)) == {1}
    assert kept(top_k_mask(logits, 3)) == {1, 3, 4}
    assert kept(top_k_mask(logits, 0)) == kept(top_k_mask(logits, 5)) == set(range(5))
    assert kept(top_p_mask(logits, 0.5)) == {1}  # 0.5 alone reaches 0.5
    assert kept(top_p_mask(logits, 0.6)) == {1, 3}
    assert kept(top_p_mask(logits, 0.8)) == {1, 3, 4}  # 0.85 >= 0.8
    assert kept(top_p_mask(logits, 0.01)) == {1}
    assert kept(top_p_mask(logits, 1.0)) == set(range(5))
    # Sampling through both masks draws from the renormalised survivors.
    draws = jax.jit(jax.vmap(lambda k: sample(logits, k, False, 3, 1.0, 0.7)))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws)[:, 0], minlength=5) / 4000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.7, 0, 0.2 / 0.7, 0], atol=0.03)  # top_p 0.7 keeps {1, 3}


def stack_layers(params, num_layers):
    """Unrolled ``llm/layers_i`` -> scanned ``llm/blocks/layers_0`` (scan unit of one layer)."""
    llm = dict(params["llm"])
    layers = [llm.pop(f"layers_{i}") for i in range(num_layers)]
    llm["blocks"] = {"layers_0": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    return dict(params, llm=llm)


def test_scanned_layers_generate_the_same_tokens():
    model, params, inputs, _, tokens, _ = case("modulation", 1)
    cfg = tiny(fusion="modulation", scan_layers=True)
    sparams = stack_layers(params, cfg.llm.num_layers)
    gen = Generator(lavi_jax.LaVi(cfg), max_new_tokens=MAX_NEW, buckets=(16,))
    np.testing.assert_array_equal(np.asarray(gen(sparams, *inputs)[0]), tokens)


def test_sharded_generation_equals_single_device():
    assert jax.device_count() == 8
    model, params, (ids, mask, pix, item_mask), _, tokens, lengths = case("modulation", 1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, specs = random_params("modulation")
    sparams = jax.device_put(params, sharding.logical_to_sharding(specs, mesh))
    args = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (ids, mask, pix, item_mask)]
    with sharding.use_mesh(mesh):
        out, out_lengths = Generator(model, max_new_tokens=MAX_NEW, buckets=(16,))(sparams, *args)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out), tokens)
    np.testing.assert_array_equal(np.asarray(out_lengths), lengths)


def test_text_only_prompts_and_speed_helper():
    model, params, (ids, mask, _, _), _, _, _ = case("modulation", 1)
    gen = Generator(model, max_new_tokens=3, buckets=(16,))
    tokens, _ = gen(params, ids, mask)
    logits, T = full_forward(model, params, (ids, mask, None, None), np.asarray(tokens))
    assert_greedy(logits, T, np.asarray(tokens))
    speed = measure_speed(gen, params, ids, mask, repeats=1)
    assert speed["decode_tokens_per_s"] > 0 and speed["batch"] == len(LENGTHS)
