"""The decode cache: written in place (no cache-sized temporaries), per-row write indices (continuous batching),
and the aligned prefill (a prompt attends to itself, then is written) equal to the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax.generate import Generator
from lavi_jax.models.decoder import init_cache, visual_cache_batch_axes
from lavi_jax.models.lavi import LaVi
from test_generate import random_params
from test_lavi import tiny


def _prompt(cfg, n, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.image_token_id, (1, n)).astype(np.int32)
    ids[0, 1] = cfg.image_token_id
    s = cfg.vision.image_size
    return ids, rng.normal(size=(1, 1, 1, s, s, 3)).astype(np.float32)


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])  # unscanned: ~40 s
def test_rows_written_at_their_own_index_decode_as_alone(scan):
    """Two prompts of different lengths prefilled alone, copied into one 2-row cache at their own lengths, then one
    decode step with cache_index [n0, n1]: each row's logits equal the full forward over its prompt + the token."""
    cfg = tiny(fusion="modulation", scan_layers=scan)
    params, _ = random_params("modulation")
    if scan:
        from test_generate import stack_layers
        params = stack_layers(params, cfg.llm.num_layers)
    model = LaVi(cfg)
    S, lengths = 16, (9, 5)
    cache = init_cache(cfg.llm, 2, S)
    visual, masks, refs, nxt = [], np.zeros((2, S), np.int32), [], []
    for b, n in enumerate(lengths):
        ids, pix = _prompt(cfg, n, b)
        row = init_cache(cfg.llm, 1, S)
        mask = np.pad(np.ones((1, n), np.int32), ((0, 0), (0, S - n)), constant_values=1)
        out, vc = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix), attention_mask=jnp.asarray(mask),
                              cache=row, cache_index=0, method=LaVi.forward, mutable=["visual_cache"])
        tok = int(jnp.argmax(out.logits[0, -1]))
        cache = jax.tree.map(lambda c, r: c.at[:, b].set(r[:, 0]), cache, out.cache)
        visual.append(vc["visual_cache"])
        masks[b, :n + 1] = 1
        nxt.append(tok)
        full = model.apply({"params": params}, jnp.asarray(np.append(ids, tok)[None]), jnp.asarray(pix))
        refs.append(np.asarray(full[0, -1]))
    axes = visual_cache_batch_axes(visual[0])
    assert (1 in jax.tree.leaves(axes)) == scan  # scanned layers lead with their layer axis
    vc = jax.tree.map(lambda ax, a, b: jnp.concatenate([a, b], axis=ax), axes, *visual)
    out = model.apply({"params": params, "visual_cache": vc}, jnp.asarray(nxt, jnp.int32)[:, None],
                      attention_mask=jnp.asarray(masks), position_ids=jnp.asarray(lengths, jnp.int32)[:, None],
                      cache=cache, cache_index=jnp.asarray(lengths, jnp.int32), use_visual_cache=True,
                      method=LaVi.forward)
    np.testing.assert_allclose(np.asarray(out.logits[:, -1]), np.stack(refs), atol=1e-4, rtol=1e-4)
    for b, n in enumerate(lengths):  # each row's new key went to its own slot, nothing else moved
        assert np.abs(np.asarray(out.cache["k"][:, b, n])).sum() > 0
        np.testing.assert_array_equal(np.asarray(out.cache["k"][:, b, :n]), np.asarray(cache["k"][:, b, :n]))
        np.testing.assert_array_equal(np.asarray(out.cache["k"][:, b, n + 1:]), 0)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_loop_updates_the_cache_in_place(scan):
    """The compiled decode loop (cache donated) needs less scratch memory than one cache: no layer's update makes a
    new stacked cache (the unrolled stack of per-layer slices and the scanned cache-as-scan-output both did)."""
    cfg = tiny(fusion="modulation", scan_layers=scan)
    model = lavi_jax.LaVi(cfg)
    ids = jnp.ones((4, 16), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn_unbox(params))
    gen = Generator(model, max_new_tokens=512, buckets=(16,))
    state = gen.prefill(params, ids)
    rest = {k: v for k, v in state.items() if k != "cache"}
    compiled = gen._decode.lower(params, state["cache"], rest, jax.random.key(0), jnp.float32(1), jnp.float32(1),
                                 greedy=True, top_k=0, nucleus=False).compile()
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(state["cache"]))
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is the output cache
    assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


def nn_unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


def _primitives(fn, *args):
    """Every primitive of ``fn``'s jaxpr, nested calls included."""
    import re
    return set(re.findall(r"\b([a-z_]+)\[", str(jax.make_jaxpr(fn)(*args))))


def test_sampling_sorts_the_vocabulary_only_for_a_nucleus():
    from lavi_jax.generate import sample, top_k_mask, top_p_mask
    logits = jax.random.normal(jax.random.key(1), (3, 1000))
    rng = jax.random.key(2)
    assert "sort" not in _primitives(lambda l: sample(l, rng, False, 0, 0.7, 1.0), logits)
    assert "sort" not in _primitives(lambda l: sample(l, rng, False, 20, 0.7, 0.9), logits)  # top_k bounds it
    assert "sort" in _primitives(lambda l: sample(l, rng, False, 0, 0.7, 0.9), logits)
    masked = top_k_mask(logits, 20)
    np.testing.assert_array_equal(np.asarray(top_p_mask(masked, 0.5, 20)), np.asarray(top_p_mask(masked, 0.5)))


def test_per_row_temperature_and_top_p():
    """Rows of one batch sample with their own settings: temperature 0 is that row's argmax, a top_p near 0 keeps
    only the top token, and a hot row draws other tokens."""
    from lavi_jax.generate import sample
    logits = jax.random.normal(jax.random.key(3), (3, 50))
    temperature, top_p = jnp.asarray([0.0, 5.0, 5.0]), jnp.asarray([1.0, 1e-6, 1.0])
    draws = np.stack([np.asarray(sample(logits, jax.random.key(i), False, 0, temperature, top_p)) for i in range(40)])
    top = np.asarray(jnp.argmax(logits, -1))
    assert (draws[:, 0] == top[0]).all() and (draws[:, 1] == top[1]).all()
    assert len(set(draws[:, 2].tolist())) > 5


def test_prefill_attends_to_the_prompt_not_to_every_cache_slot():
    """The prefill's scratch memory does not grow with the decode slots after the prompt: its attention runs over
    the T prompt keys (where splash / cuDNN serve it), not a [B, H, T, S] score tensor over the whole cache."""
    cfg = tiny(fusion="none")
    model = lavi_jax.LaVi(cfg)
    B, T = 2, 64
    ids = jnp.ones((B, T), jnp.int32)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          nn_unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]))

    def temp(new_tokens):
        gen = Generator(model, max_new_tokens=new_tokens, buckets=(T,))
        mask = jnp.ones((B, T), jnp.int32)
        return gen._prefill.lower(params, ids, mask, None, None).compile().memory_analysis().temp_size_in_bytes

    extra_slots = 2048 - 64
    scores = B * cfg.llm.num_heads * T * extra_slots * 4  # float32 scores over the added slots, one layer
    assert temp(2048) - temp(64) < scores / 4, (temp(2048), temp(64), scores)
