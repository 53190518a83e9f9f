"""Packed training through the real pipeline and the jitted train step: the 8-device mesh equals one device,
two processes equal one."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax import sharding, train as training
from lavi_jax.data import make_components, make_train_iterator
from lavi_jax.demo.synthetic import write_synthetic_vqa
from tests.small import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~70 s; packed sharded steps stay in the default run (8 devices), two processes in test_storage_train
def test_two_processes_train_packed_as_one_process_does(tmp_path):
    """Two processes on loopback, each packing its own shard, step on the same global batches as one process
    given both shards, with the same losses."""
    write_synthetic_vqa(str(tmp_path), num_train=48, num_eval=2, image_size=32)
    worker = os.path.join(ROOT, "tests", "packing_worker.py")
    env = lambda n: dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker, "2", str(i), str(port), str(tmp_path)], env=env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    multi = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    one = subprocess.run([sys.executable, worker, "1", "0", "0", str(tmp_path)], env=env(8), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    single = json.loads(one.stdout.strip().splitlines()[-1])
    assert [m["process"] for m in multi] == [0, 1] and all(m["processes"] == 2 for m in multi)
    assert single["processes"] == 1 and multi[0]["devices"] == single["devices"] == 8
    assert min(m["min_segments_per_row"] for m in multi) >= 2  # every row packs several conversations
    for step in range(3):  # the global batch is process 0's rows, then process 1's
        assert multi[0]["records"][step] + multi[1]["records"][step] == single["records"][step]
    shard0 = {r for step in multi[0]["records"] for row in step for r in row}
    shard1 = {r for step in multi[1]["records"] for row in step for r in row}
    assert shard0 and shard1 and not shard0 & shard1
    np.testing.assert_allclose(multi[0]["losses"], single["losses"], atol=1e-5)
    assert single["losses"][2] < single["losses"][0]
