"""Train state, optimizer, loss and the sharded train step.

* Trainable params are selected by regular expressions over ``/``-joined
  param paths (``config.train.trainable``); frozen params receive no gradient,
  carry no optimizer state and stay bit-identical.
* AdamW with linear warmup + cosine decay and global-norm clipping; gradient
  accumulation over ``config.train.grad_accum`` micro-batches. ``config.train.lr_mults``
  scales the learning rate of the params whose path matches a regex (first match wins).
* Loss: next-token cross entropy on assistant tokens (``loss_mask`` aligned to
  target positions), averaged over the global batch's target tokens.
* A step whose loss or gradient norm is not finite leaves params and optimizer
  state untouched and increments ``nonfinite`` (reset by the next finite step).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct, traverse_util

from lavi_jax import sharding

# Stage presets for ``config.train.trainable``.
STAGES = {
    "projector+conditioners": (r"^projector/", r"conditioner"),
    "projector+conditioners+llm": (r"^projector/", r"conditioner", r"^llm/"),
    "all": (r".*",),
}


def train_config(**overrides) -> ml_collections.ConfigDict:
    """``config.train``: optimisation and loop settings."""
    c = ml_collections.ConfigDict()
    c.num_steps = 1000
    c.batch_size = 32  # global batch (all processes)
    c.grad_accum = 1  # micro-batches per step (batch_size must divide evenly)
    c.learning_rate = 1e-4
    c.warmup_steps = 100
    c.end_lr_fraction = 0.0  # cosine decays to learning_rate * end_lr_fraction
    c.b1, c.b2, c.eps = 0.9, 0.95, 1e-8
    c.weight_decay = 0.0
    c.clip_grad_norm = 1.0
    c.trainable = "projector+conditioners"  # a STAGES key, or comma-separated regexes over param paths
    c.lr_mults = ()  # ((regex, multiplier), ...): per-param learning-rate factors, first match wins
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.max_nonfinite = 10  # consecutive non-finite steps before the run stops
    c.update(overrides)
    return c


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # full param tree
    opt_state: Any  # optimizer state of the trainable params only
    nonfinite: jax.Array  # consecutive non-finite steps


# ----------------------------------------------------------------------------- trainable partition


def trainable_patterns(trainable) -> tuple[str, ...]:
    if isinstance(trainable, str):
        if trainable in STAGES:
            return STAGES[trainable]
        patterns = tuple(p.strip() for p in trainable.split(",") if p.strip())
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"train.trainable: {p!r} is neither a stage ({sorted(STAGES)}) nor a valid regex: {e}")
        return patterns
    return tuple(trainable)


def is_trainable(path: tuple[str, ...], patterns) -> bool:
    name = "/".join(path)
    return any(re.search(p, name) for p in patterns)


def partition(params: Any, patterns) -> tuple[dict, dict]:
    """``(trainable, frozen)`` nested dicts with disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    t = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    f = {k: v for k, v in flat.items() if not is_trainable(k, patterns)}
    return traverse_util.unflatten_dict(t), traverse_util.unflatten_dict(f)


def merge(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(c: ml_collections.ConfigDict) -> Callable:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=max(c.warmup_steps, 1),
        decay_steps=max(c.num_steps, c.warmup_steps + 1), end_value=c.learning_rate * c.end_lr_fraction)


def lr_multiplier(name: str, lr_mults) -> float:
    return next((float(m) for pattern, m in lr_mults if re.search(pattern, name)), 1.0)


def scale_by_path(lr_mults) -> optax.GradientTransformation:
    """Multiplies each update by the ``lr_mults`` factor of its param path (1 where none matches)."""
    lr_mults = tuple((str(p), float(m)) for p, m in lr_mults)
    for pattern, _ in lr_mults:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"train.lr_mults: {pattern!r} is not a valid regex: {e}")

    def update(updates, state, params=None):
        def scale(path, u):
            m = lr_multiplier("/".join(str(getattr(k, "key", k)) for k in path), lr_mults)
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on norms and biases
    parts = [
        optax.clip_by_global_norm(c.clip_grad_norm) if c.clip_grad_norm else optax.identity(),
        optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
    ]
    if c.get("lr_mults"):  # appended only when set, so the optimizer state of existing checkpoints keeps its layout
        parts.append(scale_by_path(c.lr_mults))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- loss and step


def loss_terms(model: nn.Module, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) for a batch."""
    logits = model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"), batch.get("item_mask"),
                         attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, c: ml_collections.ConfigDict):
    """``step(state, batch) -> (state, metrics)``, to be jitted with shardings."""
    patterns = trainable_patterns(c.trainable)
    schedule = learning_rate_schedule(c)
    k = int(c.grad_accum)

    def step(state: TrainState, batch: dict):
        trainable, frozen = partition(state.params, patterns)
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            g_sum, num_sum, den_sum = carry
            (num, den), g = jax.value_and_grad(lambda t: loss_terms(model, merge(t, frozen), mb), has_aux=True)(trainable)
            return (jax.tree.map(jnp.add, g_sum, g), num_sum + num, den_sum + den), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (g_sum, num, den), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro)
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
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "tokens": den, "finite": finite, "nonfinite": new_state.nonfinite}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------- state creation and shardings


def init_opt_state(tx: optax.GradientTransformation, params: Any, patterns) -> Any:
    return tx.init(partition(params, patterns)[0])


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh) -> Any:
    """Optimizer-state shardings: a leaf under a param's path gets that param's sharding, others replicate."""
    table = {k: v for k, v in traverse_util.flatten_dict(param_shardings).items()}
    rep = sharding.replicated(mesh)

    def pick(path, leaf):
        keys = tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)
        keys = tuple(str(k) for k in keys if k is not None)
        for n in range(len(keys)):
            s = table.get(keys[n:])
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(model: nn.Module, tx, patterns, mesh, example_ids) -> tuple[Any, TrainState]:
    """``(abstract TrainState, TrainState of shardings)`` for ``model`` on ``mesh``."""
    shapes, specs = sharding.abstract_params(model, example_ids)
    p_shard = sharding.logical_to_sharding(specs, mesh)
    opt_shapes = jax.eval_shape(lambda p: init_opt_state(tx, p, patterns), shapes)
    rep = sharding.replicated(mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes, opt_state=opt_shapes,
                          nonfinite=jax.ShapeDtypeStruct((), jnp.int32))
    shard = TrainState(step=rep, params=p_shard, opt_state=opt_state_shardings(opt_shapes, p_shard, mesh), nonfinite=rep)
    return abstract, shard


def create_state(params: Any, tx, patterns, shardings: TrainState) -> TrainState:
    """A fresh TrainState around ``params`` (already sharded), optimizer state created in its shards."""
    opt_state = jax.jit(lambda p: init_opt_state(tx, p, patterns), out_shardings=shardings.opt_state)(params)
    rep = shardings.step
    return TrainState(step=jax.device_put(jnp.int32(0), rep), params=params, opt_state=opt_state,
                      nonfinite=jax.device_put(jnp.int32(0), rep))
