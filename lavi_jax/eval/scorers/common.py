"""Pieces every evaluator shares: reading benchmark files, prompt suffixes, prediction lookup.

A *sample* is a plain dict:

    {"id": str, "image": path | [paths] | None, "video": path (optional), "prompt": str,
     "answer": str and/or "answers": [str], "options": [str] (multiple choice), "metadata": {...}}

`score(samples, predictions, failures=None)` looks each sample id up in `predictions`
(id -> model output text). A sample whose prediction is missing, `None`, an exception, a dict with
an "error" entry, or whose id is in `failures` (id -> reason) is scored as wrong, and its reason is
kept in the per-sample row under "error".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

from lavi_jax import storage

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
OPTION_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_PROMPT_CN = "请直接回答选项字母。"


class Evaluator:
    """Interface of every evaluator returned by `lavi_jax.eval.scorers.get`."""

    name: str = "evaluator"
    # The scoring reference this evaluator follows, written into every results file, e.g.
    # "lmms-eval 0.7.3 vqav2", "LLaVA eval_pope.py", or "lenient" for the permissive extractors.
    convention: str = "lavi_jax"

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        raise NotImplementedError

    def score(self, samples: Sequence[dict], predictions: Mapping[Any, Any],
              failures: Mapping[Any, str] | None = None) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------- files


def open_text(path, newline=None) -> io.TextIOWrapper:
    """A text file (local path or URI), read whole in one request, as the built-in ``open`` reads it."""
    return io.TextIOWrapper(io.BytesIO(storage.read_bytes(os.fspath(path))), encoding="utf-8", newline=newline)


def read_jsonl(path) -> list[dict]:
    with open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    """A .json file; falls back to JSON lines (POPE's `coco_pope_*.json` are JSONL)."""
    with open_text(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_tsv(path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # MMBench cells hold base64 images
    with open_text(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_any(path):
    """Records from a .jsonl / .json / .tsv file (dicts and lists are passed through)."""
    if isinstance(path, (list, dict)):
        return path
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".tsv"):
        return read_tsv(path)
    return read_json(path)


# ----------------------------------------------------------------------------- values


def is_blank(value) -> bool:
    """True for the empty cells of tsv / pandas exports: None, NaN, '', 'nan'."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in ("", "nan", "NaN", "None")


def first_present(record: Mapping, *keys, default=None):
    for key in keys:
        if key in record and not is_blank(record[key]):
            return record[key]
    return default


def with_suffix(text: str, suffix: str | None) -> str:
    """`text` followed by the answer-format `suffix` on its own line, unless it already ends so."""
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def join_root(root, path):
    if path is None or root is None:
        return path
    if isinstance(path, (list, tuple)):
        return [storage.join(root, p) for p in path]
    return storage.join(root, path)


def unique_ids(ids: Sequence[str]) -> list[str]:
    """Ids as given when unique; otherwise each repeated id becomes `id#0`, `id#1`, ..."""
    counts = defaultdict(int)
    for i in ids:
        counts[i] += 1
    seen = defaultdict(int)
    out = []
    for i in ids:
        if counts[i] > 1:
            out.append(f"{i}#{seen[i]}")
            seen[i] += 1
        else:
            out.append(i)
    return out


def take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ----------------------------------------------------------------------------- predictions


def normalize_predictions(predictions: Mapping[Any, Any] | None) -> dict[str, Any]:
    return {str(k): v for k, v in (predictions or {}).items()}


def resolve(predictions: Mapping[str, Any], failures: Mapping[str, Any],
            sample_id: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable prediction, (None, reason) for a missing or failed one.

    Both mappings are keyed by string ids (see `normalize_predictions`).
    """
    if sample_id in failures:
        return None, str(failures[sample_id] or "failed")
    if sample_id not in predictions:
        return None, "missing prediction"
    value = predictions[sample_id]
    if value is None:
        return None, "prediction is None"
    if isinstance(value, BaseException):
        return None, f"{type(value).__name__}: {value}"
    if isinstance(value, Mapping):
        if value.get("error"):
            return None, str(value["error"])
        value = first_present(value, "text", "prediction", "answer", default=None)
        if value is None:
            return None, "prediction has no text"
    return str(value), None


# ----------------------------------------------------------------------------- metrics


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def breakdown(rows: Sequence[dict], key: str, value: Callable[[dict], float]) -> dict[str, float]:
    """Mean of `value(row)` per distinct `row[key]` (rows without the key are skipped)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(key) is not None:
            groups[str(row[key])].append(value(row))
    return {k: mean(v) for k, v in sorted(groups.items())}


def as_list(value) -> list:
    """None -> [], a string -> [it], any other iterable -> a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)
