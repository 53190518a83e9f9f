"""Multiple-choice benchmarks: MMBench, SEED-Bench, ScienceQA-IMG, MVBench, Video-MME.

The model answers in free text; `extract_choice` turns "B", "(B)", "B.", "The answer is B",
"Answer: C) blue" or an answer that is one option's text into an option letter. A sample is correct
when the extracted letter is the answer letter.

MMBench circular evaluation: rows whose `index` agrees modulo 1,000,000 (the official circular
copies) or rotations made with `rotate=True` (LLaVA's "all rounds") form one group, and a question
counts as correct only if every row of its group is.

Files read by `load`, per `format`:
  "mmbench"     MMBench .tsv (or .jsonl) with `index, question, hint, A..D, answer, category`,
                images base64-encoded in `image` (written under `image_cache_dir` when given, else
                kept in metadata["image_base64"]) or given as paths.
  "seed_bench"  LLaVA's SEED-Bench question JSONL + SEED-Bench.json (`questions[].answer`,
                `choice_a..choice_d`, `question_type_id`).
  "scienceqa"   ScienceQA `problems.json` (+ `pid_splits.json` as annotations; image questions of
                `split` only) or LLaVA's `llava_test_CQM-A.json` conversation file.
  "mvbench"     MVBench task JSONs (`video, question, candidates, answer`), a file or a folder.
  "videomme"    Video-MME records (`videoID, question, options ["A. ..."], answer, task_type`).
  "generic"     any records with a question, options (list, `A..`/`choice_a..` fields, or "A. ..."
                lines in the text) and an answer (letter, option text or 0-based index).
"""

from __future__ import annotations

import base64
import glob
import numbers
import os
import re
import string
from collections import defaultdict
from typing import Any, Sequence

import lavi_jax.eval.scorers.common as common

LETTERS = string.ascii_uppercase

# ----------------------------------------------------------------------------- extraction

_BARE = re.compile(r"[\s(\[{*'\"]*([A-Za-z])[\s)\]}.:*'\",]*")
_KEYWORD = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:：]?\s*"
                      r"[(\[]?([A-Z])(?![A-Za-z'])")
_LEADING = re.compile(r"[(\[]?([A-Z])[)\].:：]")
_LONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _norm_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _match_option_text(text: str, options: Sequence[str]) -> int | None:
    pred = _norm_text(text)
    norms = [_norm_text(o) for o in options]
    exact = [i for i, o in enumerate(norms) if o and o == pred]
    if len(exact) == 1:
        return exact[0]
    found = [i for i, o in enumerate(norms) if o and f" {o} " in f" {pred} "]
    # "dark red" contains "red": keep only matches not inside another match.
    found = [i for i in found
             if not any(j != i and f" {norms[i]} " in f" {norms[j]} " for j in found)]
    return found[0] if len(found) == 1 else None


def extract_choice(text: str | None, options: Sequence[str] | None = None,
                   letters: str | None = None) -> str | None:
    """The option letter a free-form answer picks, or None when none can be told."""
    if text is None:
        return None
    if letters is None:
        letters = LETTERS[:len(options)] if options else LETTERS[:8]
    s = str(text).strip()
    if not s:
        return None
    m = _BARE.fullmatch(s)  # "B", "(B)", "B.", "b"
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = _KEYWORD.search(s)  # "The answer is B", "Answer: C) blue", "option (D)"
    if m and m.group(1) in letters:
        return m.group(1)
    m = _LEADING.match(s)  # "B. blue", "(B) blue", "C) blue"
    if m and m.group(1) in letters:
        return m.group(1)
    if options:
        i = _match_option_text(s, options)
        if i is not None:
            return letters[i]
    lone = set()
    for m in _LONE.finditer(s):
        # An "A" followed by a lower-case word is the article, not option A.
        if m.group(1) == "A" and re.match(r"\s+[a-z]", s[m.end():]):
            continue
        if m.group(1) in letters:
            lone.add(m.group(1))
    return lone.pop() if len(lone) == 1 else None


# ----------------------------------------------------------------------------- records


def build_prompt(question: str, options: Sequence[str], hint: str | None = None,
                 suffix: str | None = common.OPTION_LETTER_PROMPT) -> str:
    """LLaVA's layout: [hint]\\nquestion\\nA. opt\\nB. opt ...\\nsuffix."""
    lines = ([hint] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return common.with_suffix("\n".join(lines), suffix)


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.*?)\s*$")
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|\n|$)")


def options_from_text(text: str) -> list[str]:
    """Options written in a prompt as "A. x" lines or inline "(A) x (B) y"; [] if none."""
    found = {}
    for line in text.split("\n"):
        m = _OPTION_LINE.match(line)
        if m and m.group(1) == LETTERS[len(found)]:
            found[m.group(1)] = m.group(2)
    if len(found) < 2:
        found = {}
        for m in _INLINE_OPTION.finditer(text):
            if m.group(1) == LETTERS[len(found)]:
                found[m.group(1)] = m.group(2)
    return list(found.values()) if len(found) >= 2 else []


def _strip_letter(option: str, i: int) -> str:
    m = re.match(rf"\s*\(?{LETTERS[i]}[.):]\s*(.*)", option, flags=re.S)
    return m.group(1).strip() if m else option.strip()


def record_options(record: dict) -> list[str]:
    for key in ("options", "candidates", "choices"):
        value = record.get(key)
        if isinstance(value, list) and value:
            return [_strip_letter(str(o), i) for i, o in enumerate(value)]
    for keys in ([f"choice_{c}" for c in "abcdefgh"], list(LETTERS[:8])):
        opts = []
        for key in keys:
            if common.is_blank(record.get(key)):
                break
            opts.append(str(record[key]))
        if opts:
            return opts
    return []


def answer_letter(value, options: Sequence[str]) -> str | None:
    """A letter from an answer given as a letter, "(B)", a 0-based index or an option's text."""
    if value is None or common.is_blank(value):
        return None
    if isinstance(value, numbers.Integral):
        return LETTERS[int(value)]
    s = str(value).strip()
    m = _BARE.fullmatch(s)
    if m:
        return m.group(1).upper()
    exact = [i for i, o in enumerate(options) if _norm_text(o) == _norm_text(s)]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    return extract_choice(s, options, LETTERS[:len(options)] if options else None)


def _image_from_cell(cell, cache_dir, name) -> tuple[Any, str | None]:
    """(path, None) for a path cell; (path or None, base64) for an encoded image."""
    if common.is_blank(cell):
        return None, None
    cell = str(cell)
    if len(cell) < 1024 and os.path.splitext(cell)[1].lower() in (".jpg", ".jpeg", ".png",
                                                                  ".webp", ".bmp", ".gif"):
        return cell, None
    if cache_dir is None:
        return None, cell
    data = base64.b64decode(cell)
    ext = ".png" if data[:4] == b"\x89PNG" else ".jpg"
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{name}{ext}")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return path, None


# ----------------------------------------------------------------------------- evaluator


class MultipleChoiceEvaluator(common.Evaluator):
    """Option-letter accuracy, optional circular grouping and per-key breakdowns."""

    def __init__(self, name: str = "multiple_choice", format: str = "generic",
                 circular: bool = False, rotate: bool = False,
                 prompt_suffix: str | None = common.OPTION_LETTER_PROMPT,
                 image_cache_dir: str | None = None, split: str = "test",
                 breakdown_keys: Sequence[str] = ("category",)):
        if format not in _LOADERS:
            raise ValueError(f"unknown multiple-choice format {format!r}")
        self.name, self.format, self.circular, self.rotate = name, format, circular, rotate
        self.prompt_suffix, self.image_cache_dir, self.split = prompt_suffix, image_cache_dir, split
        self.breakdown_keys = tuple(breakdown_keys)

    # -- loading

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        samples = _LOADERS[self.format](self, questions, annotations)
        for s in samples:
            s["image"] = common.join_root(image_root, s.get("image"))
            if s.get("video"):
                s["video"] = common.join_root(image_root, s["video"])
        return common.take(samples, limit)

    def _sample(self, rid, question, options, answer, *, text=None, hint=None, image=None,
                video=None, **meta) -> dict:
        if text and options_from_text(text):  # the prompt already lists the options
            prompt = common.with_suffix(text.replace("<image>", "").strip(), self.prompt_suffix)
        else:
            prompt = build_prompt(question, options, hint, self.prompt_suffix)
        meta = {k: v for k, v in meta.items() if v is not None}
        meta.setdefault("question", question)
        sample = {"id": str(rid), "image": image, "prompt": prompt, "options": list(options),
                  "answer": answer_letter(answer, options), "metadata": meta}
        if video is not None:
            sample["video"] = video
        return sample

    def _generic(self, record: dict, **overrides) -> dict:
        text = common.first_present(record, "text", "prompt")
        question = common.first_present(record, "question", default=None)
        options = record_options(record) or (options_from_text(text) if text else [])
        if question is None:
            question = common.first_line(text or "")
        kw = dict(text=text, hint=common.first_present(record, "hint"),
                  image=record.get("image"), video=record.get("video"),
                  category=common.first_present(record, "category", "task_type"))
        kw.update(overrides)
        rid = common.first_present(record, "question_id", "id", "index", "qid")
        return self._sample(rid, question, options,
                            common.first_present(record, "answer", "label"), **kw)

    # -- scoring

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        rows = []
        for s in samples:
            if s.get("answer") is None:
                raise ValueError(f"sample {s['id']} has no answer letter")
            text, error = common.resolve(preds, fails, s["id"])
            letters = LETTERS[:len(s["options"])] if s.get("options") else None
            choice = None if error else extract_choice(text, s.get("options"), letters)
            row = {"id": s["id"], "prediction": text, "extracted": choice, "target": s["answer"],
                   "correct": choice == s["answer"], "error": error,
                   "group": s.get("metadata", {}).get("group", s["id"])}
            for key in self.breakdown_keys:
                if key in s.get("metadata", {}):
                    row[key] = s["metadata"][key]
            rows.append(row)
        metrics: dict[str, Any] = {"accuracy": common.mean(r["correct"] for r in rows),
                                   "num_samples": len(rows),
                                   "num_failed": sum(r["error"] is not None for r in rows),
                                   "num_unparsed": sum(r["error"] is None and r["extracted"] is None
                                                       for r in rows)}
        if self.circular:
            groups = defaultdict(list)
            for r in rows:
                groups[str(r["group"])].append(r["correct"])
            metrics["circular_accuracy"] = common.mean(all(v) for v in groups.values())
            metrics["num_groups"] = len(groups)
        for key in self.breakdown_keys:
            by = common.breakdown(rows, key, lambda r: float(r["correct"]))
            if by:
                metrics[f"by_{key}"] = by
        return {"metrics": metrics, "per_sample": rows}


# ----------------------------------------------------------------------------- loaders


def _load_generic(ev, questions, annotations):
    records = _as_list(common.read_any(questions))
    answers = {}
    if annotations is not None:
        for r in _as_list(common.read_any(annotations)):
            answers[str(common.first_present(r, "question_id", "id", "index", "qid"))] = r
    out = []
    for r in records:
        rid = str(common.first_present(r, "question_id", "id", "index", "qid"))
        out.append(ev._generic({**answers.get(rid, {}), **r} if answers else r))
    return out


def _load_mmbench(ev, questions, annotations):
    out = []
    for row in _as_list(common.read_any(questions)):
        index = int(float(row["index"]))
        options = record_options(row)
        image, b64 = _image_from_cell(row.get("image"), ev.image_cache_dir, index)
        answer = common.first_present(row, "answer")
        truth = answer_letter(answer, options)
        hint = common.first_present(row, "hint")
        meta = dict(category=common.first_present(row, "category"),
                    l2_category=common.first_present(row, "l2-category"),
                    split=common.first_present(row, "split"), image_base64=b64,
                    group=index % 1_000_000, index=index)
        rounds = len(options) if ev.rotate else 1
        for r in range(rounds):
            rotated = options[r:] + options[:r]
            ans = None if truth is None else (LETTERS.index(truth) - r) % len(options)
            rid = index if r == 0 else f"{index}@{r}"
            out.append(ev._sample(rid, str(row["question"]), rotated, ans, hint=hint,
                                  image=image, rotation=r, **meta))
    return out


def _load_seed_bench(ev, questions, annotations):
    truth, type_names = {}, {}
    if annotations is not None:
        data = common.read_any(annotations)
        type_names = {v: k for k, v in data.get("question_type", {}).items()}
        truth = {str(q["question_id"]): q for q in data["questions"]}
    data = common.read_any(questions)
    if isinstance(data, dict):  # SEED-Bench.json alone
        type_names = {v: k for k, v in data.get("question_type", {}).items()}
        truth = {str(q["question_id"]): q for q in data["questions"]}
        data = data["questions"]
    out = []
    for r in data:
        gt = truth.get(str(r["question_id"]), {})
        merged = {**gt, **{k: v for k, v in r.items() if k != "answer" or not gt}}
        type_id = merged.get("question_type_id")
        category = merged.get("category") or type_names.get(type_id, type_id)
        image = merged.get("image") or merged.get("data_id")
        out.append(ev._generic(merged, category=category, image=image,
                               data_type=merged.get("data_type")))
    return out


def _load_scienceqa(ev, questions, annotations):
    data = common.read_any(questions)
    out = []
    if isinstance(data, list):  # LLaVA conversation file
        for r in data:
            if not r.get("image"):
                continue
            human = r["conversations"][0]["value"]
            gpt = r["conversations"][1]["value"] if len(r["conversations"]) > 1 else None
            options = options_from_text(human)
            out.append(ev._sample(r["id"], common.first_line(human.replace("<image>", "")),
                                  options, gpt, text=human, image=r["image"]))
        return out
    split_ids = None
    if annotations is not None:
        split_ids = {str(p) for p in common.read_any(annotations)[ev.split]}
    for pid, p in data.items():
        if not p.get("image") or (split_ids is not None and str(pid) not in split_ids):
            continue
        if split_ids is None and p.get("split", ev.split) != ev.split:
            continue
        out.append(ev._sample(pid, p["question"], p["choices"], int(p["answer"]),
                              hint=p.get("hint") or None,
                              image=f"{p.get('split', ev.split)}/{pid}/{p['image']}",
                              category=p.get("subject")))
    return out


def _load_mvbench(ev, questions, annotations):
    files = (sorted(glob.glob(os.path.join(questions, "*.json"))) if os.path.isdir(questions)
             else [questions])
    out = []
    for path in files:
        task = os.path.splitext(os.path.basename(path))[0]
        for i, r in enumerate(common.read_any(path)):
            out.append(ev._generic({"id": f"{task}/{i}", **r, "text": None},
                                   category=r.get("task", task)))
    return out


def _load_videomme(ev, questions, annotations):
    out = []
    for r in _as_list(common.read_any(questions)):
        video = r.get("video") or (f"{r['videoID']}.mp4" if "videoID" in r else None)
        out.append(ev._generic({**r, "text": None}, video=video, image=None,
                               category=r.get("task_type"), duration=r.get("duration"),
                               domain=r.get("domain")))
    return out


def _as_list(data) -> list[dict]:
    if isinstance(data, dict):
        for key in ("questions", "data", "annotations"):
            if isinstance(data.get(key), list):
                return data[key]
        return [{"id": k, **v} for k, v in data.items()]
    return list(data)


_LOADERS = {"generic": _load_generic, "mmbench": _load_mmbench, "seed_bench": _load_seed_bench,
            "scienceqa": _load_scienceqa, "mvbench": _load_mvbench, "videomme": _load_videomme}
