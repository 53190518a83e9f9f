"""POPE, scored as LLaVA's `llava/eval/eval_pope.py` scores it (convention "LLaVA eval_pope.py").

Answer parsing (`llava_pope_answer`): keep the text before the first "." (the first sentence); drop
commas; split on single spaces; if a word is exactly "No", "no" or "not" the answer is no, otherwise
it is yes (an empty answer, "I don't think so", "NO" and "No!" are yes; "Yes, but it is not red."
is no). "yes" is the positive class.

Metrics, per split (`by_category`: adversarial / popular / random) and pooled over all questions:
accuracy, precision, recall, F1, yes_ratio (share of "yes" *predictions*), tp/fp/tn/fn. The
top-level "f1" is the mean of the splits' F1 as papers report it ("f1_pooled" is the pooled one);
the other top-level metrics are pooled. Without categories "f1" is the pooled F1.

Departures from eval_pope.py, where it has no answer: a ratio with a zero denominator is 0.0
(eval_pope.py divides by zero); answers are matched to labels by question, not by line order; a
failed or missing prediction counts as wrong (the opposite of its label). Labels are "yes"/"no"
after lower-casing and stripping; any other label is skipped with its reason (eval_pope.py reads
every label other than "no" as yes).

lmms-eval 0.7.3's `pope/utils.py` differs, and is not followed: it compares the whole lower-cased,
stripped answer with the label ("Yes, there is." is neither yes nor no: wrong, and left out of
precision and recall), and its `pope_yes_ratio` is the share of "yes" *labels*, not predictions.

Files read by `load`: questions are LLaVA's `llava_pope_test.jsonl` (`question_id, image, text,
category`), or the POPE label files themselves (`coco_pope_<category>.json`, JSON lines with
`label`; a file, a list of files or a folder). Annotations are those label files, matched by
category, image and question (by order within a category when the texts differ).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Any

import lavi_jax.eval.scorers.common as common
from lavi_jax import storage
from lavi_jax.eval.scorers import yes_no

CONVENTION = "LLaVA eval_pope.py"
_NO_WORDS = frozenset({"No", "no", "not"})


def llava_pope_answer(text: str) -> str:
    """"yes" or "no", read from a model's answer as eval_pope.py reads it."""
    first_sentence = text.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def pope_label(value) -> str | None:
    """A label file's "yes"/"no" (case and surrounding space ignored), else None."""
    if not isinstance(value, str):
        return None
    label = value.strip().lower()
    return label if label in ("yes", "no") else None


def _files(path) -> list[str]:
    if isinstance(path, (list, tuple)):
        return [os.fspath(p) for p in path]
    path = os.fspath(path)
    if storage.isdir(path):
        return sorted(storage.glob(storage.join(path, "*.json")) +
                      storage.glob(storage.join(path, "*.jsonl")))
    return [path]


def _records(path) -> list[dict]:
    """Records of one or more files; category from the record or from `*pope_<category>.json`."""
    out = []
    for f in _files(path):
        m = re.search(r"pope_([A-Za-z]+)\.jsonl?$", storage.basename(f))
        for r in common.read_any(f):
            out.append({**r, "category": r.get("category") or (m.group(1) if m else None)})
    return out


def _key(r) -> tuple:
    return (r.get("category"), os.path.basename(str(r.get("image"))),
            common.first_line(str(r.get("text", r.get("question", "")))).lower())


class POPEEvaluator(common.Evaluator):
    """POPE; `extractor="lenient"` reads answers with `yes_no.extract_yes_no` instead."""

    def __init__(self, name: str = "pope", prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT,
                 extractor: str = "reference"):
        self.name, self.prompt_suffix = name, prompt_suffix
        self.extractor = yes_no.check_extractor(extractor)
        self.convention = CONVENTION if extractor == "reference" else "lenient"
        self.report = yes_no.InputReport(name)

    def read(self, text: str) -> str | None:
        """The answer's "yes"/"no" under this evaluator's extractor (None: unreadable)."""
        return llava_pope_answer(text) if self.extractor == "reference" else \
            yes_no.extract_yes_no(text)

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        self.report = report = yes_no.InputReport(self.name)
        records = _records(questions)
        by_key, by_order = {}, defaultdict(list)
        if annotations is not None:
            for a in _records(annotations):
                by_key[_key(a)] = a.get("label")
                by_order[a["category"]].append(a.get("label"))
        position = defaultdict(int)
        ids = [str(common.first_present(r, "question_id", "id")) for r in records]
        if len(set(ids)) < len(ids):  # label files number their questions per category
            ids = [f"{r['category']}/{i}" for r, i in zip(records, ids)]
        samples = []
        for rid, r in zip(yes_no.note_repeated_ids(report, ids), records):
            label = r.get("label")
            if label is None and annotations is not None:
                label = by_key.get(_key(r))
                if label is None:
                    ordered = by_order.get(r["category"], [])
                    label = ordered[position[r["category"]]] if position[r["category"]] < len(
                        ordered) else None
            position[r["category"]] += 1
            text = common.first_present(r, "text", "question")
            problem = ("no question text" if text is None else
                       "no image" if common.is_blank(r.get("image")) else
                       "no label" if label is None else
                       f"label {label!r} is not yes/no" if pope_label(label) is None else None)
            if problem:
                report.skip(rid, problem)
                continue
            if r["category"] is None:
                report.note(rid, "no category: counted in the pooled metrics only")
            text = str(text)
            samples.append({"id": rid, "image": common.join_root(image_root, r.get("image")),
                            "prompt": common.with_suffix(text, self.prompt_suffix),
                            "answer": pope_label(label),
                            "metadata": {"category": r["category"],
                                         "question": common.first_line(text)}})
        return common.take(samples, limit)

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        flip = {"yes": "no", "no": "yes"}
        rows = []
        for s in samples:
            if s.get("answer") not in ("yes", "no"):
                raise ValueError(f"sample {s['id']} has no yes/no answer")
            text, error = common.resolve(preds, fails, s["id"])
            got = None if error else self.read(text)
            rows.append({"id": s["id"], "prediction": text, "extracted": got,
                         "target": s["answer"], "correct": got == s["answer"], "error": error,
                         "category": s.get("metadata", {}).get("category")})

        def metrics_of(rs):  # unreadable or failed: the opposite of the label
            return yes_no.binary_metrics([r["target"] for r in rs],
                                         [r["extracted"] or flip[r["target"]] for r in rs])

        metrics: dict[str, Any] = metrics_of(rows)
        metrics["f1_pooled"] = metrics["f1"]
        groups = defaultdict(list)
        for r in rows:
            if r["category"] is not None:
                groups[str(r["category"])].append(r)
        if groups:
            metrics["by_category"] = {c: metrics_of(rs) for c, rs in sorted(groups.items())}
            metrics["f1"] = common.mean(m["f1"] for m in metrics["by_category"].values())
        metrics.update(
            num_failed=sum(r["error"] is not None for r in rows),
            num_unparsed=sum(r["error"] is None and r["extracted"] is None for r in rows),
            **self.report.metrics())
        return {"metrics": metrics, "per_sample": rows}
