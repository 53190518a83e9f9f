"""Checkpoints: one orbax layout for imported weights and training runs, and ``lavi_jax.load``.

A checkpoint directory is an orbax ``CheckpointManager`` directory. Each step
holds the items

* ``params``: the model params (sharded arrays, restored straight into shards);
* ``config``: the full config as JSON (``config.model`` rebuilds the model);
* ``train_state`` (training only): optimizer state and step;
* ``data`` (training only): the grain iterator state.

Training saves and restores go through :func:`save_train_state` and
:func:`restore_train_state`. A LoRA run saves only what trains, its base being
what ``config.init`` points at (see "LoRA checkpoints" below); :func:`load` and
:func:`restore_params` return a LoRA checkpoint's params with the adapters merged.

A training run keeps its checkpoints in ``<workdir>/checkpoints``; an import
writes step 0 of ``CKPT_DIR``. Tokenizer files, when there are any, sit in
``<checkpoint dir>/tokenizer``.

Every directory may be a local path or a ``gs://`` URI (orbax writes both; a
step is committed on GCS by its ``commit_success.txt``, locally by a rename,
and an uncommitted step is never taken as the latest).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from lavi_jax import lora, sharding, storage
from lavi_jax.models.lavi import LaVi

TOKENIZER_DIR = "tokenizer"


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree does not match the config it is restored for."""


def resolve(path: str) -> str:
    """A workdir, a checkpoint-manager dir or a step dir -> the manager dir."""
    path = storage.absolute(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints")
    if storage.basename(path).isdigit() and storage.isdir(storage.join(path, "params")):
        return storage.parent(path)
    return path


def manager(directory: str, *, max_to_keep: int | None = None, async_save: bool = True, read_only: bool = False,
            save_concurrent_gb: int = 96) -> ocp.CheckpointManager:
    """``save_concurrent_gb`` bounds the host staging copy of a save (at least the largest array)."""
    import grain  # here, not at the top: reading params needs no input pipeline (nor grain installed)

    # Every item a lavi_jax checkpoint may hold is registered, so reading some items never warns about the others.
    handlers = {"params": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
                "config": ocp.JsonCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)  # partial writes of a killed run
    return ocp.CheckpointManager(storage.absolute(directory), options=options, item_handlers=handlers)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def save_params(directory: str, config: ml_collections.ConfigDict, params: Any, step: int = 0) -> str:
    """Writes ``params`` + ``config`` as step ``step`` of ``directory`` (blocking). Returns the directory.

    Arrays are staged to host a few at a time, so the save adds little host memory beyond the largest array.
    """
    largest = max((x.size * x.dtype.itemsize for x in jax.tree.leaves(params)), default=0)
    with manager(directory, async_save=False, save_concurrent_gb=max(1, -(-largest // 2**30))) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                config=ocp.args.JsonSave(config_to_json(config))))
        mngr.wait_until_finished()
    return storage.absolute(directory)


def read_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
    directory = resolve(path)
    with manager(directory, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ml_collections.ConfigDict(raw)


def abstract_params_for(model_config: ml_collections.ConfigDict, mesh, fit: bool = False,
                        spec: lora.LoraSpec | None = None) -> Any:
    """ShapeDtypeStructs with shardings for the params of ``model_config`` (with the adapters of ``spec``) on
    ``mesh``; with ``fit``, a param dimension the mesh does not divide is left replicated
    (``lavi_jax.sharding.logical_to_sharding(..., uneven=None)``)."""
    shapes, specs = sharding.abstract_params(lora.wrap(LaVi(model_config), spec), jnp.zeros((1, 8), jnp.int32))
    shardings = sharding.logical_to_sharding(specs, mesh, shapes, uneven=None if fit else sharding.UNEVEN_REPLICATED)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def check_tree(expected: Any, found: Any, where: str) -> None:
    """Raises ``CheckpointMismatch`` naming the first path whose presence or shape differs."""
    exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(found)[0]}
    for k in sorted(set(exp) | set(got)):
        if k not in got:
            raise CheckpointMismatch(f"{where}: checkpoint lacks param {k} that the config expects")
        if k not in exp:
            raise CheckpointMismatch(f"{where}: checkpoint has param {k} that the config does not define")
        if tuple(exp[k].shape) != tuple(got[k].shape):
            raise CheckpointMismatch(f"{where}: param {k} has shape {tuple(got[k].shape)} in the checkpoint, "
                                     f"config expects {tuple(exp[k].shape)}")


def restore_params(path: str, model_config: ml_collections.ConfigDict, mesh=None, step: int | None = None) -> Any:
    """Params of ``model_config`` restored from ``path`` directly into their shards on ``mesh``.

    Without ``mesh``: :func:`lavi_jax.sharding.make_load_mesh`, fsdp over every device (each param split
    over the devices along its ``fsdp`` axes, a dimension the device count does not divide left whole), so no
    device holds the whole model.
    """
    directory = resolve(path)
    saved = _saved_config(directory, step)
    if saved is not None and lora_spec(saved) is not None:  # a LoRA checkpoint: merged at load
        _, params = restore_run_params(directory, mesh, step)
        return lora.merge(params, lora_spec(saved))
    target = abstract_params_for(model_config, mesh or sharding.make_load_mesh(), fit=mesh is None)
    with manager(directory, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        meta = mngr.item_metadata(step)["params"]
        check_tree(target, metadata_tree(meta), f"{directory} step {step}")
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]


def metadata_tree(meta: Any) -> Any:
    """Orbax item metadata -> a tree of ShapeDtypeStructs (to compare with :func:`check_tree`)."""
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def load(path: str, *, mesh=None, step: int | None = None):
    """``(model, params)`` from any checkpoint lavi_jax writes (a workdir, checkpoint dir or step dir).

    The config travels with the checkpoint; params are restored sharded on
    ``mesh`` (default: :func:`lavi_jax.sharding.make_load_mesh`, fsdp over every
    device, so each device holds about 1/n of the params; pass a mesh of your own
    for tensor parallelism or full replication). The config is available as
    ``model.config`` (model part) and ``lavi_jax.checkpoint.read_config(path)``.
    """
    config = read_config(path, step)
    model = LaVi(config.model)
    return model, restore_params(path, config.model, mesh, step)


def save_train_state(mngr: ocp.CheckpointManager, step: int, *, params: Any, train_state: dict, config: dict,
                     data_iterator) -> None:
    """Saves a training step (asynchronously): params, ``train_state`` (optimizer state, step, counters), the
    config as JSON and the grain iterator's position."""
    import grain

    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
        config=ocp.args.JsonSave(config), data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_train_state(mngr: ocp.CheckpointManager, step: int, *, params: Any, train_state: dict,
                        data_iterator) -> tuple[Any, dict]:
    """Restores step ``step`` into the shardings of the abstract ``params`` / ``train_state`` targets and moves
    ``data_iterator`` to the saved position. Raises :class:`CheckpointMismatch` naming the first param whose
    presence or shape differs from the target. -> ``(params, train_state)``."""
    import grain

    check_tree(params, metadata_tree(mngr.item_metadata(step)["params"]), f"{mngr.directory} step {step}")
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), train_state=ocp.args.StandardRestore(train_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return got["params"], got["train_state"]


def tokenizer_dir(path: str) -> str | None:
    """The tokenizer saved next to a checkpoint, if any."""
    d = storage.join(resolve(path), TOKENIZER_DIR)
    return d if storage.isdir(d) else None


# ----------------------------------------------------------------------------- LoRA checkpoints
#
# A LoRA run (``config.train.lora.rank > 0``) saves only what trains (adapters, plus the params ``train.trainable``
# selects) under ``params``; the frozen base is what ``config.init`` points at (a checkpoint, an HF import or the
# seed's random init), so a save of a 7B run is hundreds of MB, not a 15 GB copy of a base that never changes.
# ``conversions.import_hf --lora`` writes base and adapters together (a full tree). Both restore to the unmerged
# params of the wrapped model (:func:`restore_run_params`); :func:`restore_params` / :func:`load` merge them.


def lora_spec(config: ml_collections.ConfigDict) -> lora.LoraSpec | None:
    """The LoRA of a full run config (None: none)."""
    train = config.get("train") if config is not None else None
    return lora.spec_from_config(train.get("lora") if train is not None else None)


def _saved_config(directory: str, step: int | None) -> ml_collections.ConfigDict | None:
    with manager(directory, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None or not storage.isdir(storage.join(str(mngr.directory), str(step), "config")):
            return None
    return read_config(directory, step)


def _random_init(model, target: Any, seed: int, keep=None) -> Any:
    """``model``'s random init (seed ``seed``) straight into the shardings of ``target``; ``keep(flat path)``:
    only those leaves are returned (the rest of the init is dead code XLA drops)."""

    def init(r):
        p = nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
        if keep is None:
            return p
        return traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(p).items() if keep(k)})

    flat = traverse_util.flatten_dict(jax.tree.map(lambda t: t.sharding, target))
    shardings = traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep is None or keep(k)})
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def initial_params(config: ml_collections.ConfigDict, mesh=None, *, fit: bool = False) -> Any:
    """The params a run of ``config`` starts from, adapters unmerged: ``config.init.checkpoint`` (a LoRA
    checkpoint with the same LoRA continues its adapters; another LoRA is merged into the base first), else the
    ``config.init.hf_llm`` / ``hf_vision`` import, else the random init of ``config.train.seed``; adapters the
    source lacks start fresh (``lora_b`` zero). With QLoRA (``train.lora.quantize``) that float base is then
    quantized (:func:`lavi_jax.lora.quantize_params`) straight into the target's shardings."""
    mesh = mesh or sharding.make_load_mesh()
    spec = lora_spec(config)
    if spec is not None and spec.qtype is not None:  # QLoRA: the float base, quantized into the target's shards
        float_spec = dataclasses.replace(spec, quantize="none")
        params = _initial_params(config, mesh, fit, float_spec)
        target = abstract_params_for(config.model, mesh, fit=fit, spec=spec)
        shardings = jax.tree.map(lambda t: t.sharding, target)
        return jax.jit(lambda p: lora.quantize_params(p, target), out_shardings=shardings)(params)
    return _initial_params(config, mesh, fit, spec)


def _initial_params(config, mesh, fit, spec):
    model = lora.wrap(LaVi(config.model), spec)
    target = abstract_params_for(config.model, mesh, fit=fit, spec=spec)
    init, seed = config.init, int(config.train.seed)
    if init.checkpoint:
        src_config, params = restore_run_params(init.checkpoint, mesh)
        src_spec = lora_spec(src_config)
        same = lambda a, b: a is not None and b is not None and (a.rank, a.alpha, a.rslora, a.targets) == (
            b.rank, b.alpha, b.rslora, b.targets)
        if src_spec is not None and not same(src_spec, spec):
            params = lora.merge(params, src_spec)
        params = lora.dequantize(params)  # a QLoRA source continues as a float base (quantized again above)
    elif init.hf_llm:
        from lavi_jax.hf.importer import import_hf

        cfg, params = import_hf(init.hf_llm, init.hf_vision or None, config.model, mesh=mesh, seed=seed)
        if cfg.llm.to_dict() != config.model.llm.to_dict():
            raise ValueError(f"config.model.llm does not match {init.hf_llm}: build the config with conversions.import_hf")
    else:
        return _random_init(model, target, seed)
    have = set(traverse_util.flatten_dict(params))
    missing = {k for k in traverse_util.flatten_dict(target) if k not in have}
    if missing:
        if any(k[-1] not in lora.ADAPTERS for k in missing):
            raise CheckpointMismatch(f"the base of this run lacks params {sorted('/'.join(k) for k in missing)[:3]}")
        fresh = _random_init(model, target, seed, keep=lambda k: k in missing)
        params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(fresh)})
    check_tree(target, params, "the base of this run")
    return params


def restore_run_params(path: str, mesh=None, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """``(config, params)`` of the checkpoint at ``path``, a LoRA one with its adapters unmerged: a full tree is
    restored as it is, an adapter-only save over :func:`initial_params` of its config (its base)."""
    directory = resolve(path)
    config = read_config(directory, step)
    spec = lora_spec(config)
    target = abstract_params_for(config.model, mesh or sharding.make_load_mesh(), fit=mesh is None, spec=spec)
    with manager(directory, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        meta = metadata_tree(mngr.item_metadata(step)["params"])
        flat_t, flat_m = traverse_util.flatten_dict(target), traverse_util.flatten_dict(meta)
        if spec is None or set(flat_m) == set(flat_t):
            check_tree(target, meta, f"{directory} step {step}")
            got = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            return config, got
        sub = traverse_util.unflatten_dict({k: flat_t[k] for k in flat_m if k in flat_t})
        check_tree(sub, meta, f"{directory} step {step}")
        got = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(sub)))["params"]
    base = initial_params(config, mesh, fit=mesh is None)
    return config, traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(got)})
