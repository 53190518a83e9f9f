"""Runs a few train steps on a fixed global batch; process 0 prints the losses as JSON.

    python tests/distributed_worker.py NUM_PROCESSES PROCESS_ID PORT

Used by test_train.py to compare N processes x M devices with 1 x N*M.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavi_jax import distributed, sharding, train as training  # noqa: E402


def main(num_processes: int, process_id: int, port: int) -> None:
    if num_processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import lavi_jax

    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    cfg.train.update(trainable="all", learning_rate=1e-2, warmup_steps=1, num_steps=3)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = lavi_jax.LaVi(cfg.model)
    tx = training.make_optimizer(cfg.train)
    patterns = training.trainable_patterns(cfg.train.trainable)
    ids0 = jnp.zeros((1, 8), jnp.int32)
    _, shardings = training.state_shardings(model, tx, patterns, mesh, ids0)
    state = training.create_state(sharding.init_params(model, jax.random.key(0), ids0, mesh=mesh), tx, patterns, shardings)
    keys = {"input_ids": 2, "attention_mask": 2, "loss_mask": 2, "pixel_values": 6, "item_mask": 3}
    step = jax.jit(training.make_train_step(model, tx, cfg.train), in_shardings=(shardings, None),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    rng = np.random.default_rng(0)
    B, T, s = 8, 16, cfg.model.vision.image_size
    losses = []
    for _ in range(3):
        ids = rng.integers(0, 500, (B, T)).astype(np.int32)
        ids[:, 2] = cfg.model.image_token_id
        full = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32),
                "pixel_values": rng.normal(size=(B, 1, 1, s, s, 3)).astype(np.float32), "item_mask": np.ones((B, 1, 1), bool)}
        batch = {}
        for k, nd in keys.items():
            sh = sharding.batch_sharding(mesh, nd)
            rows = sorted({idx[0].start or 0 for idx in sh.addressable_devices_indices_map(full[k].shape).values()})
            per = B // (mesh.shape["data"] * mesh.shape["fsdp"])
            local = np.concatenate([full[k][r:r + per] for r in rows])
            batch[k] = jax.make_array_from_process_local_data(sh, local)
        with sharding.use_mesh(mesh):
            state, metrics = step(state, batch)
        losses.append(float(jax.device_get(metrics["loss"])))
    # Per-step buckets: process i holds rows of 16 + 8 i tokens; both pad to the longest (the global batch's bucket).
    from lavi_jax.data import Collator
    from lavi_jax.train.loop import global_bucket

    collate = Collator(seq_buckets=(16, 24, 32), max_images=1, num_frames=1, image_size=(s, s), pad_id=7)
    example = {"input_ids": np.arange(16 + 8 * jax.process_index(), dtype=np.int32), "item_mask": np.zeros((0, 0), bool)}
    example["loss_mask"] = np.ones_like(example["input_ids"], np.float32)
    agreed = global_bucket(collate([example, example]), 7)
    bucket = {"seq_len": agreed["input_ids"].shape[1], "pad_tail": int(agreed["input_ids"][0, -1]),
              "mask_tail": int(agreed["attention_mask"][0, -1])}
    if jax.process_index() == 0:
        print(json.dumps({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count(),
                          "bucket": bucket}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
