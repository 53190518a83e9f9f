"""Evaluation: benchmark tasks answered by generation on every device of every process, and held-out exact match.

    tasks = tasks_from_config(config)                   # config.evals, see tasks.py
    runner = make_runner(config, model, mesh, tokenizer, processor)
    results = run_tasks(runner, params, tasks, out_dir)  # <out_dir>/<task>.json + a summary table

``evaluate_checkpoint`` is eval.py's entry point, ``training_evals`` and
``evaluate_exact_match`` the trainer's. Scorers (one per benchmark) are in
``scorers``; the runner in ``runner``; results files in ``results``.
"""

from lavi_jax.eval import scorers
from lavi_jax.eval.exact_match import evaluate_exact_match, exact_match_scorer
from lavi_jax.eval.from_checkpoint import CheckpointConfigError, evaluate_checkpoint
from lavi_jax.eval.results import flat_scalars, summary_table, write_result
from lavi_jax.eval.runner import Runner
from lavi_jax.eval.suite import make_runner, run_tasks, training_evals
from lavi_jax.eval.tasks import Task, tasks_from_config

__all__ = ["CheckpointConfigError", "Runner", "Task", "evaluate_checkpoint", "evaluate_exact_match",
           "exact_match_scorer", "flat_scalars", "make_runner", "run_tasks", "scorers", "summary_table",
           "tasks_from_config", "training_evals", "write_result"]
