"""Yes/no benchmarks: POPE and MME.

`extract_yes_no` reads "yes" / "no" from free text: a leading yes/no word decides; otherwise a
negation ("no", "not", "n't", "none", "cannot", ...) means no and a "yes" means yes; else None.

POPE: "yes" is the positive class. A missing, failed or unreadable prediction is wrong, i.e. counted
as the opposite of its label (a false negative for a "yes" label, a false positive for a "no" one).
Metrics: accuracy, precision, recall, F1, yes_ratio (share of "yes" predictions), overall and per
category (random / popular / adversarial).

MME: per subtask, accuracy over questions and acc+ over images (an image counts only if all its
questions, normally one "yes" and one "no", are right); subtask score = 100 * acc + 100 * acc+;
the perception score is the sum over the 10 perception subtasks, cognition over the 4 others.

Files read by `load`:
  POPE  questions: LLaVA's `llava_pope_test.jsonl` (`question_id, image, text, category`), or the
        POPE label files themselves (`coco_pope_<category>.json`, JSON lines with `label`; a file, a
        list of files or a folder). annotations: those label files, matched by category, image and
        question (by order within a category when the texts differ).
  MME   annotations: the `MME_Benchmark_release_version` folder (`<subtask>/[images/]*.png|jpg` and
        `<subtask>/[questions_answers_YN/]*.txt` of "question<TAB>Yes|No" lines). questions:
        LLaVA's `llava_mme.jsonl` (`question_id, image, text, category`), or None to take the
        questions from the folder.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from typing import Any, Sequence

import lavi_jax.eval.scorers.common as common

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_NEGATIONS = frozenset({"no", "not", "none", "nothing", "nope", "never", "neither", "nor",
                        "cannot"})
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def extract_yes_no(text: str | None) -> str | None:
    if text is None:
        return None
    words = re.findall(r"[a-z']+", str(text).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes" if "yes" in words else None


def _label(value) -> str | None:
    return None if common.is_blank(value) else extract_yes_no(str(value))


def binary_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes_ratio with "yes" as the positive class."""
    pairs = list(zip(labels, predicted))
    tp = sum(l == "yes" and p == "yes" for l, p in pairs)
    fp = sum(l == "no" and p == "yes" for l, p in pairs)
    tn = sum(l == "no" and p == "no" for l, p in pairs)
    fn = sum(l == "yes" and p == "no" for l, p in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_samples": n}


def _rows(samples, predictions, failures, extra=()) -> list[dict]:
    preds = common.normalize_predictions(predictions)
    fails = common.normalize_predictions(failures)
    rows = []
    for s in samples:
        if s.get("answer") not in ("yes", "no"):
            raise ValueError(f"sample {s['id']} has no yes/no answer")
        text, error = common.resolve(preds, fails, s["id"])
        got = None if error else extract_yes_no(text)
        row = {"id": s["id"], "prediction": text, "extracted": got, "target": s["answer"],
               "correct": got == s["answer"], "error": error}
        meta = s.get("metadata", {})
        row.update({k: meta[k] for k in extra if k in meta})
        rows.append(row)
    return rows


def _counts(rows) -> dict[str, int]:
    return {"num_failed": sum(r["error"] is not None for r in rows),
            "num_unparsed": sum(r["error"] is None and r["extracted"] is None for r in rows)}


# ----------------------------------------------------------------------------- POPE


def _pope_files(path) -> list[str]:
    if isinstance(path, (list, tuple)):
        return [os.fspath(p) for p in path]
    path = os.fspath(path)
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.json")) +
                      glob.glob(os.path.join(path, "*.jsonl")))
    return [path]


def _pope_records(path) -> list[dict]:
    """Records of one or more files; category from the record or from `*pope_<category>.json`."""
    out = []
    for f in _pope_files(path):
        m = re.search(r"pope_([A-Za-z]+)\.jsonl?$", os.path.basename(f))
        for r in common.read_any(f):
            out.append({**r, "category": r.get("category") or (m.group(1) if m else None)})
    return out


def _pope_key(r) -> tuple:
    return (r.get("category"), os.path.basename(str(r.get("image"))),
            common.first_line(str(r.get("text", r.get("question", "")))).lower())


class POPEEvaluator(common.Evaluator):
    def __init__(self, name: str = "pope", prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT):
        self.name, self.prompt_suffix = name, prompt_suffix

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        records = _pope_records(questions)
        by_key, by_order = {}, defaultdict(list)
        if annotations is not None:
            for a in _pope_records(annotations):
                by_key[_pope_key(a)] = a["label"]
                by_order[a["category"]].append(a["label"])
        position = defaultdict(int)
        ids = [str(common.first_present(r, "question_id", "id")) for r in records]
        if len(set(ids)) < len(ids):  # label files number their questions per category
            ids = [f"{r['category']}/{i}" for r, i in zip(records, ids)]
        samples = []
        for rid, r in zip(common.unique_ids(ids), records):
            label = r.get("label")
            if label is None and annotations is not None:
                label = by_key.get(_pope_key(r))
                if label is None:
                    ordered = by_order.get(r["category"], [])
                    label = ordered[position[r["category"]]] if position[r["category"]] < len(
                        ordered) else None
            position[r["category"]] += 1
            text = str(common.first_present(r, "text", "question"))
            samples.append({"id": rid, "image": common.join_root(image_root, r.get("image")),
                            "prompt": common.with_suffix(text, self.prompt_suffix),
                            "answer": _label(label),
                            "metadata": {"category": r["category"],
                                         "question": common.first_line(text)}})
        return common.take(samples, limit)

    def score(self, samples, predictions, failures=None) -> dict:
        rows = _rows(samples, predictions, failures, extra=("category",))
        flip = {"yes": "no", "no": "yes"}

        def metrics_of(rs):
            return binary_metrics([r["target"] for r in rs],
                                  [r["extracted"] or flip[r["target"]] for r in rs])

        metrics: dict[str, Any] = {**metrics_of(rows), **_counts(rows)}
        groups = defaultdict(list)
        for r in rows:
            if r.get("category") is not None:
                groups[str(r["category"])].append(r)
        if groups:
            metrics["by_category"] = {c: metrics_of(rs) for c, rs in sorted(groups.items())}
        return {"metrics": metrics, "per_sample": rows}


# ----------------------------------------------------------------------------- MME


def mme_ground_truth(root) -> list[dict]:
    """[{category, image (relative to root), question, answer}] from the MME release folder."""
    out = []
    for cat_dir in sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.isdir(p)):
        category = os.path.basename(cat_dir)
        qa_dir, img_dir = os.path.join(cat_dir, "questions_answers_YN"), os.path.join(cat_dir,
                                                                                     "images")
        if not os.path.isdir(qa_dir):
            qa_dir, img_dir = cat_dir, cat_dir
        images = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir)
                  if f.lower().endswith(_IMAGE_EXTS)}
        for txt in sorted(glob.glob(os.path.join(qa_dir, "*.txt"))):
            stem = os.path.splitext(os.path.basename(txt))[0]
            if stem not in images:
                continue
            image = os.path.relpath(os.path.join(img_dir, images[stem]), root)
            with open(txt, encoding="utf-8") as f:
                for line in f:
                    if "\t" in line:
                        question, answer = line.rstrip("\n").rsplit("\t", 1)
                        out.append({"category": category, "image": image,
                                    "question": question.strip(), "answer": _label(answer)})
    return out


def _mme_key(category, image, question) -> tuple:
    return (str(category), os.path.splitext(os.path.basename(str(image)))[0],
            common.first_line(question))


class MMEEvaluator(common.Evaluator):
    def __init__(self, name: str = "mme", prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT):
        self.name, self.prompt_suffix = name, prompt_suffix

    def load(self, questions=None, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        if isinstance(questions, (str, os.PathLike)) and os.path.isdir(questions):
            questions, annotations = None, questions
        truth = mme_ground_truth(annotations) if annotations is not None else []
        if questions is None:
            if not truth:
                raise ValueError("MME needs a question JSONL or the MME release folder")
            records = [{"question_id": t["image"], "image": t["image"], "text": t["question"],
                        "category": t["category"], "answer": t["answer"]} for t in truth]
            image_root = image_root or annotations
        else:
            records = common.read_any(questions)
        lookup = {_mme_key(t["category"], t["image"], t["question"]): t["answer"] for t in truth}
        ids = [str(common.first_present(r, "question_id", "id", "image")) for r in records]
        samples = []
        for rid, r in zip(common.unique_ids(ids), records):
            text = str(common.first_present(r, "text", "question"))
            category = r.get("category") or str(r["image"]).split("/")[0]
            answer = common.first_present(r, "answer", "gt_answer", "label")
            if answer is None:
                answer = lookup.get(_mme_key(category, r["image"], text))
            samples.append({"id": rid, "image": common.join_root(image_root, r["image"]),
                            "prompt": common.with_suffix(text, self.prompt_suffix),
                            "answer": _label(answer),
                            "metadata": {"category": category, "image_key": str(r["image"]),
                                         "question": common.first_line(text)}})
        return common.take(samples, limit)

    def score(self, samples, predictions, failures=None) -> dict:
        rows = _rows(samples, predictions, failures, extra=("category", "image_key"))
        by_cat = defaultdict(list)
        for r in rows:
            by_cat[r["category"]].append(r)
        subtasks = {}
        for cat, rs in sorted(by_cat.items()):
            images = defaultdict(list)
            for r in rs:
                images[r["image_key"]].append(r["correct"])
            acc = common.mean(r["correct"] for r in rs)
            acc_plus = common.mean(all(v) for v in images.values())
            subtasks[cat] = {"accuracy": acc, "accuracy_plus": acc_plus,
                             "score": 100.0 * acc + 100.0 * acc_plus,
                             "num_questions": len(rs), "num_images": len(images)}
        lower = {c.lower(): v["score"] for c, v in subtasks.items()}
        metrics: dict[str, Any] = {
            "perception": sum(lower.get(c.lower(), 0.0) for c in MME_PERCEPTION),
            "cognition": sum(lower.get(c.lower(), 0.0) for c in MME_COGNITION),
            "perception_missing": [c for c in MME_PERCEPTION if c.lower() not in lower],
            "cognition_missing": [c for c in MME_COGNITION if c.lower() not in lower],
            "accuracy": common.mean(r["correct"] for r in rows), "num_samples": len(rows),
            **_counts(rows), "subtasks": subtasks}
        return {"metrics": metrics, "per_sample": rows}
