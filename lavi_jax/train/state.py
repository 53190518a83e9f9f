"""The train state and where each of its leaves lives on the mesh."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from lavi_jax import sharding
from lavi_jax.train.optimizer import init_opt_state


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # full param tree
    opt_state: Any  # optimizer state of the trainable params only
    nonfinite: jax.Array  # consecutive non-finite steps


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
    p_shard = sharding.logical_to_sharding(specs, mesh, shapes)
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
