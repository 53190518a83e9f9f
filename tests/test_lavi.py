"""LaVi model behaviour: zero-init identity, causal visual items, gradients, fusion modes, knobs, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax import sharding
from lavi_jax.models.projector import tokens_per_frame
from lavi_jax.models.splice import splice_layout
from lavi_jax.models.vit import VisionTower, sincos2d

CFG = "configs/lavi_qwen2_7b_siglip.py:tiny"


def tiny(**overrides):
    cfg = lavi_jax.configs.get(CFG).model
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def batch(cfg, n_items=2, frames=1, seed=0, T=16, placeholders=(3, 9), B=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.image_token_id, (B, T)).astype(np.int32)
    for p in placeholders:
        ids[:, p] = cfg.image_token_id
    s = cfg.vision.image_size
    pix = rng.normal(size=(B, n_items, frames, s, s, 3)).astype(np.float32)
    mask = np.ones((B, n_items, frames), bool)
    return jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)


def init(cfg, ids, seed=0):
    return nn.unbox(lavi_jax.LaVi(cfg).init(jax.random.key(seed), ids)["params"])


def perturb_conditioners(params, seed=1, scale=0.5):
    """Random output projections: a trained-like model whose images matter."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = {k: (scale * jax.random.normal(r, v.shape, v.dtype) if any("conditioner" in p for p in k) and "o_proj" in k else v)
           for (k, v), r in zip(flat.items(), keys)}
    return traverse_util.unflatten_dict(out)


VARIANTS = {
    "attention": {},
    "mlp": {"conditioner.type": "mlp"},
    "conv": {"conditioner.type": "conv"},
    "attn-norm-scale-only": {"conditioner.norms": ("attn",), "conditioner.params": ("scale",)},
    "mlp-norm-shift-every2-final": {"conditioner.norms": ("mlp",), "conditioner.params": ("shift",),
                                    "conditioner.every": 2, "conditioner.offset": 1, "conditioner.final_norm": True},
    "explicit-layers-shared": {"conditioner.layers": (0, 3), "conditioner.shared": True},
    "scan-every2": {"conditioner.every": 2, "scan_layers": True},
    "pool2-linear": {"projector.pool": 2, "projector.type": "linear"},
    "clip-tower": {"vision.type": "clip", "vision.image_size": 28, "vision.patch_size": 7, "vision.feature_layers": (-2, -1)},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_init_is_base_llm_and_deltas_are_causal(variant):
    cfg = tiny(**VARIANTS[variant])
    ids, pix, mask = batch(cfg)
    model = lavi_jax.LaVi(cfg)
    params = init(cfg, ids)
    apply = jax.jit(model.apply)
    text_only = apply({"params": params}, ids)
    with_images = apply({"params": params}, ids, pix, mask)
    np.testing.assert_array_equal(np.asarray(with_images), np.asarray(text_only))

    # The base LLM alone (fusion="none", conditioner params dropped) computes the same logits.
    # (Scanned params stack by modulation period, a layout the plain LLM does not share.)
    if not cfg.scan_layers:
        base_cfg = tiny(**VARIANTS[variant], fusion="none")
        flat = traverse_util.flatten_dict(params["llm"])
        base = {"llm": traverse_util.unflatten_dict({k: v for k, v in flat.items() if not any("conditioner" in p for p in k)})}
        np.testing.assert_array_equal(np.asarray(jax.jit(lavi_jax.LaVi(base_cfg).apply)({"params": base}, ids)), np.asarray(text_only))

    # Perturbed conditioners change exactly the tokens at or after the first placeholder (position 3).
    moved = apply({"params": perturb_conditioners(params)}, ids, pix, mask)
    diff = np.abs(np.asarray(moved) - np.asarray(text_only)).max(axis=-1)  # [B, T]
    assert (diff[:, :3] == 0).all()
    assert (diff[:, 3:] > 1e-6).all(), diff


def test_later_item_does_not_leak_backwards():
    cfg = tiny()
    ids, pix, mask = batch(cfg, placeholders=(3, 9))
    model = lavi_jax.LaVi(cfg)
    params = perturb_conditioners(init(cfg, ids))
    apply = jax.jit(model.apply)
    a = np.asarray(apply({"params": params}, ids, pix, mask))
    pix2 = pix.at[:, 1].set(jax.random.normal(jax.random.key(5), pix[:, 1].shape))
    b = np.asarray(apply({"params": params}, ids, pix2, mask))
    np.testing.assert_array_equal(a[:, :9], b[:, :9])  # before image 2's placeholder: untouched
    assert (np.abs(a[:, 9:] - b[:, 9:]).max(axis=-1) > 1e-6).all()
    # A masked-out item is invisible: same as changing nothing.
    c = np.asarray(apply({"params": params}, ids, pix2, mask.at[:, 1].set(False)))
    d = np.asarray(apply({"params": params}, ids, pix, mask.at[:, 1].set(False)))
    np.testing.assert_array_equal(c, d)


def test_gradients_reach_zero_initialised_conditioner():
    cfg = tiny()
    ids, pix, mask = batch(cfg)
    model = lavi_jax.LaVi(cfg)
    params = init(cfg, ids)

    def loss(p):
        logits = model.apply({"params": p}, ids, pixel_values=pix, item_mask=mask)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
    o_proj = {k: v for k, v in grads.items() if "conditioner" in k and "o_proj" in k and k[-1] == "kernel"}
    assert len(o_proj) == 2 * cfg.llm.num_layers
    assert all(float(jnp.abs(v).max()) > 0 for v in o_proj.values())
    # The projector and vision tower learn only through the conditioners, whose output is zero at init.
    assert all(float(jnp.abs(v).max()) == 0 for k, v in grads.items() if k[0] == "projector")


@pytest.mark.parametrize("frames", [1, 3])
def test_concat_and_modulation_run_on_the_same_batch(frames):
    ids, pix, mask = batch(tiny(), frames=frames)
    mask = mask.at[1, 1, frames - 1].set(False)  # a padded frame
    outs = {}
    for fusion in ("modulation", "concat", "none"):
        cfg = tiny(fusion=fusion)
        params = init(cfg, ids)
        outs[fusion] = jax.jit(lavi_jax.LaVi(cfg).apply)({"params": params}, ids, pix, mask)
        assert outs[fusion].shape == (2, 16, cfg.llm.vocab_size)
        assert np.isfinite(np.asarray(outs[fusion])).all()


@pytest.mark.parametrize("fusion,overrides", [("modulation", {"conditioner.final_norm": True}), ("concat", {}), ("none", {})])
def test_logits_at_selects_positions_of_the_full_forward(fusion, overrides):
    cfg = tiny(fusion=fusion, **overrides)
    ids, pix, mask = batch(cfg)
    params = perturb_conditioners(init(cfg, ids))
    apply = jax.jit(lavi_jax.LaVi(cfg).apply)
    full = np.asarray(apply({"params": params}, ids, pix, mask))
    at = jnp.asarray([[15, 2, 9], [0, 9, 4]], jnp.int32)  # before, at and after placeholders, unsorted
    some = np.asarray(apply({"params": params}, ids, pix, mask, logits_at=at))
    assert some.shape == (2, 3, cfg.llm.vocab_size)
    np.testing.assert_allclose(some, np.take_along_axis(full, np.asarray(at)[:, :, None], axis=1), atol=1e-5, rtol=0)


def test_concat_splices_visual_tokens_in_place_of_placeholders():
    cfg = tiny(fusion="concat")
    ids, pix, mask = batch(cfg, frames=2)
    model = lavi_jax.LaVi(cfg)
    params = init(cfg, ids)
    logits = model.apply({"params": params}, ids, pixel_values=pix, item_mask=mask)
    # Reference: build the expanded sequence by hand and run the LLM on embeddings.
    tokens, _ = model.apply({"params": params}, pix, method=lavi_jax.LaVi.encode)
    vis = np.asarray(tokens).reshape(2, 2, -1, cfg.llm.hidden_size)
    emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])[np.asarray(ids)]
    rows, text_pos = [], []
    for b in range(2):
        seq, where, k = [], [], 0
        for t, tok in enumerate(np.asarray(ids[b])):
            if tok == cfg.image_token_id:
                seq.extend(vis[b, k]); k += 1
            else:
                seq.append(emb[b, t])
            where.append(len(seq) - 1)
        rows.append(np.stack(seq)); text_pos.append(where)
    llm = lavi_jax.LaVi(tiny(fusion="none"))
    ref = llm.apply({"params": {"llm": params["llm"]}}, jnp.zeros((2, rows[0].shape[0]), jnp.int32),
                    method=lambda m, x, e: m.llm(inputs_embeds=e).logits, e=jnp.asarray(np.stack(rows)))
    ref = np.take_along_axis(np.asarray(ref), np.asarray(text_pos)[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)


def test_splice_layout_by_hand_and_tokens_per_frame_match_the_projector():
    ids = jnp.asarray([[5, 9, 6, 9, 7], [5, 9, 6, 7, 8]], jnp.int32)  # 9: the placeholder; row 1 has one item
    item_mask = jnp.asarray([[[True], [False]], [[True], [True]]])  # [B, N=2, F=1]
    lay = splice_layout(ids, jnp.ones((2, 5), jnp.int32), item_mask, 9, tokens_per_frame=2)
    assert lay.length == 5 + 2 * (2 - 1)
    np.testing.assert_array_equal(lay.text_slot, [[0, 1, 3, 4, 6], [0, 1, 3, 4, 5]])
    np.testing.assert_array_equal(lay.text_last, [[0, 2, 3, 5, 6], [0, 2, 3, 4, 5]])
    np.testing.assert_array_equal(lay.visual_slot, [[[1, 2], [4, 5]], [[1, 2], [7, 7]]])  # 7: dropped
    np.testing.assert_array_equal(lay.mask, [[1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1, 0]])

    cfg = tiny(fusion="concat", **{"projector.pool": 2})
    model = lavi_jax.LaVi(cfg)
    ids, pix, mask = batch(cfg)
    shapes, _ = sharding.abstract_params(model, ids)
    tokens, _ = jax.eval_shape(lambda p: model.apply({"params": p}, pix, method=lavi_jax.LaVi.encode), shapes)
    assert tokens.shape[3] == tokens_per_frame(cfg) == (cfg.vision.image_size // cfg.vision.patch_size // 2) ** 2


def test_model_holds_a_frozen_copy_of_its_config():
    cfg = tiny()
    model = lavi_jax.LaVi(cfg)
    cfg.fusion = "none"
    cfg.llm.num_layers = 1
    assert model.config.fusion == "modulation" and model.config.llm.num_layers == tiny().llm.num_layers
    with pytest.raises(AttributeError):
        model.config.fusion = "concat"
    assert model.config.get("missing", 3) == 3 and isinstance(model.config.conditioner.params, tuple)


def test_scanned_layout_equals_unrolled():
    from lavi_jax.hf import mapping
    from lavi_jax.hf.placement import export_tensors, load_params

    cfg = tiny(**{"conditioner.every": 2, "fusion": "none"})
    ids, _, _ = batch(cfg)
    params = init(cfg, ids)
    tensors = export_tensors(mapping.llm_entries(cfg), params)
    scfg = tiny(**{"conditioner.every": 2, "fusion": "none", "scan_layers": True})
    sparams = load_params(mapping.llm_entries(scfg), tensors.__getitem__, init(scfg, ids, seed=3))
    assert sparams["llm"]["blocks"]["layers_0"]["mlp"]["up_proj"]["kernel"].shape[0] == cfg.llm.num_layers
    np.testing.assert_allclose(np.asarray(lavi_jax.LaVi(scfg).apply({"params": sparams}, ids)),
                               np.asarray(lavi_jax.LaVi(cfg).apply({"params": params}, ids)), atol=1e-5)


def test_sharded_forward_equals_single_device():
    assert jax.device_count() == 8, "tests run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    cfg = tiny()
    ids, pix, mask = batch(cfg, B=4)
    model = lavi_jax.LaVi(cfg)
    params = perturb_conditioners(init(cfg, ids), scale=0.05)
    single = np.asarray(jax.jit(model.apply)({"params": params}, ids, pix, mask))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, specs = sharding.abstract_params(model, ids)
    shardings = sharding.logical_to_sharding(specs, mesh)
    sparams = jax.device_put(params, shardings)
    assert any(len(s.spec) and any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
    args = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (ids, pix, mask)]
    with sharding.use_mesh(mesh):
        out = jax.jit(model.apply)({"params": sparams}, *args)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5)


def test_sharded_init_places_params_in_shards():
    cfg = tiny()
    ids, _, _ = batch(cfg)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    params = sharding.init_params(lavi_jax.LaVi(cfg), jax.random.key(0), ids, mesh=mesh)
    q = params["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # (embed, heads, head_dim)
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (cfg.llm.hidden_size // 2, cfg.llm.num_heads // 2, cfg.llm.head_dim)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_sincos2d_position_embedding_init(kind):
    cfg = tiny(**{"vision.type": kind, "vision.posemb_init": "sincos2d"}).vision
    pix = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    pos = np.asarray(nn.unbox(VisionTower(cfg).init(jax.random.key(0), pix)["params"])["position_embedding"])
    side, width = cfg.image_size // cfg.patch_size, cfg.hidden_size
    table = np.asarray(sincos2d(side, width)).reshape(side, side, width)  # [row, column, width]
    np.testing.assert_array_equal(pos[-side * side:], table.reshape(-1, width))
    if kind == "clip":
        np.testing.assert_array_equal(pos[0], 0)  # the CLS position
    half = width // 2  # first half encodes the column, second half the row; sin^2 + cos^2 = 1 per frequency
    np.testing.assert_allclose(table[:, 3, :half], np.broadcast_to(table[0, 3, :half], (side, half)))
    np.testing.assert_allclose(table[2, :, half:], np.broadcast_to(table[2, 0, half:], (side, half)))
    q = width // 4
    np.testing.assert_allclose(table[..., :q] ** 2 + table[..., q:half] ** 2, 1, atol=1e-6)
    assert len({tuple(np.round(v, 5)) for v in table.reshape(-1, width)}) == side * side

