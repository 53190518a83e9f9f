"""Task results: the ``<out>/<task>.json`` files, the summary table and flat scalars for metric writers.

A result is the dict :meth:`lavi_jax.eval.Runner.run` returns: ``task``,
``evaluator``, ``convention`` (the scoring reference the evaluator follows),
``metrics``, ``num_samples``, ``num_failed``, ``failures``, ``settings``,
``seconds`` and ``per_sample``. The same results in lmms-eval's format are in
:mod:`lavi_jax.eval.harness`.
"""

from __future__ import annotations

import os

from lavi_jax import storage

HEADLINE = ("accuracy", "circular_accuracy", "f1", "perception", "cognition", "exact_match", "normalized_match")
POINTS = ("perception", "cognition")  # MME scores, in the benchmark's points rather than fractions


def headline(metrics: dict) -> dict[str, float]:
    """The metrics a summary shows, in ``HEADLINE`` order."""
    return {k: metrics[k] for k in HEADLINE if isinstance(metrics.get(k), (int, float))}


def summary_table(results: list[dict]) -> str:
    """A plain-text table: one row per task, its headline metrics, samples and failures."""
    rows = []
    for r in results:
        scores = "  ".join(f"{k} {v:.1f}" if k in POINTS else f"{k} {v:.2%}" for k, v in headline(r["metrics"]).items())
        rows.append((r["task"], scores, str(r["num_samples"]), str(r["num_failed"])))
    head = ("task", "scores", "samples", "failed")
    widths = [max(len(x[c]) for x in rows + [head]) for c in range(4)]
    line = lambda x: f"{x[0]:<{widths[0]}}  {x[1]:<{widths[1]}}  {x[2]:>{widths[2]}}  {x[3]:>{widths[3]}}"
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(x) for x in rows])


def flat_scalars(results: list[dict]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of every top-level number, for metric writers."""
    return {f"{r['task']}/{k}": float(v) for r in results for k, v in r["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def result_path(out_dir: str, task: str) -> str:
    return storage.join(out_dir, task.replace("/", "_").replace(os.sep, "_") + ".json")


def write_result(result: dict, out_dir: str) -> str:
    """Writes ``<out_dir>/<task>.json`` whole (``out_dir`` local or a URI; on local disk a file renamed into
    place, so a reader never sees half of it); returns its path."""
    storage.makedirs(out_dir)
    path = result_path(out_dir, result["task"])
    storage.write_json(path, result, indent=1, ensure_ascii=False, default=str)
    return path
