"""Open-ended VQA: VQAv2 and TextVQA as lmms-eval 0.7.3 scores them, GQA as LLaVA does.

Metrics (`metric=`), each named in results files by its `convention`:
  "vqa_soft"     VQAv2, lmms-eval `tasks/vqav2/utils.py` `vqav2_process_results` (default of
                 "vqav2" and "vqa"). Prediction and human answers both go through
                 `vqa_normalize.normalize_answer` (punctuation, then number words / articles /
                 contractions); acc = mean over the n leave-one-out subsets of the human answers of
                 min(1, matches / 3). With 10 answers and k matching: 0, 0.3, 0.6, 0.9, then 1.
  "evalai_soft"  TextVQA, lmms-eval `tasks/textvqa/utils.py` `textvqa_process_results` (default of
                 "textvqa"): the same accuracy with the full EvalAI processor
                 (`vqa_normalize.evalai_answer`, which first deletes "," and "?").
  "exact_match"  GQA, lmms-eval `tasks/gqa/gqa.yaml` (an option): the prediction stripped,
                 then both sides lower-cased with every ASCII punctuation mark deleted
                 (`exact_match` with ignore_case and ignore_punctuation), and compared.
  "llava_gqa"    GQA as the LLaVA papers score it (default of "gqa"): `scripts/convert_gqa_for_eval.py`
                 (trailing periods stripped, lower case) and exact match against the answer, as
                 GQA's `eval.py`.
  "exact", "normalized"  lenient, never a default: strip + trailing "." + lower, or the VQAv2
                 normalisation, equal to any target.

Departures followed from lmms-eval, not the official scripts (VQAv2, TextVQA):
  - VQAv2: the official `vqaEval.py` processes the human answers only when they disagree (and, in
    GT-Vision-Lab's version, with the punctuation step only); lmms-eval always applies both steps
    to both sides. lmms-eval drops from each leave-one-out subset every answer record equal to the
    left-out one; the VQAv2 records carry distinct `answer_id`s, so that is exactly one, as here.
    Means use `statistics.mean` as lmms-eval does (the official script uses sum / len).
    A question with a single human answer therefore scores 0, as in the reference.
  - TextVQA: same processor and accuracy as the official MMF/EvalAI evaluator, which scores each
    distinct answer; identical up to float rounding of the mean.
  - GQA follows LLaVA, not lmms-eval: LLaVA strips only trailing periods, keeps other punctuation
    and leading/trailing spaces; lmms-eval deletes all ASCII punctuation on both sides and strips
    the prediction, so e.g. "yes!" or "t-shirt" vs "tshirt" match in lmms-eval and not in LLaVA.
  - All: lmms-eval strips the model output before scoring; so does this scorer.

Files read by `load` (auto-detected):
  questions    LLaVA question JSONL (`question_id`, `image`, `text`, ...), the official VQAv2
               questions JSON (`{"questions": [...], "data_subtype": "val2014"}`), a TextVQA JSON
               (`{"data": [...]}`) or a GQA questions JSON (`{qid: {"imageId", "question", ...}}`).
  annotations  VQAv2 annotations JSON (`annotations[].answers[].answer`), TextVQA JSON (`data[]
               .answers`), GQA questions JSON (`answer`), or records with `answer` / `answers`.
               Optional when the question records carry their answers.
"""

from __future__ import annotations

import logging
import os
import statistics
import string
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import lavi_jax.eval.scorers.common as common
from lavi_jax.eval.scorers.vqa_normalize import evalai_answer, normalize_answer

CONVENTIONS = {"vqa_soft": "lmms-eval 0.7.3 vqav2", "evalai_soft": "lmms-eval 0.7.3 textvqa",
               "exact_match": "lmms-eval 0.7.3 gqa", "llava_gqa": "LLaVA convert_gqa_for_eval.py",
               "exact": "lenient", "normalized": "lenient"}
ANSWER_TYPES = ("yes/no", "number", "other")  # VQAv2's answer types
logger = logging.getLogger(__name__)
_SOFT = {"vqa_soft": normalize_answer, "evalai_soft": evalai_answer}
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)

# ----------------------------------------------------------------------------- scoring


def vqa_soft_accuracy(prediction: str, answers: Sequence[str],
                      process: Callable[[str], str] = normalize_answer) -> float:
    """Leave-one-out VQA accuracy of `prediction` against the human `answers` (usually 10),
    both sides passed through `process` (VQAv2 default; `evalai_answer` for TextVQA)."""
    if not answers:
        raise ValueError("no ground-truth answers")
    pred = process(prediction.strip())
    hits = [process(a) == pred for a in answers]
    total = sum(hits)
    return statistics.mean(min(1, float(total - hit) / 3) for hit in hits)


def _numpy_lower_no_punct(text: str) -> str:
    # lmms-eval does this with numpy string arrays: trailing NULs are lost, and lower-casing keeps
    # the input's length (a character whose lower case is longer, like "İ", pushes the tail out).
    text = text.rstrip("\x00")
    return text.lower()[:len(text)].translate(_ASCII_PUNCTUATION)


def gqa_exact_match(prediction: str, answer: str) -> bool:
    """lmms-eval's GQA `exact_match` (ignore_case, ignore_punctuation) on a stripped output."""
    return _numpy_lower_no_punct(prediction.strip()) == _numpy_lower_no_punct(answer)


def llava_gqa_match(prediction: str, answer: str) -> bool:
    """LLaVA's `convert_gqa_for_eval.py` (rstrip "." then lower) and GQA's exact comparison."""
    return prediction.rstrip(".").lower() == answer


def _lenient_exact(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def match_accuracy(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Score of one prediction under `metric` (see the module docstring)."""
    if metric in _SOFT:
        return float(vqa_soft_accuracy(prediction, answers, _SOFT[metric]))
    if metric == "exact_match":
        return float(any(gqa_exact_match(prediction, a) for a in answers))
    if metric == "llava_gqa":
        return float(any(llava_gqa_match(prediction, a) for a in answers))
    form = {"exact": _lenient_exact, "normalized": normalize_answer}[metric]
    return float(form(prediction) in {form(a) for a in answers})


# ----------------------------------------------------------------------------- files


def _answer_list(value) -> list[str] | None:
    if isinstance(value, list):
        return [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in value] or None
    return None if common.is_blank(value) else [str(value)]


def _records(data) -> list[dict]:
    """Uniform records {id, image, text, answers, meta} from any supported file shape."""
    out = []
    if isinstance(data, dict) and "annotations" in data:  # VQAv2 annotations
        for a in data["annotations"]:
            meta = {k: a[k] for k in ("answer_type", "question_type", "multiple_choice_answer")
                    if k in a}
            out.append({"id": str(a["question_id"]), "answers": _answer_list(a["answers"]),
                        "image_id": a.get("image_id"), "meta": meta})
    elif isinstance(data, dict) and "questions" in data:  # VQAv2 questions
        subtype = data.get("data_subtype")
        for q in data["questions"]:
            image = (f"COCO_{subtype}_{int(q['image_id']):012d}.jpg" if subtype
                     else str(q["image_id"]))
            out.append({"id": str(q["question_id"]), "image": image, "text": q["question"],
                        "image_id": q["image_id"], "meta": {}})
    elif isinstance(data, dict) and "data" in data:  # TextVQA
        for q in data["data"]:
            out.append({"id": str(q["question_id"]), "image": f"{q['image_id']}.jpg",
                        "text": q["question"], "answers": _answer_list(q.get("answers")),
                        "image_id": q["image_id"], "meta": {}})
    elif isinstance(data, dict):  # GQA: {qid: {...}}
        for qid, q in data.items():
            meta = {"full_answer": q["fullAnswer"]} if "fullAnswer" in q else {}
            out.append({"id": str(qid), "image": f"{q['imageId']}.jpg", "text": q["question"],
                        "answers": _answer_list(q.get("answer")), "image_id": q.get("imageId"),
                        "meta": meta})
    else:  # LLaVA JSONL and other flat records
        for r in data:
            meta = {k: r[k] for k in ("category", "answer_type", "question_type") if k in r}
            out.append({"id": str(common.first_present(r, "question_id", "id", "qid")),
                        "image": r.get("image"), "video": r.get("video"),
                        "text": common.first_present(r, "text", "question", "prompt"),
                        "answers": _answer_list(common.first_present(r, "answers", "answer")),
                        "image_id": r.get("image_id"), "meta": meta})
    return out


def _read_records(path) -> list[dict]:
    """`_records` of a file, naming the file when its layout lacks a field every record needs."""
    try:
        return _records(common.read_any(path))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a VQA questions/annotations file ({type(e).__name__}: {e})") from e


def _fallback_key(image, text) -> tuple[str, str] | None:
    if image is None or text is None:
        return None
    stem = os.path.splitext(os.path.basename(str(image)))[0]
    return stem, common.first_line(text).lower()


class VQAEvaluator(common.Evaluator):
    """Open-ended VQA scored with `metric` (one of `CONVENTIONS`; see the module docstring)."""

    def __init__(self, name: str = "vqa", metric: str = "vqa_soft",
                 prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT,
                 breakdown_keys: Sequence[str] = ("answer_type", "category")):
        if metric not in CONVENTIONS:
            raise ValueError(f"unknown VQA metric {metric!r}; known: {', '.join(CONVENTIONS)}")
        self.name, self.metric, self.prompt_suffix = name, metric, prompt_suffix
        self.convention = CONVENTIONS[metric]
        self.breakdown_keys = tuple(breakdown_keys)
        self.skipped: list[dict] = []  # questions `load` left out: {"id", "reason"}
        self.input_notes: dict[str, str] = {}  # questions scored despite an oddity: id -> note

    def _skip(self, sample_id, reason: str) -> None:
        self.skipped.append({"id": str(sample_id), "reason": reason})
        logger.warning("%s: question %s skipped: %s", self.name, sample_id, reason)

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        """Samples of `questions` (+ `annotations`). A question without id, text or ground-truth answers, or
        repeating an earlier id, is left out and listed in `skipped` with the reason; an answer type VQAv2
        does not define is noted in `input_notes` and scored."""
        self.skipped, self.input_notes = [], {}
        records = _read_records(questions)
        by_id, by_key = {}, {}
        if annotations is not None:
            for a in _read_records(annotations):
                by_id[a["id"]] = a
                key = _fallback_key(a.get("image"), a.get("text"))
                if key:
                    by_key[key] = a
        samples, seen = [], set()
        for r in common.take(records, limit):
            ann = by_id.get(r["id"]) or by_key.get(_fallback_key(r.get("image"), r.get("text")))
            answers = ann["answers"] if ann and ann.get("answers") else r.get("answers")
            meta = {**r["meta"], **(ann["meta"] if ann else {})}
            reason = ("no question id" if r["id"] in ("", "None") else "duplicate id (the first is scored)"
                      if r["id"] in seen else "no question text" if not r.get("text")
                      else "no ground-truth answers" if not answers else None)
            if reason:
                self._skip(r["id"], reason)
                continue
            seen.add(r["id"])
            if meta.get("answer_type") not in (None, *ANSWER_TYPES):
                self.input_notes[r["id"]] = f"unknown answer_type {meta['answer_type']!r} (scored)"
            meta["question"] = common.first_line(r["text"] or "")
            sample = {"id": r["id"], "image": common.join_root(image_root, r.get("image")),
                      "prompt": common.with_suffix(r["text"] or "", self.prompt_suffix),
                      "answers": answers,
                      "answer": Counter(answers).most_common(1)[0][0] if answers else None,
                      "metadata": meta}
            if r.get("video"):
                sample["video"] = common.join_root(image_root, r["video"])
            samples.append(sample)
        if records and not samples and all(x["reason"] == "no ground-truth answers" for x in self.skipped):
            raise ValueError(f"{questions}: no ground-truth answers in any question; pass the annotations file")
        return samples

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        rows, skipped = [], list(self.skipped)
        for s in samples:
            if not s.get("answers"):
                skipped.append({"id": str(s["id"]), "reason": "no ground-truth answers"})
                continue
            text, error = common.resolve(preds, fails, s["id"])
            value = 0.0 if error else match_accuracy(text, s["answers"], self.metric)
            row: dict[str, Any] = {"id": s["id"], "prediction": text, "target": s["answers"],
                                   "score": value, "error": error}
            if self.metric not in _SOFT:
                row["correct"] = value == 1.0
            for key in self.breakdown_keys:
                if key in s.get("metadata", {}):
                    row[key] = s["metadata"][key]
            rows.append(row)
        metrics: dict[str, Any] = {"accuracy": common.mean(r["score"] for r in rows),
                                   "num_samples": len(rows),
                                   "num_failed": sum(r["error"] is not None for r in rows),
                                   "num_skipped": len(skipped), "skipped": skipped}
        if self.input_notes:
            metrics["input_notes"] = dict(self.input_notes)
        for key in self.breakdown_keys:
            by = common.breakdown(rows, key, lambda r: r["score"])
            if by:
                metrics[f"by_{key}"] = by
        return {"metrics": metrics, "per_sample": rows}
