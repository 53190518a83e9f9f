"""Packed training on a 2 x 2 x 2 mesh: real pipeline, real train step; prints losses and records as JSON.

    python tests/packing_worker.py NUM_PROCESSES PROCESS_ID PORT DATA_DIR

With 2 processes each packs its own shard (``make_train_iterator`` defaults to
``jax.process_index()``); with 1, the same two shards are built explicitly and
concatenated in process order, which is the global batch of the 2-process run.
Each process prints its own rows' record indices per step; process 0 also the losses.
Used by test_packing_train.py.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavi_jax import distributed, sharding, train as training  # noqa: E402


def main(num_processes: int, process_id: int, port: int, data_dir: str) -> None:
    if num_processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import lavi_jax
    from lavi_jax.data import make_components, make_train_iterator
    from tests.small import small_config

    vqa = {"train_json": os.path.join(data_dir, "train.json"), "eval_json": os.path.join(data_dir, "eval.json"),
           "image_root": data_dir}
    config = small_config(vqa, batch_size=8, trainable="all", learning_rate=1e-3, warmup_steps=1)
    config.data.update(packing=True, max_images=4, seq_buckets=(128,))
    program = training.jit_train_step(config)
    tokenizer, processor = make_components(config)
    shards = range(2) if num_processes == 1 else [None]  # None: this process's own shard
    iterators = [make_train_iterator(config.data, tokenizer, processor, batch_size=4, seed=0,
                                     process_index=p, process_count=None if p is None else 2) for p in shards]
    model = lavi_jax.LaVi(config.model)
    params = sharding.init_params(model, jax.random.key(0), np.zeros((1, 8), np.int32), mesh=program.mesh)
    state = training.create_state(params, program.tx, program.patterns, program.shardings)
    losses, records, segments = [], [], []
    with sharding.use_mesh(program.mesh):
        for _ in range(3):
            parts = [next(it) for it in iterators]
            local = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            state, metrics = program.fn(state, sharding.to_global({k: local[k] for k in program.batch.shapes()},
                                                                  program.mesh))
            losses.append(float(jax.device_get(metrics["loss"])))
            records.append([sorted(set(row[row >= 0].tolist())) for row in local["record_index"]])
            segments.append(int(local["segment_ids"].max(axis=1).min()))
    print(json.dumps({"losses": losses if jax.process_index() == 0 else None, "records": records,
                      "min_segments_per_row": min(segments), "process": jax.process_index(),
                      "processes": jax.process_count(), "devices": jax.device_count()}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
