"""A run config's evaluation suite: its runner, running its tasks, and the trainer's periodic hook."""

from __future__ import annotations

import time
from typing import Callable

import jax

from lavi_jax import storage
from lavi_jax.eval.harness import write_lmms_eval
from lavi_jax.eval.results import flat_scalars, summary_table
from lavi_jax.eval.runner import Runner
from lavi_jax.eval.tasks import Task, tasks_from_config


def make_runner(config, model, mesh, tokenizer, processor) -> Runner:
    """The runner of ``config``: ``evals.batch_size`` (0: ``train.batch_size``), frames, pixel limit, threads."""
    e, d = config.evals, config.data
    return Runner(model, mesh, tokenizer, processor, batch_size=e.get("batch_size") or config.train.batch_size,
                  num_frames=d.get("num_frames", 1), max_image_pixels=d.get("max_image_pixels"),
                  num_threads=d.get("num_threads", 8))


def run_tasks(runner: Runner, params, tasks: list[Task], out_dir: str | None = None, *,
              print_summary: bool = True, checkpoint: dict | None = None) -> list[dict]:
    """Runs ``tasks`` in order; process 0 prints the summary table.

    With ``out_dir``: ``<task>.json`` per task, the lmms-eval files (``harness``), and predictions logs a
    rerun resumes from when ``checkpoint`` (``{"path", "step"}`` of ``params``) is given (``resume``).
    """
    start = time.time()
    results = [runner.run(params, task, out_dir, checkpoint=checkpoint) for task in tasks]
    if out_dir and jax.process_index() == 0:
        name = str(checkpoint["path"]) if checkpoint else "lavi_jax"
        write_lmms_eval(results, out_dir, model_name=name, start_time=start)
    if print_summary and jax.process_index() == 0:
        print(summary_table(results) + (f"\nper-sample results in {out_dir}" if out_dir else ""), flush=True)
    return results


def training_evals(config, model, mesh, tokenizer, processor,
                   workdir: str) -> Callable[[object, int], dict[str, float]] | None:
    """For the trainer: ``None`` without ``config.evals.tasks``, else ``fn(params, step) -> {"<task>/<metric>": x}``
    that also writes ``<workdir>/results/step_<step>/<task>.json``."""
    if not config.evals.get("tasks"):
        return None
    tasks, runner = tasks_from_config(config), make_runner(config, model, mesh, tokenizer, processor)

    def evaluate(params, step: int) -> dict[str, float]:
        out = storage.join(workdir, "results", f"step_{step}")
        # No checkpoint identity: params in training are not a saved step, so a rerun never resumes them.
        return flat_scalars(run_tasks(runner, params, tasks, out, print_summary=False))

    return evaluate
