"""Reading multiple-choice benchmark files into samples, one loader per file format.

  "mmbench"     MMBench .tsv (or .jsonl) with `index, question, hint, A..D, answer, category`,
                images base64-encoded in `image` (written under `image_cache_dir` when given, else
                kept in metadata["image_base64"]) or given as paths.
  "seed_bench"  LLaVA's SEED-Bench question JSONL + SEED-Bench.json (`questions[].answer`,
                `choice_a..choice_d`, `question_type_id`), or records with those fields.
  "scienceqa"   ScienceQA `problems.json` (+ `pid_splits.json` as annotations; image questions of
                `split` only) or LLaVA's `llava_test_CQM-A.json` conversation file.
  "mvbench"     MVBench task JSONs (`video, question, candidates, answer`), a file or a folder;
                the answer letter is that of the first candidate equal to `answer`, as lmms-eval.
  "videomme"    Video-MME records (`videoID, question, options ["A. ..."], answer, task_type`).
  "generic"     any records with a question, options (list, `A..`/`choice_a..` fields, or "A. ..."
                lines in the text) and an answer (letter, option text or 0-based index).

A record without an id or a question is left out and reported through `ev.skip(id, reason)`.
"""

from __future__ import annotations

import base64
import numbers
import os
import re
from typing import Any, Sequence

import lavi_jax.eval.scorers.common as common
from lavi_jax import storage
from lavi_jax.eval.scorers.mc_lenient import BARE, LETTERS, extract_choice, norm_text


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
        return LETTERS[int(value)] if 0 <= int(value) < len(LETTERS) else None
    s = str(value).strip()
    m = BARE.fullmatch(s)
    if m:
        return m.group(1).upper()
    exact = [i for i, o in enumerate(options) if norm_text(o) == norm_text(s)]
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
    storage.makedirs(cache_dir)
    path = storage.join(cache_dir, f"{name}{ext}")
    if not storage.exists(path):
        storage.write_bytes(path, data)
    return path, None


def load_generic(ev, questions, annotations):
    records = as_list(common.read_any(questions))
    answers = {}
    if annotations is not None:
        for r in as_list(common.read_any(annotations)):
            answers[str(common.first_present(r, "question_id", "id", "index", "qid"))] = r
    out = []
    for r in records:
        rid = str(common.first_present(r, "question_id", "id", "index", "qid"))
        out.append(ev._generic({**answers.get(rid, {}), **r} if answers else r))
    return out


def load_mmbench(ev, questions, annotations):
    out = []
    for n, row in enumerate(as_list(common.read_any(questions))):
        try:
            index = int(float(row["index"]))
        except (KeyError, TypeError, ValueError):
            ev.skip(f"row {n}", f"no usable index ({row.get('index')!r})")
            continue
        if common.is_blank(row.get("question")):
            ev.skip(str(index), "no question")
            continue
        options = record_options(row)
        image, b64 = _image_from_cell(row.get("image"), ev.image_cache_dir, index)
        truth = answer_letter(common.first_present(row, "answer"), options)
        hint = common.first_present(row, "hint")
        meta = dict(category=common.first_present(row, "category"),
                    l2_category=common.first_present(row, "l2-category", "L2-category"),
                    split=common.first_present(row, "split"), image_base64=b64,
                    group=index % 1_000_000, index=index)
        rounds = len(options) if ev.rotate else 1
        for r in range(rounds):
            rotated = options[r:] + options[:r]
            ans = None if truth is None else (LETTERS.index(truth) - r) % len(options)
            rid = index if r == 0 else f"{index}@{r}"
            out.append(ev._sample(rid, str(row["question"]), rotated, ans, hint=hint,
                                  image=image, rotation=r, main=index < 1_000_000 and r == 0,
                                  **meta))
    return out


def load_seed_bench(ev, questions, annotations):
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
    for n, r in enumerate(data):
        if "question_id" not in r:
            ev.skip(f"row {n}", "no question_id")
            continue
        gt = truth.get(str(r["question_id"]), {})
        merged = {**gt, **{k: v for k, v in r.items() if k != "answer" or not gt}}
        type_id = merged.get("question_type_id")
        category = merged.get("category") or type_names.get(type_id, type_id)
        image = merged.get("image") or merged.get("data_id")
        out.append(ev._generic(merged, category=category, image=image,
                               data_type=merged.get("data_type")))
    return out


def load_scienceqa(ev, questions, annotations):
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
        missing = [k for k in ("question", "choices", "answer") if p.get(k) is None]
        if missing:
            ev.skip(str(pid), f"missing {', '.join(missing)}")
            continue
        out.append(ev._sample(pid, p["question"], p["choices"], int(p["answer"]),
                              hint=p.get("hint") or None,
                              image=f"{p.get('split', ev.split)}/{pid}/{p['image']}",
                              category=p.get("subject")))
    return out


def load_mvbench(ev, questions, annotations):
    files = (storage.glob(storage.join(questions, "*.json")) if storage.isdir(questions)
             else [questions])
    out = []
    for path in files:
        task = os.path.splitext(storage.basename(path))[0]
        for i, r in enumerate(common.read_any(path)):
            # lmms-eval: the first candidate equal to the answer gives the letter.
            cands = r.get("candidates") or []
            hit = [k for k, c in enumerate(cands) if c == r.get("answer")]
            out.append(ev._generic({"id": f"{task}/{i}", **r, "text": None,
                                    "answer": hit[0] if hit else None},
                                   category=r.get("task", task)))
    return out


def load_videomme(ev, questions, annotations):
    out = []
    for r in as_list(common.read_any(questions)):
        video = r.get("video") or (f"{r['videoID']}.mp4" if "videoID" in r else None)
        out.append(ev._generic({**r, "text": None}, video=video, image=None,
                               category=r.get("task_type"), duration=r.get("duration"),
                               domain=r.get("domain")))
    return out


def as_list(data) -> list[dict]:
    if isinstance(data, dict):
        for key in ("questions", "data", "annotations"):
            if isinstance(data.get(key), list):
                return data[key]
        return [{"id": k, **v} for k, v in data.items()]
    return list(data)


LOADERS = {"generic": load_generic, "mmbench": load_mmbench, "seed_bench": load_seed_bench,
           "scienceqa": load_scienceqa, "mvbench": load_mvbench, "videomme": load_videomme}
