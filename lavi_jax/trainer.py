"""The training loop: mesh, sharded state, resume, data, steps, checkpoints, metrics, evals.

One code path from a laptop CPU to a TPU pod: every process runs :func:`train`
with the same config; each feeds its own data shard, which becomes one global
batch sharded over the mesh's ``data`` and ``fsdp`` axes.

Resume order: the latest checkpoint in ``<workdir>/checkpoints``, else
``config.init.checkpoint`` (params only), else an HF import
(``config.init.hf_llm`` / ``hf_vision``), else random initialisation.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lavi_jax import checkpoint, sharding, train_lib
from lavi_jax.metrics import MetricWriter
from lavi_jax.models.lavi import LaVi

BATCH_KEYS = {"input_ids": 2, "attention_mask": 2, "loss_mask": 2, "pixel_values": 6, "item_mask": 3}


class NonFiniteError(RuntimeError):
    pass


def batch_keys(model_config) -> dict[str, int]:
    keys = dict(BATCH_KEYS)
    if model_config.fusion == "none":
        keys.pop("pixel_values"), keys.pop("item_mask")
    return keys


def to_global(batch: dict[str, np.ndarray], mesh, keys: dict[str, int]) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, nd), np.asarray(batch[k]))
            for k, nd in keys.items()}


def check_batch_size(c, mesh) -> int:
    """Per-process batch size, after checking the global batch splits over processes, mesh and micro-batches."""
    n_proc = jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.batch_size % n_proc or c.batch_size % shards or c.batch_size % c.grad_accum:
        raise ValueError(f"train.batch_size={c.batch_size} must divide by processes ({n_proc}), data*fsdp ({shards}) "
                         f"and train.grad_accum ({c.grad_accum})")
    if (c.batch_size // c.grad_accum) % shards:
        raise ValueError(f"micro-batch {c.batch_size // c.grad_accum} must divide by data*fsdp ({shards})")
    return c.batch_size // n_proc


def data_components(config):
    from lavi_jax.data import make_image_processor, make_tokenizer

    tokenizer = make_tokenizer(config.data.tokenizer)
    m = config.model
    if tokenizer.vocab_size > m.llm.vocab_size:
        raise ValueError(f"tokenizer vocab ({tokenizer.vocab_size}) exceeds model.llm.vocab_size ({m.llm.vocab_size})")
    if m.fusion != "none" and tokenizer.image_token_id != m.image_token_id:
        raise ValueError(f"tokenizer image token id {tokenizer.image_token_id} != model.image_token_id {m.image_token_id}")
    if m.fusion != "none" and config.data.image_size != m.vision.image_size:
        raise ValueError(f"data.image_size={config.data.image_size} != model.vision.image_size={m.vision.image_size}")
    return tokenizer, make_image_processor(config.data.processor, config.data.image_size)


def initial_params(config, model, mesh, example_ids):
    init = config.init
    if init.checkpoint:
        return checkpoint.restore_params(init.checkpoint, config.model, mesh)
    if init.hf_llm:
        from conversions.import_hf import import_hf

        cfg, params = import_hf(init.hf_llm, init.hf_vision or None, config.model, mesh=mesh, seed=config.train.seed)
        if cfg.llm.to_dict() != config.model.llm.to_dict():
            raise ValueError(f"config.model.llm does not match {init.hf_llm}: build the config with conversions.import_hf")
        return params
    return sharding.init_params(model, jax.random.key(config.train.seed), example_ids, mesh=mesh)


def dry_run(step_fn, abstract_state, shardings, mesh, config, keys) -> dict:
    """Compiles the train step on abstract inputs; prints per-device memory and FLOPs per step."""
    c, d = config.train, config.data
    T = max(d.seq_buckets)
    s = config.model.vision.image_size
    shapes = {"input_ids": ((c.batch_size, T), jnp.int32), "attention_mask": ((c.batch_size, T), jnp.int32),
              "loss_mask": ((c.batch_size, T), jnp.float32),
              "pixel_values": ((c.batch_size, d.max_images, d.num_frames, s, s, 3), jnp.float32),
              "item_mask": ((c.batch_size, d.max_images, d.num_frames), jnp.bool_)}
    batch = {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=sharding.batch_sharding(mesh, nd)) for k, nd in keys.items()}
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, shardings)
    t0 = time.time()
    with sharding.use_mesh(mesh):
        compiled = step_fn.lower(state, batch).compile()
    per_device = lambda tree: sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report = {
        "devices": int(mesh.size), "mesh": dict(mesh.shape), "global_batch": c.batch_size, "seq_len": T,
        "params_bytes_per_device": per_device(state.params),
        "opt_state_bytes_per_device": per_device(state.opt_state),
        "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", 0)),
        "argument_bytes_per_device": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes_per_device": int(getattr(mem, "output_size_in_bytes", 0)),
        # XLA counts a loop body once; the micro-batch scan runs it grad_accum times (the update outside
        # the loop is then over-counted, by far less than a micro-batch's forward and backward).
        "flops_per_step_per_device": float(cost.get("flops", 0.0)) * int(c.get("grad_accum", 1)),
        "compile_seconds": round(time.time() - t0, 1),
    }
    report["flops_per_step"] = report["flops_per_step_per_device"] * mesh.size
    if jax.process_index() == 0:
        gib = lambda b: f"{b / 2**30:8.3f} GiB"
        print(f"dry run: mesh {report['mesh']}, {report['devices']} devices, global batch {c.batch_size} x {T} tokens")
        for k in ("params_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes_per_device",
                  "argument_bytes_per_device", "output_bytes_per_device"):
            print(f"  {k.replace('_bytes_per_device', ''):<12} {gib(report[k])} per device")
        print(f"  flops/step   {report['flops_per_step']:.3e} ({report['flops_per_step_per_device']:.3e} per device)"
              + ("  [scan_layers: XLA counts the scanned layer stack once; use scan_layers=False for the total]"
                 if config.model.scan_layers else ""))
        print(f"  compiled in {report['compile_seconds']} s")
    return report


def exact_match_scorer(model):
    """``correct(params, batch) -> [B] bool``, jitted: every target token is the argmax."""

    @jax.jit
    def correct(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"), batch.get("item_mask"),
                             attention_mask=batch["attention_mask"])
        hit = jnp.argmax(logits[:, :-1], -1) == batch["input_ids"][:, 1:]
        need = batch["loss_mask"][:, 1:] > 0
        return jnp.all(hit | ~need, axis=1) & jnp.any(need, axis=1)

    return correct


def evaluate_answers(config, model, params, mesh, tokenizer, processor, keys, records=None, scorer=None) -> dict:
    """Held-out exact match: every assistant token (answer and end-of-turn) is the model's argmax.

    Teacher-forced, so it equals exact match under greedy decoding with the
    end-of-turn token as stop, at the cost of one forward per batch. Pass the
    same ``scorer`` (:func:`exact_match_scorer`) to repeated calls to compile once.
    """
    from lavi_jax.data import make_eval_iterator

    bs = config.evals.batch_size or config.train.batch_size
    it = make_eval_iterator(config.data, tokenizer, processor, batch_size=max(bs // jax.process_count(), 1))
    correct = scorer or exact_match_scorer(model)
    indices, oks = [], []
    with sharding.use_mesh(mesh):
        for batch in it:
            ok = correct(params, to_global(batch, mesh, keys))
            oks.append(multihost_utils.process_allgather(ok, tiled=True))
            idx = np.where(batch["valid"], batch["index"], -1)
            indices.append(multihost_utils.process_allgather(idx, tiled=True))
    idx, ok = np.concatenate(indices), np.concatenate(oks)
    keep = idx >= 0
    idx, ok = idx[keep], ok[keep]
    out = {"exact_match": float(ok.mean()) if len(ok) else 0.0, "eval_examples": int(len(ok)),
           "eval_bad_records": int(it.bad_records.count)}
    if records is not None:
        kinds = [records[i].get("question_type") for i in idx]
        for kind in sorted({k for k in kinds if k}):
            sel = np.array([k == kind for k in kinds])
            out[f"exact_match/{kind}"] = float(ok[sel].mean())
    return out


def train(config, workdir: str, stop_at: int | None = None) -> dict:
    """Runs (or resumes) training in ``workdir``. Returns the final metrics (and eval scores).

    ``stop_at`` ends this invocation after that step (with a checkpoint), as a
    preemption would; calling again resumes.
    """
    from lavi_jax.data import load_records, make_train_iterator

    mesh = sharding.make_mesh(config.mesh.to_dict())
    model = LaVi(config.model)
    c = config.train
    patterns = train_lib.trainable_patterns(c.trainable)
    tx = train_lib.make_optimizer(c)
    example_ids = jnp.zeros((1, 8), jnp.int32)
    abstract, shardings = train_lib.state_shardings(model, tx, patterns, mesh, example_ids)
    keys = batch_keys(config.model)
    local_bs = check_batch_size(c, mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh, nd) for k, nd in keys.items()}
    step_fn = jax.jit(train_lib.make_train_step(model, tx, c), in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    if config.dry_run:
        return dry_run(step_fn, abstract, shardings, mesh, config, keys)

    tokenizer, processor = data_components(config)
    train_iter = make_train_iterator(config.data, tokenizer, processor, batch_size=local_bs, seed=c.seed)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints, with_data=True)
    import grain

    latest = ckpt.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
        checkpoint.check_tree(target.params, checkpoint._metadata_tree(ckpt.item_metadata(latest)["params"]),
                              f"{workdir}/checkpoints step {latest}")
        rest = {"opt_state": target.opt_state, "step": target.step, "nonfinite": target.nonfinite}
        got = ckpt.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params), train_state=ocp.args.StandardRestore(rest),
            data=grain.checkpoint.CheckpointRestore(train_iter)))
        ts = got["train_state"]
        state = train_lib.TrainState(step=ts["step"], params=got["params"], opt_state=ts["opt_state"], nonfinite=ts["nonfinite"])
        if jax.process_index() == 0:
            print(f"resumed from {workdir}/checkpoints step {latest}")
    else:
        state = train_lib.create_state(initial_params(config, model, mesh, example_ids), tx, patterns, shardings)
    start = int(jax.device_get(state.step))

    writer = MetricWriter(workdir, c.num_steps, start)
    records = load_records(config.data.eval_json) if config.data.eval_json else None
    last_log, tokens, pending, final = time.time(), 0.0, None, {}
    cfg_json = checkpoint.config_to_json(config)
    # Benchmark evals by generation (config.evals.tasks; None without tasks), see lavi_jax/evaluation.py.
    from lavi_jax import evaluation

    benchmarks = evaluation.training_evals(config, model, mesh, tokenizer, processor, workdir)
    scorer = exact_match_scorer(model)

    def save(step):
        ckpt.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "nonfinite": state.nonfinite}),
            config=ocp.args.JsonSave(cfg_json), data=grain.checkpoint.CheckpointSave(train_iter)))

    with sharding.use_mesh(mesh):
        end = c.num_steps if stop_at is None else min(stop_at, c.num_steps)
        for step in range(start, end):
            local = next(train_iter)
            tokens += float(local["attention_mask"].sum()) * jax.process_count()
            state, metrics = step_fn(state, to_global(local, mesh, keys))
            if pending is not None:  # read the previous step's flag now, keeping one step in flight
                _check_finite(pending, c.max_nonfinite, writer)
            pending = (step + 1, metrics["finite"], metrics["nonfinite"])  # state buffers are donated
            writer.advance()
            done = step + 1
            if done % c.log_every == 0 or done == c.num_steps:
                m = jax.device_get(metrics)
                now = time.time()
                final = {"loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                         "grad_norm": float(m["grad_norm"]), "tokens_per_second": tokens / max(now - last_log, 1e-9),
                         "bad_records": int(train_iter.bad_records.count)}
                writer.write(done, final)
                last_log, tokens = now, 0.0
            if done % c.checkpoint_every == 0 or done == end:
                save(done)
            if config.evals.every and done % config.evals.every == 0 and done != c.num_steps and config.data.eval_json:
                writer.write(done, evaluate_answers(config, model, state.params, mesh, tokenizer, processor, keys, records, scorer))
            if benchmarks and config.evals.every and done % config.evals.every == 0 and done != c.num_steps:
                writer.write(done, benchmarks(state.params, done))
        if pending is not None:
            _check_finite(pending, c.max_nonfinite, writer)
    ckpt.wait_until_finished()
    if config.data.eval_json and config.evals.exact_match and end == c.num_steps:
        scores = evaluate_answers(config, model, state.params, mesh, tokenizer, processor, keys, records, scorer)
        writer.write(c.num_steps, scores)
        final.update(scores)
    if benchmarks and end == c.num_steps:
        scores = benchmarks(state.params, c.num_steps)
        writer.write(c.num_steps, scores)
        final.update(scores)
    writer.close()
    ckpt.close()
    if train_iter.bad_records.count and jax.process_index() == 0:
        for r in train_iter.bad_records.reports[:20]:
            print(f"skipped record {r.id!r}: {r.reason}")
    final["state"] = state
    return final


def _check_finite(pending, max_nonfinite: int, writer: MetricWriter) -> None:
    step, finite, count = pending
    if bool(jax.device_get(finite)):
        return
    n = int(jax.device_get(count))
    writer.write(step, {"nonfinite_step": 1, "nonfinite_consecutive": n})
    if jax.process_index() == 0:
        print(f"step {step}: non-finite loss or gradient, update skipped ({n} in a row)")
    if n >= max_nonfinite:
        raise NonFiniteError(f"step {step}: {n} consecutive non-finite steps (train.max_nonfinite={max_nonfinite})")
