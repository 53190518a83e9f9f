"""The training loop: mesh, sharded state, resume, data, steps, checkpoints, metrics, evals.

One code path from a laptop CPU to a TPU pod: every process runs :func:`train`
with the same config; each feeds its own data shard, which becomes one global
batch sharded over the mesh's ``data`` and ``fsdp`` axes.

Resume order: the latest checkpoint in ``<workdir>/checkpoints``, else
``config.init.checkpoint`` (params only), else an HF import
(``config.init.hf_llm`` / ``hf_vision``), else random initialisation.

With ``config.train.lora`` the model trains adapters on a frozen base; checkpoints
hold only what trains, and a resume restores them over the base ``config.init``
describes (:mod:`lavi_jax.checkpoint`). Evaluation during training runs the plain
model on the params with the adapters merged.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lavi_jax import checkpoint, eval as evaluation, lora, sharding, storage
from lavi_jax.data import make_components, make_train_iterator, pad_batch
from lavi_jax.hf import import_hf
from lavi_jax.train.metric_writer import MetricWriter
from lavi_jax.train.optimizer import merge, partition
from lavi_jax.train.state import TrainState, create_state
from lavi_jax.train.step import jit_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def initial_params(config, model, mesh, example_ids):
    """Params of a run without a checkpoint in its workdir: ``config.init``'s checkpoint or HF import, else random."""
    if checkpoint.lora_spec(config) is not None:  # base + adapters (unmerged), see lavi_jax.checkpoint
        return checkpoint.initial_params(config, mesh)
    init = config.init
    if init.checkpoint:
        return checkpoint.restore_params(init.checkpoint, config.model, mesh)
    if init.hf_llm:
        cfg, params = import_hf(init.hf_llm, init.hf_vision or None, config.model, mesh=mesh, seed=config.train.seed)
        if cfg.llm.to_dict() != config.model.llm.to_dict():
            raise ValueError(f"config.model.llm does not match {init.hf_llm}: build the config with conversions.import_hf")
        return params
    return sharding.init_params(model, jax.random.key(config.train.seed), example_ids, mesh=mesh)


def check_data(config) -> None:
    """Fails before any work when the run has no training data."""
    if not config.data.train_json:
        raise ValueError("config.data.train_json is empty: pass --config.data.train_json=FILE (LLaVA .json/.jsonl) "
                         "and --config.data.image_root=DIR; the synthetic demo runs with `python demo.py`")


def global_bucket(local: dict, pad_id: int) -> dict:
    """This process's batch padded to the longest bucket among every process's batch of this step: the global
    batch's own bucket, as one process holding all rows picks it (one small all-gather per step). Packed rows
    (``segment_ids``) and single-process batches are returned as they are."""
    if jax.process_count() == 1 or "segment_ids" in local:
        return local
    lengths = multihost_utils.process_allgather(np.asarray(local["input_ids"].shape[1], np.int32))
    return pad_batch(local, int(np.max(lengths)), pad_id)


def train(config, workdir: str, stop_at: int | None = None) -> tuple[TrainState, dict]:
    """Runs (or resumes) training in ``workdir``. -> ``(state, metrics)``: the final train state and the last
    logged metrics with the end-of-run eval scores.

    ``stop_at`` ends this invocation after that step (with a checkpoint), as a
    preemption would; calling again resumes.
    """
    c = config.train
    check_data(config)
    storage.check_writable(workdir)  # before any compile: a missing bucket or no credentials stop here
    program = jit_train_step(config)
    mesh, model, step_fn, shapes = program.mesh, program.model, program.fn, program.batch.shapes()
    local_bs = program.batch.batch_size
    example_ids = jnp.zeros((1, 8), jnp.int32)

    tokenizer, processor = make_components(config)
    # Unpacked batches take their own bucket; with several processes the bucket is agreed per step (global_bucket).
    train_iter = make_train_iterator(config.data, tokenizer, processor, batch_size=local_bs, seed=c.seed,
                                     pad_to_max_bucket=False)
    ckpt = checkpoint.manager(storage.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints)
    spec = checkpoint.lora_spec(config)
    saved_patterns = program.patterns if spec is not None else None  # LoRA: only what trains is saved
    state = _resume(ckpt, program.abstract, program.shardings, train_iter, workdir, saved_patterns,
                    lambda: initial_params(config, model, mesh, example_ids))
    if state is None:
        state = create_state(initial_params(config, model, mesh, example_ids), program.tx, program.patterns, program.shardings)
    start = int(jax.device_get(state.step))

    writer = MetricWriter(workdir, c.num_steps, start)
    cfg_json = checkpoint.config_to_json(config)
    # Evaluation sees the plain model; a LoRA run's adapters are merged into a copy of the params first.
    eval_model = lora.unwrap(model)
    merged = (lambda p: p) if spec is None else jax.jit(lambda p: lora.merge(p, spec))
    evals = evaluation.training_evals(config, eval_model, mesh, tokenizer, processor, workdir)
    benchmarks = None if evals is None else (lambda params, step: evals(merged(params), step))
    scorer = evaluation.exact_match_scorer(eval_model)

    def exact_match(params) -> dict:
        return evaluation.evaluate_exact_match(config, eval_model, merged(params), mesh, tokenizer, processor,
                                               scorer=scorer)[0]

    def save(step):
        writer.flush()  # metrics up to this step are in the workdir before the step is
        params = state.params if spec is None else partition(state.params, program.patterns)[0]
        checkpoint.save_train_state(ckpt, step, params=params, config=cfg_json, data_iterator=train_iter,
                                    train_state={"opt_state": state.opt_state, "step": state.step,
                                                 "nonfinite": state.nonfinite})

    last_log, tokens, pending, final = time.time(), 0.0, None, {}
    end = c.num_steps if stop_at is None else min(stop_at, c.num_steps)
    try:
        with sharding.use_mesh(mesh):
            for step in range(start, end):
                local = global_bucket(next(train_iter), tokenizer.pad_id)
                tokens += float(local["attention_mask"].sum()) * jax.process_count()
                state, metrics = step_fn(state, sharding.to_global({k: local[k] for k in shapes}, mesh))
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
                if config.evals.every and done % config.evals.every == 0 and done != c.num_steps:
                    if config.data.eval_json:
                        writer.write(done, exact_match(state.params))
                    if benchmarks:
                        writer.write(done, benchmarks(state.params, done))
            if pending is not None:
                _check_finite(pending, c.max_nonfinite, writer)
    finally:
        writer.flush()  # what was logged reaches the workdir even when the run stops with an error
    ckpt.wait_until_finished()
    if end == c.num_steps:
        if config.data.eval_json and config.evals.exact_match:
            scores = exact_match(state.params)
            writer.write(c.num_steps, scores)
            final.update(scores)
        if benchmarks:
            scores = benchmarks(state.params, c.num_steps)
            writer.write(c.num_steps, scores)
            final.update(scores)
    writer.close()
    ckpt.close()
    if train_iter.bad_records.count and jax.process_index() == 0:
        for r in train_iter.bad_records.reports[:20]:
            print(f"skipped record {r.id!r}: {r.reason}")
    return state, final


def _resume(ckpt, abstract: TrainState, shardings: TrainState, train_iter, workdir: str, saved_patterns=None,
            base=None) -> TrainState | None:
    """The state of the latest checkpoint in the workdir (data iterator moved to its position), or None.
    ``saved_patterns``: the checkpoints hold only the params these select, restored over ``base()``."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    saved = target.params if saved_patterns is None else partition(target.params, saved_patterns)[0]
    params, ts = checkpoint.restore_train_state(
        ckpt, latest, params=saved, data_iterator=train_iter,
        train_state={"opt_state": target.opt_state, "step": target.step, "nonfinite": target.nonfinite})
    if saved_patterns is not None:
        params = merge(params, partition(base(), saved_patterns)[1])
    if jax.process_index() == 0:
        print(f"resumed from {workdir}/checkpoints step {latest}")
    return TrainState(step=ts["step"], params=params, opt_state=ts["opt_state"], nonfinite=ts["nonfinite"])


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
