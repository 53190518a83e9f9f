"""Open-ended VQA: VQAv2 / TextVQA soft accuracy, GQA exact match.

Metrics (`metric=`):
  "vqa_soft"    VQAv2 accuracy: both the prediction and the human answers go through the standard
                VQA answer normalisation, then acc = mean over the leave-one-out subsets of the n
                human answers of min(#matches in the subset / 3, 1). With 10 answers and k of them
                matching: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1. A single answer reduces
                to normalised exact match.
  "exact"       prediction.strip().rstrip('.').lower() equals a target answer (GQA's convention).
  "normalized"  VQA-normalised prediction equals a VQA-normalised target answer.

Files read by `load` (auto-detected):
  questions    LLaVA question JSONL (`question_id`, `image`, `text`, ...), the official VQAv2
               questions JSON (`{"questions": [...], "data_subtype": "val2014"}`), a TextVQA JSON
               (`{"data": [...]}`) or a GQA questions JSON (`{qid: {"imageId", "question", ...}}`).
  annotations  VQAv2 annotations JSON (`annotations[].answers[].answer`), TextVQA JSON (`data[]
               .answers`), GQA questions JSON (`answer`), or records with `answer` / `answers`.
               Optional when the question records carry their answers.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Mapping, Sequence

import lavi_jax.eval.scorers.common as common

# ----------------------------------------------------------------------------- normalisation

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions in their written form; every spelling with some apostrophes dropped maps back to it.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've
it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't
shan't she'd she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've
'twas wasn't we'd we'd've we'll we're we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# Apostrophe-free spellings that are ordinary words are left alone.
_REAL_WORDS = frozenset({"hell", "well", "were", "shell", "ill", "its", "id", "wed", "shed", "lets",
                         "hed"})


def _contraction_map() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        for mask in range(2 ** (len(parts) - 1)):  # which apostrophes are kept
            spelled = parts[0]
            for j, part in enumerate(parts[1:]):
                spelled += ("'" if mask >> j & 1 else "") + part
            if spelled != word and spelled not in _REAL_WORDS:
                table[spelled] = word
    return table


CONTRACTIONS = _contraction_map()


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        # Punctuation touching a space (or any text with "1,000"-style numbers) is deleted;
        # punctuation inside a word ("black-and-white") becomes a space.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation (lower case, punctuation, number words, articles,
    contractions): "The Two dogs!" -> "2 dogs", "dont" -> "don't", "1,000" -> "1000"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def _exact_form(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human `answers` (usually 10)."""
    if not answers:
        raise ValueError("no ground-truth answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # Leaving out answer i leaves `matches - [gts[i] == pred]` matching humans among the rest.
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


def match_accuracy(prediction: str, answers: Sequence[str], metric: str) -> float:
    if metric == "vqa_soft":
        return vqa_soft_accuracy(prediction, answers)
    form = {"exact": _exact_form, "normalized": normalize_answer}[metric]
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


def _fallback_key(image, text) -> tuple[str, str] | None:
    if image is None or text is None:
        return None
    stem = os.path.splitext(os.path.basename(str(image)))[0]
    return stem, common.first_line(text).lower()


class VQAEvaluator(common.Evaluator):
    """Open-ended VQA scored with `metric` ("vqa_soft" | "exact" | "normalized")."""

    def __init__(self, name: str = "vqa", metric: str = "vqa_soft",
                 prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT,
                 breakdown_keys: Sequence[str] = ("answer_type", "category")):
        if metric not in ("vqa_soft", "exact", "normalized"):
            raise ValueError(f"unknown VQA metric {metric!r}")
        self.name, self.metric, self.prompt_suffix = name, metric, prompt_suffix
        self.breakdown_keys = tuple(breakdown_keys)

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        records = _records(common.read_any(questions))
        by_id, by_key = {}, {}
        if annotations is not None:
            for a in _records(common.read_any(annotations)):
                by_id[a["id"]] = a
                key = _fallback_key(a.get("image"), a.get("text"))
                if key:
                    by_key[key] = a
        samples = []
        for r in common.take(records, limit):
            ann = by_id.get(r["id"]) or by_key.get(_fallback_key(r.get("image"), r.get("text")))
            answers = ann["answers"] if ann and ann.get("answers") else r.get("answers")
            meta = {**r["meta"], **(ann["meta"] if ann else {})}
            meta["question"] = common.first_line(r["text"] or "")
            sample = {"id": r["id"], "image": common.join_root(image_root, r.get("image")),
                      "prompt": common.with_suffix(r["text"] or "", self.prompt_suffix),
                      "answers": answers,
                      "answer": Counter(answers).most_common(1)[0][0] if answers else None,
                      "metadata": meta}
            if r.get("video"):
                sample["video"] = common.join_root(image_root, r["video"])
            samples.append(sample)
        return samples

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        rows = []
        for s in samples:
            if not s.get("answers"):
                raise ValueError(f"sample {s['id']} has no ground-truth answers")
            text, error = common.resolve(preds, fails, s["id"])
            value = 0.0 if error else match_accuracy(text, s["answers"], self.metric)
            row: dict[str, Any] = {"id": s["id"], "prediction": text, "target": s["answers"],
                                   "score": value, "error": error}
            if self.metric != "vqa_soft":
                row["correct"] = value == 1.0
            for key in self.breakdown_keys:
                if key in s.get("metadata", {}):
                    row[key] = s["metadata"][key]
            rows.append(row)
        metrics: dict[str, Any] = {"accuracy": common.mean(r["score"] for r in rows),
                                   "num_samples": len(rows),
                                   "num_failed": sum(r["error"] is not None for r in rows)}
        for key in self.breakdown_keys:
            by = common.breakdown(rows, key, lambda r: r["score"])
            if by:
                metrics[f"by_{key}"] = by
        return {"metrics": metrics, "per_sample": rows}
