"""QLoRA: int8 / int4 frozen base kernels under LoRA adapters (``config.train.lora.quantize``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax import checkpoint, lora, sharding, train as training
from tests.small import small_config
from tests.test_lora_train import losses, lora_config, tiny_batch, vqa  # noqa: F401  (vqa: a fixture)

QMAX = {"int8": 127, "int4": 7}


def numpy_quantize(w, qmax, axis, block=8):
    """Reference: symmetric absmax blocks of ``block`` rows along ``axis`` of ``w``, dequantized (plain numpy), and
    where the code is a tie (a block's largest magnitude lands on qmax + 0.5: either neighbour is right)."""
    d = w.shape[axis]
    block = min(block, d)
    blocks = w.reshape(w.shape[:axis] + (d // block, block) + w.shape[axis + 1:])
    s = np.abs(blocks).max(axis=axis + 1, keepdims=True) / (qmax + 0.5)
    s = np.where(s == 0, 1, s)
    q = np.clip(np.round(blocks / s), -qmax - 1, qmax)
    tie = np.abs(np.abs(blocks / s) - (qmax + 0.5)) < 1e-3
    return (q * s).reshape(w.shape), np.broadcast_to(tie, blocks.shape).reshape(w.shape), (s + 0 * blocks).reshape(w.shape)


def config_for(quantize, block=8):
    config = small_config({"train_json": "unused", "eval_json": "", "image_root": ""}, trainable="projector+conditioners",
                          learning_rate=3e-2, warmup_steps=1, num_steps=30)
    config.train.lora.update(rank=4, alpha=8.0, quantize=quantize, quant_block=block)
    config.mesh.update(data=1, fsdp=2, tensor=1)
    return config


def test_quantized_base_matches_a_numpy_quantizer_and_the_float_logits():
    """Every targeted kernel is int8 / int4 with block scales sharded like it; dequantized it equals an independent
    numpy absmax quantization of the float base; the logits' error grows as the rounding does (int8 << int4)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
    cfg_f = config_for("none")
    flt = traverse_util.flatten_dict(jax.device_get(checkpoint.initial_params(cfg_f, mesh)))
    b = tiny_batch(cfg_f, B=2)
    inputs = (b["input_ids"], b["pixel_values"], b["item_mask"])
    # Non-zero adapters, the same in every model, so the adapter path is part of the comparison.
    rng = np.random.default_rng(0)
    adapters = {k: (0.05 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in flt.items() if k[-1] in lora.ADAPTERS}
    flt.update(adapters)
    want = np.asarray(lora.wrap(lavi_jax.LaVi(cfg_f.model), checkpoint.lora_spec(cfg_f)).apply(
        {"params": traverse_util.unflatten_dict(flt)}, *inputs))
    errs = {}
    for name, qmax in QMAX.items():
        cfg = config_for(name)
        params = checkpoint.initial_params(cfg, mesh)
        specs = traverse_util.flatten_dict(jax.tree.map(lambda a: a.sharding.spec, params))
        q = traverse_util.flatten_dict(jax.device_get(params))
        kernels = [k for k in q if k[-1] == "kernel" and (k[:-1] + ("lora_a",)) in q]
        assert kernels and set(q) == set(flt) | {k[:-1] + (lora.SCALE,) for k in kernels}
        kerr = 0.0
        for k in kernels:
            assert q[k].dtype == lora.QTYPES[name], (k, q[k].dtype)
            assert specs[k[:-1] + (lora.SCALE,)][:1] == specs[k][:1]  # sharded on the kernel's mesh axes
            w = np.asarray(flt[k], np.float32)
            ref, tie, step = numpy_quantize(w, qmax, q[k[:-1] + ("lora_a",)].ndim - 2)  # blocks: last input axis
            got = np.asarray(lora.dequantize_kernel(q[k], q[k[:-1] + (lora.SCALE,)]), np.float32)
            np.testing.assert_allclose(got[~tie], ref[~tie], rtol=1e-5, atol=1e-7, err_msg="/".join(k))
            assert np.all(np.abs(got - ref)[tie] <= 1.001 * step[tie]) and tie.mean() < 0.2, k
            kerr = max(kerr, float(np.abs(got - w).max() / np.abs(w).max()))
        q.update(adapters)
        out = np.asarray(lora.wrap(lavi_jax.LaVi(cfg.model), checkpoint.lora_spec(cfg)).apply(
            {"params": traverse_util.unflatten_dict(q)}, *inputs))
        errs[name] = (float(np.abs(out - want).max()), kerr)
    (e8, k8), (e4, k4) = errs["int8"], errs["int4"]
    assert 0 < k8 <= 0.5 / 127 + 1e-6 and 0 < k4 <= 0.5 / 7 + 1e-6, errs
    assert 0 < e8 < e4 / 4, errs  # int4 rounds ~18x coarser than int8
    assert e4 < 20 * k4 * np.abs(want).max(), errs


def test_qlora_step_holds_int_base_without_optimizer_state_and_the_loss_falls():
    config = config_for("int4")
    program = training.jit_train_step(config, sharding.make_mesh(config.mesh.to_dict(), devices=jax.devices()[:2]))
    state = training.create_state(checkpoint.initial_params(config, program.mesh), program.tx, program.patterns,
                                  program.shardings)
    flat = traverse_util.flatten_dict(state.params)
    ints = {k for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.integer)}
    assert ints and all(flat[k].dtype == jnp.int4 for k in ints)
    assert not any(training.is_trainable(k, program.patterns) for k in ints)
    trained = sum(int(np.prod(v.shape)) for k, v in flat.items() if training.is_trainable(k, program.patterns))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * trained
    before = jax.device_get(flat)
    batch = {k: v for k, v in tiny_batch(config, B=4).items() if k in program.batch.shapes()}
    seen = []
    with sharding.use_mesh(program.mesh):
        for _ in range(12):
            state, m = program.fn(state, sharding.to_global(batch, program.mesh))
            seen.append(float(m["loss"]))
    assert seen[-1] < 0.9 * seen[0], seen
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    for k in ints | {k[:-1] + (lora.SCALE,) for k in ints}:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.slow  # two short training runs and a resume (~3 min on 2 shared cores)
def test_qlora_run_saves_adapters_only_resumes_and_merges_to_float(vqa, tmp_path):  # noqa: F811
    def cfg():
        c = lora_config(vqa)
        c.train.lora.update(quantize="int8", quant_block=8)
        return c

    straight, _ = training.train(cfg(), str(tmp_path / "a"))
    training.train(cfg(), str(tmp_path / "b"), stop_at=2)
    resumed, _ = training.train(cfg(), str(tmp_path / "b"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(a, b)
    with checkpoint.manager(str(tmp_path / "a" / "checkpoints"), read_only=True) as mngr:
        saved = traverse_util.flatten_dict(checkpoint.metadata_tree(mngr.item_metadata(4)["params"]))
    assert not any(k[-1] in ("kernel", lora.SCALE) and k[0] == "llm" and "conditioner" not in "/".join(k) for k in saved)
    model, merged = lavi_jax.load(str(tmp_path / "a"))
    flat = traverse_util.flatten_dict(jax.device_get(merged))
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in flat.values()) and lora.SCALE not in str(list(flat))
    b = tiny_batch(cfg())
    inputs = (b["input_ids"], b["pixel_values"], b["item_mask"])
    want = np.asarray(lora.wrap(lavi_jax.LaVi(cfg().model), checkpoint.lora_spec(cfg())).apply(
        {"params": jax.device_get(straight.params)}, *inputs))
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, *inputs)), want, atol=1e-4)


def test_trainable_over_a_quantized_kernel_fails_naming_it():
    config = config_for("int8")
    config.train.trainable = "projector+conditioners+llm"
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=jax.devices()[:2])
    params = jax.eval_shape(lambda: checkpoint.initial_params(config, mesh))
    with pytest.raises(ValueError, match=r"holds quantized \(e\.g\. llm/.*/kernel"):
        training.partition(params, training.run_patterns(config.train))
    config.train.trainable = "projector+conditioners"  # adapters only over the quantized kernels: accepted
    trainable, _ = training.partition(params, training.run_patterns(config.train))
    assert any(k[-1] == "lora_a" for k in traverse_util.flatten_dict(trainable))
