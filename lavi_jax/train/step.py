"""The loss and the train step (gradient accumulation, non-finite guard).

* Loss: next-token cross entropy on assistant tokens (``loss_mask`` aligned to
  target positions, see :mod:`lavi_jax.data.batch`), averaged over the global
  batch's target tokens (a token mean, not a mean of per-sample means), so
  packed and unpacked batches of the same samples give the same loss and
  gradients; gradients are accumulated over ``config.train.grad_accum``
  micro-batches. Packed rows carry ``segment_ids`` and ``positions``, passed to
  the model; their ``loss_mask`` is 0 at each segment's first token, so no
  target is predicted across a segment boundary.
* A step whose loss or gradient norm is not finite leaves params and optimizer
  state untouched and increments ``nonfinite`` (reset by the next finite step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lavi_jax import lora, sharding
from lavi_jax.data.batch import BatchSpec
from lavi_jax.models.lavi import LaVi
from lavi_jax.train.optimizer import learning_rate_schedule, make_optimizer, merge, partition, run_patterns
from lavi_jax.train.state import TrainState, state_shardings


def loss_terms(model: nn.Module, params: Any, batch: dict, rngs: dict | None = None,
               chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) for a batch (packed when it has ``segment_ids``);
    ``rngs``: e.g. ``{"dropout": key}`` for LoRA dropout. ``chunk`` > 0 runs the LM head and the cross-entropy
    over ``chunk`` positions at a time under ``jax.checkpoint``, so only one chunk's float32 logits
    [B, chunk, vocab] are live, forward and backward (at 7B: 152k-entry vocabulary)."""
    out = model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"), batch.get("item_mask"),
                      attention_mask=batch["attention_mask"], position_ids=batch.get("positions"),
                      segment_ids=batch.get("segment_ids"), image_sizes=batch.get("image_sizes"),
                      logits=not chunk, method=LaVi.forward, **({"rngs": rngs} if rngs else {}))
    targets = batch["input_ids"][:, 1:]
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if not chunk:
        logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
        return jnp.sum(nll * w), jnp.sum(w)
    B, T = targets.shape
    n = -(-T // chunk)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - T)) + ((0, 0),) * (x.ndim - 2))
    blocks = lambda x: jnp.swapaxes(pad(x).reshape((B, n, chunk) + x.shape[2:]), 0, 1)  # [n, B, chunk, ...]

    @jax.checkpoint
    def nll_sum(h, t, wt, i):
        kw = {"rngs": {k: jax.random.fold_in(r, i) for k, r in rngs.items()}} if rngs else {}
        logits = model.apply({"params": params}, h, method=LaVi.head, **kw)  # [B, chunk, vocab] float32
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[:, :, None], axis=-1)[..., 0]
        return jnp.sum(nll * wt)

    total, _ = jax.lax.scan(lambda acc, xs: (acc + nll_sum(*xs), None), jnp.zeros((), jnp.float32),
                            (blocks(out.hidden[:, :-1]), blocks(targets), blocks(w), jnp.arange(n)))
    return total, jnp.sum(w)


def schedule_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The step count the optimizer's learning-rate schedule used this step (optax's, which a skipped non-finite
    step reverts with the rest of the optimizer state; ``state.step`` counts those steps too); ``default`` when the
    optimizer has no schedule."""
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
             if isinstance(s, optax.ScaleByScheduleState)]
    return found[0] if found else default


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, c: ml_collections.ConfigDict):
    """``step(state, batch) -> (state, metrics)``, to be jitted with shardings."""
    patterns = run_patterns(c)
    schedule = learning_rate_schedule(c)
    k = int(c.grad_accum)
    spec = lora.spec_from_config(c.get("lora"))
    dropout = spec is not None and spec.dropout > 0
    chunk = int(c.get("loss_chunk", 0))

    def step(state: TrainState, batch: dict):
        trainable, frozen = partition(state.params, patterns)
        # Micro-batch j is rows j::k (a strided split): with the batch sharded in contiguous blocks over the batch
        # axes, every device's rows of each micro-batch are rows it already holds, so splitting moves no data.
        split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)  # [k, B // k, ...]
        micro = jax.tree.map(lambda x: sharding.constrain(split(x), (None, "batch") + (None,) * (x.ndim - 1)), batch)

        step_key = jax.random.fold_in(jax.random.key(c.seed), state.step)

        def accumulate(carry, xs):
            mb, j = xs
            g_sum, num_sum, den_sum = carry
            rngs = {"dropout": jax.random.fold_in(step_key, j)} if dropout else None
            (num, den), g = jax.value_and_grad(lambda t: loss_terms(model, merge(t, frozen), mb, rngs, chunk), has_aux=True)(trainable)
            return (jax.tree.map(jnp.add, g_sum, g), num_sum + num, den_sum + den), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (g_sum, num, den), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(k)))
        den = jnp.maximum(den, 1.0)
        grads = jax.tree.map(lambda g: g / den, g_sum)
        loss = num / den
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=merge(keep(new_trainable, trainable), frozen),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(schedule_count(state.opt_state, state.step)),
                   "tokens": den, "finite": finite, "nonfinite": new_state.nonfinite}
        return new_state, metrics

    return step


def local_batch_size(c: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """Per-process batch size, after checking the global batch splits over processes, mesh and micro-batches."""
    n_proc = jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.batch_size % n_proc or c.batch_size % shards or c.batch_size % c.grad_accum:
        raise ValueError(f"train.batch_size={c.batch_size} must divide by processes ({n_proc}), data*fsdp ({shards}) "
                         f"and train.grad_accum ({c.grad_accum})")
    if (c.batch_size // c.grad_accum) % shards:
        raise ValueError(f"micro-batch {c.batch_size // c.grad_accum} must divide by data*fsdp ({shards})")
    return c.batch_size // n_proc


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A run's jitted train step and everything it is built from (nothing allocated yet)."""

    mesh: Mesh
    model: LaVi  # a lavi_jax.lora.LoraModel around it when config.train.lora is on
    tx: optax.GradientTransformation
    patterns: tuple[str, ...]
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings
    batch: BatchSpec  # this process's batch
    fn: Any  # jitted (state, global batch) -> (state, metrics); donates the state


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> StepProgram:
    """The train step of ``config`` on ``mesh`` (default: ``config.mesh`` over every device), jitted with shardings."""
    c = config.train
    mesh = mesh or sharding.make_mesh(config.mesh.to_dict())
    model = lora.wrap(LaVi(config.model), lora.spec_from_config(c.get("lora")))
    patterns = run_patterns(c)
    tx = make_optimizer(c)
    abstract, shardings = state_shardings(model, tx, patterns, mesh, jnp.zeros((1, 8), jnp.int32))
    batch = BatchSpec.from_config(config, local_batch_size(c, mesh))
    batch_shardings = {k: sharding.batch_sharding(mesh, len(shape)) for k, (shape, _) in batch.shapes().items()}
    fn = jax.jit(make_train_step(model, tx, c), in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    return StepProgram(mesh, model, tx, patterns, abstract, shardings, batch, fn)
