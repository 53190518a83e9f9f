"""``model.remat_policy``: every policy gives plain autodiff's loss and gradients; ``offload`` keeps the layer inputs
in host memory (the TPU compiler's own memory analysis of a train step)."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
from lavi_jax.train.step import loss_terms
from tests.small import perturb, small_config
from tests.test_lora_train import tiny_batch


def grads(config, batch):
    model = lavi_jax.LaVi(config.model)
    params = perturb(nn.unbox(model.init(jax.random.key(0), batch["input_ids"], batch["pixel_values"],
                                         batch["item_mask"])["params"]))
    f = lambda p: loss_terms(model, p, batch)[0]
    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_every_remat_policy_gives_the_gradients_of_plain_autodiff(scan):
    config = small_config({"train_json": "unused", "eval_json": "", "image_root": ""})
    config.model.scan_layers = scan
    batch = {k: jnp.asarray(v) for k, v in tiny_batch(config, B=2, T=16).items() if k not in ("positions", "segment_ids")}
    config.model.remat_policy = "none"
    want, g_want = grads(config, batch)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_want))
    for policy in ("full", "offload") + (() if scan else ("dots",)):  # dots: unscanned only (slow), ~15 s
        config.model.remat_policy = policy
        got, g_got = grads(config, batch)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=policy)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")


def test_offload_moves_the_layer_inputs_to_host_memory_on_a_v5e_slice():
    """Compiled by libtpu for 4 abstract v5e chips: with ``offload`` the host holds at least one [B, T, D]
    activation per scanned layer (at 7B this takes 3.1 GiB off each chip at batch 32: BENCHMARKS.md)."""
    from lavi_jax.train import topology

    dr = sys.modules["lavi_jax.train.dry_run"]  # the package exports a function of the same name
    config = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    config.model.update(scan_layers=True, dtype="bfloat16", remat_policy="offload")
    config.model.llm.update(num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    config.mesh.update(data=1, fsdp=4, tensor=1)
    config.train.update(batch_size=8, trainable="projector+conditioners+llm")
    config.data.seq_buckets = (256,)
    mesh = topology.make_mesh(config.mesh.to_dict(), "v5e:2x2")
    b = dr.train_program(config, mesh, topology.chip_of(mesh), flops=False)["bytes_per_device"]
    layer_input = 2 * 256 * 256 * 2  # 2 local rows x 256 tokens x 256 wide, bfloat16
    assert b["host_temp"] >= 8 * layer_input
