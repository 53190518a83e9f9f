"""eval.py's job: evaluate a saved checkpoint on the tasks of a run config.

The model config and its data settings (tokenizer, processor, frames) come from
the config saved with the checkpoint; the run config gives the mesh, the tasks
and, where it sets them, the data paths (``eval_json``, ``image_root``).
"""

from __future__ import annotations

import jax

from lavi_jax import checkpoint, sharding, storage
from lavi_jax.data.components import make_components
from lavi_jax.eval.tasks import tasks_from_config
from lavi_jax.eval.suite import make_runner, run_tasks
from lavi_jax.models.lavi import LaVi

SAVED_DATA_KEYS = ("eval_json", "image_root", "tokenizer", "processor", "num_frames")
RUN_CONFIG_WINS = ("eval_json", "image_root")  # paths: the saved value only where the run config leaves them empty


class CheckpointConfigError(ValueError):
    """The config saved with a checkpoint exists but cannot be read."""


def _step(path: str, step: int | None) -> tuple[str, int]:
    """``(checkpoint manager dir, step)``; the step of a step dir, else ``step``, else the latest."""
    name = storage.basename(storage.absolute(path))
    if step is None and name.isdigit() and storage.isdir(storage.join(path, "params")):
        step = int(name)
    directory = checkpoint.resolve(path)
    if step is None:
        with checkpoint.manager(directory, read_only=True) as mngr:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
    return directory, int(step)


def saved_config(directory: str, step: int):
    """The config saved with step ``step``, or None when the checkpoint has none; raises for an unreadable one."""
    item = storage.join(directory, str(step), "config")
    if not storage.isdir(item):
        return None
    try:
        return checkpoint.read_config(directory, step)
    except (OSError, ValueError, KeyError) as e:  # missing, truncated or corrupt file: name it, never guess
        raise CheckpointConfigError(f"cannot read the config saved with the checkpoint, {item}/metadata: "
                                    f"{type(e).__name__}: {e}") from e


def merge_saved_config(config, saved) -> None:
    """The model and its data settings from ``saved`` into ``config`` (in place)."""
    with config.unlocked():
        if saved is not None and "model" in saved:
            config.model = saved.model
            data = saved.get("data") or {}
            for key in SAVED_DATA_KEYS:
                if key in data and (key not in RUN_CONFIG_WINS or not config.data.get(key)):
                    config.data[key] = data[key]


def checkpoint_config(config, path: str, step: int | None = None):
    """``(config, directory, step)``: ``config`` (None: the checkpoint's own) with the model, tokenizer and
    processor of the checkpoint at ``path`` (a workdir, checkpoint dir or step dir; ``step``: default the latest)."""
    directory, step = _step(path, step)
    saved = saved_config(directory, step)
    if config is None:
        if saved is None:
            raise CheckpointConfigError(f"{directory} step {step} has no saved config: pass a run config")
        config = saved
    config = config.copy_and_resolve_references()
    if saved is None and jax.process_index() == 0:
        print(f"{directory} step {step} has no saved config: the run config describes the model", flush=True)
    merge_saved_config(config, saved)
    with config.unlocked():
        config.data.tokenizer = checkpoint.tokenizer_dir(directory) or config.data.tokenizer
        if not storage.isdir(str(config.data.processor)):
            config.data.processor = config.model.vision.type
        config.data.image_size = config.model.vision.image_size
    return config, directory, step


def load_checkpoint(config, directory: str, step: int, mesh):
    """``(model, params, tokenizer, processor)`` of a config from :func:`checkpoint_config`, params on ``mesh``."""
    tokenizer, processor = make_components(config)
    model = LaVi(config.model)
    params = checkpoint.restore_params(directory, config.model, mesh, step)
    return model, params, tokenizer, processor


def evaluate_checkpoint(config, path: str, out_dir: str | None, *, step: int | None = None) -> list[dict]:
    """Evaluates the checkpoint at ``path`` (a workdir, checkpoint dir or step dir; ``step``: default the latest)
    on ``config``'s tasks (default: ``llava_json`` when ``config.data.eval_json`` is set); writes
    ``<out_dir>/<task>.json`` and the lmms-eval files, prints the summary table, and resumes from the
    predictions logs of an interrupted run of the same checkpoint and tasks. Returns the results."""
    config, directory, step = checkpoint_config(config, path, step)
    with config.unlocked():
        if not config.evals.get("tasks"):
            if not config.data.get("eval_json"):
                raise ValueError("no eval tasks: set --config.evals.tasks (e.g. llava_json, pope, vqav2)")
            config.evals.tasks = "llava_json"
    tasks = tasks_from_config(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    model, params, tokenizer, processor = load_checkpoint(config, directory, step, mesh)
    runner = make_runner(config, model, mesh, tokenizer, processor)
    return run_tasks(runner, params, tasks, out_dir, checkpoint={"path": directory, "step": step})
