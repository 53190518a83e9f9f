"""LoRA in training: frozen base without optimizer state, adapter-only checkpoints, resume, load merges."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax import checkpoint, lora, sharding, train as training
from lavi_jax.demo.synthetic import write_synthetic_vqa
from tests.small import small_config


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_synthetic_vqa(str(tmp_path_factory.mktemp("vqa")), num_train=40, num_eval=8, image_size=32)


def tiny_batch(cfg, B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 250, (B, T)).astype(np.int32)
    ids[:, 2] = cfg.model.image_token_id
    s = cfg.model.vision.image_size
    return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
            "loss_mask": (rng.random((B, T)) > 0.3).astype(np.float32),
            "pixel_values": rng.normal(size=(B, 1, 1, s, s, 3)).astype(np.float32), "item_mask": np.ones((B, 1, 1), bool),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "segment_ids": np.ones((B, T), np.int32)}


@pytest.mark.slow  # ~90 s of CPU (a sharded 8-device compile)
def test_lora_step_trains_adapters_only_sharded_like_their_kernels():
    """Two jitted train steps on a data x fsdp x tensor mesh: base frozen bit for bit with no optimizer state,
    adapters (f32 on a bf16 base) move, each sharded on its kernel's mesh axes."""
    config = small_config({"train_json": "unused", "eval_json": "", "image_root": ""}, trainable="projector+conditioners",
                          learning_rate=1e-2, warmup_steps=1, num_steps=2)
    config.model.param_dtype = "bfloat16"
    config.train.lora.update(rank=4, alpha=8.0, dropout=0.1, targets="llm+vision")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    program = training.jit_train_step(config)
    start = checkpoint.initial_params(config, program.mesh)
    state = training.create_state(start, program.tx, program.patterns, program.shardings)
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    with sharding.use_mesh(program.mesh):
        for _ in range(2):
            batch = {k: v for k, v in tiny_batch(config).items() if k in program.batch.shapes()}
            state, m = program.fn(state, sharding.to_global(batch, program.mesh))
    assert np.isfinite(float(m["loss"]))
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    specs = traverse_util.flatten_dict(jax.tree.map(lambda a: a.sharding.spec, state.params))
    adapters = [k for k in after if k[-1] in lora.ADAPTERS]
    assert any(k[0] == "vision" for k in adapters) and any(k[0] == "llm" for k in adapters)
    for k in after:
        trains = training.is_trainable(k, program.patterns)
        assert trains == (k[-1] in lora.ADAPTERS or k[0] == "projector" or "conditioner" in k), k
        if not trains:
            np.testing.assert_array_equal(after[k], before[k], err_msg="/".join(k))
    assert all(after[k].dtype == np.float32 for k in adapters)
    assert after[("llm", "embed_tokens", "embedding")].dtype == jnp.bfloat16
    # The LLM's adapters moved off zero (the vision tower's get gradients once the zero-init conditioners move).
    assert all(np.abs(after[k]).max() > 0 for k in adapters if k[-1] == "lora_b" and k[0] == "llm")
    for k in adapters:
        kp, ap = k[:-1] + ("kernel",), k[:-1] + ("lora_a",)
        pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
        kernel, got = pad(specs[kp], before[kp].ndim), pad(specs[k], after[k].ndim)
        n_in = after[ap].ndim - 1  # a stacked layers axis, then the kernel's input dims
        n_out = before[kp].ndim - n_in
        if k[-1] == "lora_a":
            assert got == kernel[:n_in] + (None,), (k, got, kernel)
        else:
            assert got == kernel[:n_in - (after[ap].ndim - 1 - (after[k].ndim - 1 - n_out))] + (None,) + kernel[n_in:] \
                or got[-n_out:] == kernel[-n_out:] and got[-n_out - 1] is None, (k, got, kernel)
    assert any(any(a is not None for a in specs[k]) for k in adapters)
    trained = sum(int(np.prod(after[k].shape)) for k in after if training.is_trainable(k, program.patterns))
    opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt == 2 * trained


def test_lora_on_a_plain_checkpoint_keeps_the_base_and_starts_adapters_at_zero(tmp_path):
    """``config.init.checkpoint`` without adapters: the base comes back bit for bit, each target gets a
    Kaiming-uniform ``lora_a`` and a zero ``lora_b`` (PEFT's init), so the model computes what the base does."""
    config = small_config({"train_json": "unused", "eval_json": "", "image_root": ""})
    config.mesh.update(data=1, fsdp=2, tensor=1)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=jax.devices()[:2])
    base = sharding.init_params(lavi_jax.LaVi(config.model), jax.random.key(3), jnp.zeros((1, 8), jnp.int32), mesh=mesh)
    checkpoint.save_params(str(tmp_path / "base"), config, base)
    config.init.checkpoint = str(tmp_path / "base")
    config.train.lora.update(rank=4, alpha=8.0)
    params = traverse_util.flatten_dict(jax.device_get(checkpoint.initial_params(config, mesh)))
    flat = traverse_util.flatten_dict(jax.device_get(base))
    assert set(params) - set(flat) == {k for k in params if k[-1] in lora.ADAPTERS} != set()
    for k, v in flat.items():
        np.testing.assert_array_equal(params[k], v)
    for k, v in params.items():
        if k[-1] == "lora_b":
            assert not v.any()
        if k[-1] == "lora_a":
            fan_in = int(np.prod(v.shape[:-1]))
            assert 0 < np.abs(v).max() <= 1 / np.sqrt(fan_in) and v.std() > 0.3 / np.sqrt(fan_in)


def lora_config(vqa, **train):
    config = small_config(vqa, **dict(dict(num_steps=4, checkpoint_every=2, learning_rate=1e-2,
                                           trainable="projector+conditioners"), **train))
    config.train.lora.update(rank=4, alpha=8.0, dropout=0.1)
    config.evals.exact_match = False
    return config


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow  # three training runs (~6 min on 2 shared cores)
def test_lora_run_freezes_the_base_saves_adapters_only_and_resumes(vqa, tmp_path):
    config = lora_config(vqa)
    straight, _ = training.train(config, str(tmp_path / "a"))
    training.train(lora_config(vqa), str(tmp_path / "b"), stop_at=2)
    resumed, _ = training.train(lora_config(vqa), str(tmp_path / "b"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    after = traverse_util.flatten_dict(jax.device_get(straight.params))
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(a, b)

    # The base is the seed's random init of the plain model, bit for bit; the adapters moved off it.
    mesh = sharding.make_mesh(config.mesh.to_dict())
    base = traverse_util.flatten_dict(jax.device_get(sharding.init_params(
        lavi_jax.LaVi(config.model), jax.random.key(config.train.seed), jnp.zeros((1, 8), jnp.int32), mesh=mesh)))
    patterns = training.run_patterns(config.train)
    trained = [k for k in after if training.is_trainable(k, patterns)]
    assert set(after) - set(base) == {k for k in after if k[-1] in lora.ADAPTERS}
    for k, v in base.items():
        if not training.is_trainable(k, patterns):
            np.testing.assert_array_equal(after[k], v, err_msg="/".join(k))
    assert any(k[0] == "llm" and k[-1] == "lora_b" and np.abs(after[k]).max() > 0 for k in trained)
    assert not any(k[0] == "vision" and k[-1] in lora.ADAPTERS for k in after)  # default targets: the LLM only
    # AdamW mu and nu for the trainable params only.
    opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(straight.opt_state) if x.ndim > 0)
    assert opt == 2 * sum(int(np.prod(after[k].shape)) for k in trained)

    # The checkpoint holds what trains, nothing of the frozen base.
    with checkpoint.manager(str(tmp_path / "a" / "checkpoints"), read_only=True) as mngr:
        saved = traverse_util.flatten_dict(checkpoint.metadata_tree(mngr.item_metadata(4)["params"]))
    assert set(saved) == set(trained)

    # lavi_jax.load merges the adapters: the plain model's logits equal the adapted model's.
    model, merged = lavi_jax.load(str(tmp_path / "a"))
    b = tiny_batch(config)
    inputs = (b["input_ids"], b["pixel_values"], b["item_mask"])
    wrapped = lora.wrap(lavi_jax.LaVi(config.model), checkpoint.lora_spec(config))
    want = np.asarray(wrapped.apply({"params": jax.device_get(straight.params)}, *inputs))
    got = np.asarray(model.apply({"params": jax.device_get(merged)}, *inputs))
    assert "lora_a" not in str(jax.tree_util.tree_structure(merged)) and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=1e-4)
    before = np.asarray(lavi_jax.LaVi(config.model).apply({"params": traverse_util.unflatten_dict(base)}, *inputs))
    assert np.abs(want - before).max() > 1e-3
