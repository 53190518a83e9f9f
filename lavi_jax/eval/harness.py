"""Results in lmms-eval's format, for tools that read its output: ``<date>_results.json`` and
``<date>_samples_<task>.jsonl`` next to ``<task>.json``.

The files follow what lmms-eval 0.7.3 writes (``lmms_eval/evaluator.py``,
``lmms_eval/loggers/evaluation_tracker.py``), in the output folder itself
rather than a per-model subfolder:

- ``<date>_results.json``: ``results`` (``{task: {"alias", "<metric>,none",
  "<metric>_stderr,none"}}``), ``group_subtasks``, ``configs``, ``versions``,
  ``n-shot``, ``higher_is_better``, ``n-samples`` (``original``,
  ``effective``), ``config``, ``date``, ``task_hashes``, ``model_name``,
  ``model_name_sanitized``, ``start_time``, ``end_time``,
  ``total_evaluation_time_seconds``.
- ``<date>_samples_<task>.jsonl``: one line per sample with ``doc_id``,
  ``doc_hash``, ``target``, ``input``, ``filtered_resps`` (``resps`` is left
  out where it equals ``filtered_resps``, as lmms-eval does for generation),
  the task's metrics (the sample's score) and ``lavi_jax`` (our per-sample row).

Task and metric names are lmms-eval's (``LMMS_TASKS``, from each task's yaml
``task`` and ``metric_list``), values on lmms-eval's scale (MMBench, MVBench
and Video-MME in percent); our other scalar metrics follow under their own
names. Tasks without an lmms-eval counterpart keep their label and metrics.
Every task's ``configs`` entry names the scoring convention used.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

from lavi_jax import storage

# scorer -> (lmms-eval task, [(lmms-eval metric, our metric, scale)])
_ACCURACY = [("exact_match", "accuracy", 1.0)]
LMMS_TASKS: dict[str, tuple[str, list[tuple[str, str, float]]]] = {
    "vqav2": ("vqav2_val", _ACCURACY),
    "textvqa": ("textvqa_val", _ACCURACY),
    "gqa": ("gqa", _ACCURACY),
    "scienceqa_img": ("scienceqa_img", _ACCURACY),
    "pope": ("pope", [("pope_accuracy", "accuracy", 1.0), ("pope_precision", "precision", 1.0),
                      ("pope_recall", "recall", 1.0), ("pope_f1_score", "f1", 1.0),
                      ("pope_yes_ratio", "yes_ratio", 1.0)]),
    "mme": ("mme", [("mme_perception_score", "perception", 1.0), ("mme_cognition_score", "cognition", 1.0)]),
    "mmbench": ("mmbench_en_dev", [("gpt_eval_score", "circular_accuracy", 100.0)]),
    "mmbench_cn": ("mmbench_cn_dev", [("gpt_eval_score", "circular_accuracy", 100.0)]),
    "seed_bench": ("seedbench", [("seed_all", "accuracy", 1.0)]),
    "mvbench": ("mvbench", [("mvbench_accuracy", "accuracy", 100.0)]),
    "videomme": ("videomme", [("videomme_perception_score", "accuracy", 100.0)]),
}
FILTER = "none"  # lmms-eval's filter name for unfiltered generation


def hash_string(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sanitize_model_name(name: str) -> str:
    """lmms-eval's ``sanitize_model_name``: the last two path parts, unsafe characters as ``__``."""
    last_two = "/".join(name.rstrip("/").split("/")[-2:])
    return re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", last_two)


def task_name(result: dict) -> str:
    """The lmms-eval task name of ``result`` (its label when it is not a benchmark's default block)."""
    known = LMMS_TASKS.get(result["evaluator"])
    return known[0] if known and result["task"] == result["evaluator"] else result["task"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def lmms_metrics(result: dict) -> dict[str, float]:
    """``{lmms-eval metric: value}`` of a result: the mapped metrics, then our other scalar metrics."""
    metrics = result["metrics"]
    out, used = {}, set()
    for name, ours, scale in LMMS_TASKS.get(result["evaluator"], ("", []))[1]:
        value = metrics.get(ours)
        if ours == "circular_accuracy" and value is None:
            ours, value = "accuracy", metrics.get("accuracy")
        if _is_number(value):
            out[name] = float(value) * scale
            used.add(ours)
    for k, v in metrics.items():
        if k not in used and k not in out and _is_number(v):
            out[k] = float(v)
    return out


def _sample_score(row: dict) -> float:
    if _is_number(row.get("score")):
        return float(row["score"])
    return float(bool(row.get("correct")))


def sample_lines(result: dict) -> list[dict]:
    """The samples file's records of ``result``, one per per-sample row, in the results file's order."""
    present = lmms_metrics(result)
    names = [m for m, _, _ in LMMS_TASKS.get(result["evaluator"], ("", []))[1] if m in present] or \
        [m for m in ("exact_match", "accuracy") if m in present]
    lines = []
    for i, row in enumerate(result["per_sample"]):
        target = row.get("target", row.get("answers"))
        doc = json.dumps({"id": row.get("id"), "prompt": row.get("prompt"), "target": target},
                         indent=2, default=str, ensure_ascii=False)
        prediction = row.get("prediction")
        line = {"doc_id": i, "doc_hash": hash_string(doc), "target": str(target), "input": row.get("prompt"),
                "filtered_resps": "" if prediction is None else str(prediction)}
        line.update({m: _sample_score(row) for m in names})
        line["lavi_jax"] = row
        lines.append(line)
    return lines


def results_document(results: list[dict], *, model_name: str, date: str, start_time: float | None = None,
                     samples: dict[str, list[dict]] | None = None) -> dict:
    """The ``<date>_results.json`` document of ``results`` (``samples``: each task's sample lines)."""
    doc = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
           "higher_is_better": {}, "n-samples": {}}
    for r in results:
        name, metrics = task_name(r), lmms_metrics(r)
        row = {"alias": name}
        for k, v in metrics.items():
            row[f"{k},{FILTER}"] = v
            row[f"{k}_stderr,{FILTER}"] = "N/A"
        settings = r.get("settings", {})
        doc["results"][name] = row
        doc["group_subtasks"][name] = []
        doc["configs"][name] = {
            "task": name, "output_type": "generate_until", "num_fewshot": 0,
            "generation_kwargs": {"max_new_tokens": settings.get("max_new_tokens"), "temperature": 0,
                                  "do_sample": False},
            "metric_list": [{"metric": k, "higher_is_better": not k.startswith("num_")} for k in metrics],
            "metadata": {"convention": r.get("convention"), "lavi_jax_task": r["task"], "evaluator": r["evaluator"],
                         "questions": settings.get("questions"), "annotations": settings.get("annotations"),
                         "limit": settings.get("limit"), "options": settings.get("options")}}
        doc["versions"][name] = "N/A"
        doc["n-shot"][name] = 0
        doc["higher_is_better"][name] = {k: not k.startswith("num_") for k in metrics}
        doc["n-samples"][name] = {"original": r["num_samples"], "effective": r["num_samples"]}
    first = next(iter(results), {}).get("settings", {})
    end = time.time()
    start = start_time if start_time is not None else end - sum(r.get("seconds", 0) for r in results)
    doc.update({
        "config": {"model": "lavi_jax", "model_args": f"checkpoint={model_name}",
                   "batch_size": first.get("global_batch"), "device": f"{first.get('devices')} devices",
                   "limit": first.get("limit"), "gen_kwargs": ""},
        "date": date,
        "task_hashes": {n: hash_string("".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(lines)))
                        for n, lines in (samples or {}).items()},
        "model_source": "lavi_jax", "model_name": model_name, "model_name_sanitized": sanitize_model_name(model_name),
        "start_time": start, "end_time": end, "total_evaluation_time_seconds": str(end - start),
    })
    return doc


def write_lmms_eval(results: list[dict], out_dir: str, *, model_name: str = "lavi_jax",
                    date: str | None = None, start_time: float | None = None) -> list[str]:
    """Writes ``<date>_samples_<task>.jsonl`` per task and ``<date>_results.json`` (each whole, through
    :mod:`lavi_jax.storage`: ``out_dir`` may be a ``gs://`` URI); returns their paths."""
    storage.makedirs(out_dir)
    date = date or time.strftime("%Y%m%d_%H%M%S")
    samples, paths = {}, []
    for r in results:
        name = task_name(r)
        samples[name] = sample_lines(r)
        path = storage.join(out_dir, f"{date}_samples_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jsonl")
        storage.write_text(path, "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples[name]))
        paths.append(path)
    doc = results_document(results, model_name=model_name, date=date, start_time=start_time, samples=samples)
    path = storage.join(out_dir, f"{date}_results.json")
    storage.write_text(path, json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    return [path] + paths
