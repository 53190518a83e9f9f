"""Packed training through the real pipeline and the jitted train step: the 8-device mesh equals one device."""

import jax
import jax.numpy as jnp
import numpy as np

import lavi_jax
from lavi_jax import sharding, train as training
from lavi_jax.data import make_components, make_train_iterator
from lavi_jax.demo.synthetic import write_synthetic_vqa
from tests.small import small_config


def run(config, batch, mesh):
    program = training.jit_train_step(config, mesh)
    model, ids0 = lavi_jax.LaVi(config.model), jnp.zeros((1, 8), jnp.int32)
    params = sharding.init_params(model, jax.random.key(0), ids0, mesh=mesh)
    state = training.create_state(params, program.tx, program.patterns, program.shardings)
    losses = []
    with sharding.use_mesh(mesh):
        for _ in range(3):  # the first update runs at learning rate 0 (warmup)
            state, m = program.fn(state, sharding.to_global({k: batch[k] for k in program.batch.shapes()}, mesh))
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def test_packed_step_on_eight_devices_equals_one(tmp_path):
    vqa = write_synthetic_vqa(str(tmp_path), num_train=24, num_eval=2, image_size=32)
    config = small_config(vqa, batch_size=8, trainable="all", learning_rate=1e-3, warmup_steps=1)
    config.data.update(packing=True, max_images=4, seq_buckets=(128,))
    tokenizer, processor = make_components(config)
    batch = next(make_train_iterator(config.data, tokenizer, processor, batch_size=8, seed=0))
    assert (batch["segment_ids"].max(axis=1) >= 2).all()  # every row holds several conversations
    one_losses, one = run(config, batch, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    eight_losses, eight = run(config, batch, sharding.make_mesh(config.mesh.to_dict()))
    assert sharding.make_mesh(config.mesh.to_dict()).size == 8
    np.testing.assert_allclose(eight_losses, one_losses, atol=1e-5)
    assert one_losses[2] < one_losses[0]
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, atol=1e-5)
