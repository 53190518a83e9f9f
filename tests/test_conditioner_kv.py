"""Shared visual K/V (``conditioner.kv_share``) and what the conditioners keep for decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax.generate import Generator
from test_lavi import batch, perturb_conditioners, tiny


def _init(cfg, ids):
    return nn.unbox(lavi_jax.LaVi(cfg).init(jax.random.key(0), ids)["params"])


def _paths(tree):
    return ["/".join(k) for k in traverse_util.flatten_dict(tree)]


@pytest.mark.parametrize("share,scan,groups", [("2", False, 2), pytest.param("all", True, 1, marks=pytest.mark.slow)])
def test_kv_share_params_identity_and_greedy_decoding(share, scan, groups):
    """One K/V projection per group and none in the norms; a fresh model is the base LLM; cached greedy decoding
    picks the full forward's argmax while the visual cache holds one K/V set per group."""
    cfg = tiny(**{"conditioner.kv_share": share, "scan_layers": scan})
    ids, pix, mask = batch(cfg)
    params = _init(cfg, ids)
    paths = _paths(params)
    assert sorted(p for p in paths if "k_proj" in p and "conditioner" in p) == \
        [f"conditioner_kv/k_proj_{g}/kernel" for g in range(groups)]
    assert any("/conditioner/q_proj/" in p for p in paths) and any("/conditioner/o_proj/" in p for p in paths)

    model = lavi_jax.LaVi(cfg)
    text_only = lavi_jax.LaVi(tiny(fusion="none", scan_layers=scan))
    flat = traverse_util.flatten_dict({"llm": params["llm"]})
    base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not any("conditioner" in p for p in k)})
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, ids, pix, mask)),
                                  np.asarray(text_only.apply({"params": base}, ids)))

    params = perturb_conditioners(params)
    gen = Generator(model, max_new_tokens=3, buckets=(16,))
    state = gen.prefill(params, ids, jnp.ones_like(ids), pix, mask)
    vc = traverse_util.flatten_dict(state["visual_cache"])
    assert sorted("/".join(k[:2]) for k in vc if k[-1] == "k") == [f"conditioner_kv/kv_{g}" for g in range(groups)]
    tokens, _ = gen.decode(params, state)
    tokens = np.asarray(tokens)
    seq = jnp.concatenate([ids, jnp.asarray(tokens)], axis=1)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, seq, pix, mask))
    step = logits[:, ids.shape[1] - 1:-1]
    chosen = np.take_along_axis(step, tokens[:, :, None], axis=2)[..., 0]
    assert (chosen >= step.max(-1) - 1e-4).all(), (tokens, step.argmax(-1))
    assert np.abs(logits - np.asarray(text_only.apply({"params": base}, seq))).max() > 0.1  # images matter


def test_kv_groups_follow_layers_and_bad_options_fail():
    from lavi_jax.models.conditioner import kv_share_groups

    cond = tiny(**{"conditioner.kv_share": "2", "conditioner.final_norm": True}).conditioner
    assert kv_share_groups(cond, (0, 1, 2, 3, 4)) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, None: 2}
    ids, _, _ = batch(tiny())
    with pytest.raises(ValueError, match="scan_layers"):
        _init(tiny(**{"conditioner.kv_share": "1", "scan_layers": True}), ids)
    with pytest.raises(ValueError, match="attention"):
        _init(tiny(**{"conditioner.kv_share": "all", "conditioner.type": "mlp"}), ids)
    with pytest.raises(ValueError, match="kv_share"):
        _init(tiny(**{"conditioner.kv_share": "some"}), ids)


@pytest.mark.parametrize("kind", ["mlp", pytest.param("conv", marks=pytest.mark.slow)])
def test_mlp_conv_cache_only_the_row_summary(kind):
    """The mlp / conv visual cache is [B, width] per conditioner (no per-token copies); decoding still matches."""
    cfg = tiny(**{"conditioner.type": kind})
    ids, pix, mask = batch(cfg)
    model = lavi_jax.LaVi(cfg)
    params = perturb_conditioners(_init(cfg, ids))
    gen = Generator(model, max_new_tokens=3, buckets=(16,))
    state = gen.prefill(params, ids, jnp.ones_like(ids), pix, mask)
    leaves = traverse_util.flatten_dict(state["visual_cache"])
    summaries = {k: v for k, v in leaves.items() if "summary" in k}
    assert summaries and all(v.shape in ((ids.shape[0], cfg.conditioner.width), (ids.shape[0],))
                             for v in summaries.values())
    assert set(leaves) - set(summaries) == {("conditioner_kv", "key_index")}
    tokens, _ = gen.decode(params, state)
    seq = jnp.concatenate([ids, tokens], axis=1)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, seq, pix, mask))
    step = logits[:, ids.shape[1] - 1:-1]
    chosen = np.take_along_axis(step, np.asarray(tokens)[:, :, None], axis=2)[..., 0]
    assert (chosen >= step.max(-1) - 1e-4).all()
