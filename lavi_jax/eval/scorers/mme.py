"""MME, scored as lmms-eval 0.7.3's `lmms_eval/tasks/mme/utils.py` (convention "lmms-eval 0.7.3 mme").

Answer parsing (`parse_mme_answer`): lower-case, strip, delete every "."; then "yes"/"no" as is;
a one-character answer "y" is yes, "n" is no, any other is "other"; a longer one is yes if its
first four characters contain "yes", else no if they contain "no", else "other". So
"The answer is yes." and "I don't think so" are "other" (wrong for either label), while "not sure"
and "Nope" are no. Ground truth: the answer lower-cased, stripped, "." deleted; it must be
"yes"/"no" (otherwise the question is skipped, with its reason).

Score per subtask: for each image (lmms-eval's `question_id`, an image path), acc = 100 * share of
its questions right and acc+ = 100 if both are right; the subtask score is the mean over its
images of acc + acc+. MME pairs the questions of an image, and lmms-eval stops on an image without
exactly two; here such an image's questions are skipped, with the reason. "perception" is the sum of
the scores of the subtasks in `MME_PERCEPTION` (names compared exactly, e.g. "OCR"); "cognition"
the sum of all the others, as lmms-eval sends every other category to its cognition metric
(`unknown_categories` lists those outside `MME_COGNITION` too). A failed or missing prediction is
wrong. Per subtask: accuracy and accuracy_plus (fractions), score, num_questions, num_images.

lmms-eval's prompt drops " Please answer yes or no." from the question before adding its post
prompt; `load` keeps the question as given (prompts are not part of scoring).

Files read by `load`: annotations, the `MME_Benchmark_release_version` folder
(`<subtask>/[images/]*.png|jpg` and `<subtask>/[questions_answers_YN/]*.txt` of
"question<TAB>Yes|No" lines); questions, LLaVA's `llava_mme.jsonl` (`question_id, image, text,
category`), or None to take the questions from the folder.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lavi_jax.eval.scorers.common as common
from lavi_jax import storage
from lavi_jax.eval.scorers import yes_no

CONVENTION = "lmms-eval 0.7.3 mme"
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def parse_mme_answer(text: str) -> str:
    """"yes", "no" or "other", as lmms-eval's MME parser reads a model's answer."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_label(value) -> str | None:
    """A ground-truth "yes"/"no" as lmms-eval normalises it, else None."""
    if not isinstance(value, str):
        return None
    label = value.lower().strip().replace(".", "")
    return label if label in ("yes", "no") else None


def mme_ground_truth(root) -> list[dict]:
    """[{category, image (relative to root), question, answer}] from the MME release folder
    (a local path or a URI; its question files are read concurrently, one request each)."""
    files = []  # (category, image relative to root, question file)
    for category in storage.listdir(root):
        cat_dir = storage.join(root, category)
        if category.startswith(".") or not storage.isdir(cat_dir):
            continue
        qa_dir, img_dir = storage.join(cat_dir, "questions_answers_YN"), storage.join(cat_dir, "images")
        sub = ("images",)
        if not storage.isdir(qa_dir):
            qa_dir, img_dir, sub = cat_dir, cat_dir, ()
        images = {os.path.splitext(f)[0]: f for f in storage.listdir(img_dir)
                  if f.lower().endswith(_IMAGE_EXTS)}
        for name in storage.listdir(qa_dir):
            stem, ext = os.path.splitext(name)
            if ext == ".txt" and not name.startswith(".") and stem in images:
                files.append((category, posixpath.join(category, *sub, images[stem]),
                              storage.join(qa_dir, name)))
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda f: common.open_text(f[2]).read(), files))
    out = []
    for (category, image, _), text in zip(files, texts):
        for line in text.split("\n"):
            if "\t" in line:
                question, answer = line.rsplit("\t", 1)
                out.append({"category": category, "image": image,
                            "question": question.strip(), "answer": answer})
    return out


def _key(category, image, question) -> tuple:
    return (str(category), os.path.splitext(os.path.basename(str(image)))[0],
            common.first_line(question))


class MMEEvaluator(common.Evaluator):
    """MME; `extractor="lenient"` reads answers with `yes_no.extract_yes_no` instead."""

    def __init__(self, name: str = "mme", prompt_suffix: str | None = common.SHORT_ANSWER_PROMPT,
                 extractor: str = "reference"):
        self.name, self.prompt_suffix = name, prompt_suffix
        self.extractor = yes_no.check_extractor(extractor)
        self.convention = CONVENTION if extractor == "reference" else "lenient"
        self.report = yes_no.InputReport(name)

    def read(self, text: str) -> str:
        """The answer's "yes"/"no"/"other" under this evaluator's extractor."""
        if self.extractor == "reference":
            return parse_mme_answer(text)
        return yes_no.extract_yes_no(text) or "other"

    def load(self, questions=None, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        self.report = report = yes_no.InputReport(self.name)
        if isinstance(questions, (str, os.PathLike)) and storage.isdir(questions):
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
        lookup = {_key(t["category"], t["image"], t["question"]): t["answer"] for t in truth}
        ids = [str(common.first_present(r, "question_id", "id", "image")) for r in records]
        # An image's two questions share LLaVA's question_id: only repeats beyond those are noted.
        per_image = defaultdict(int)
        for i in ids:
            per_image[i] += 1
        samples = []
        for rid, r in zip(common.unique_ids(ids), records):
            text, image = common.first_present(r, "text", "question"), r.get("image")
            category = r.get("category") or (str(image).split("/")[0] if image else None)
            answer = common.first_present(r, "answer", "gt_answer", "label")
            if answer is None and text is not None and category is not None:
                answer = lookup.get(_key(category, image, str(text)))
            problem = ("no question text" if text is None else
                       "no image" if common.is_blank(image) else
                       "no answer" if answer is None else
                       f"answer {answer!r} is not yes/no" if mme_label(answer) is None else None)
            if problem:
                report.skip(rid, problem)
                continue
            text = str(text)
            samples.append({"id": rid, "image": common.join_root(image_root, image),
                            "prompt": common.with_suffix(text, self.prompt_suffix),
                            "answer": mme_label(answer),
                            "metadata": {"category": category, "image_key": str(image),
                                         "question": common.first_line(text)}})
        samples = common.take(samples, limit)
        return self._pairs_only(samples)

    def _pairs_only(self, samples: list[dict]) -> list[dict]:
        """Skips the questions of every image that does not have exactly two (lmms-eval stops)."""
        count = defaultdict(int)
        for s in samples:
            count[(s["metadata"]["category"], s["metadata"]["image_key"])] += 1
        kept = []
        for s in samples:
            n = count[(s["metadata"]["category"], s["metadata"]["image_key"])]
            if n == 2:
                kept.append(s)
            else:
                self.report.skip(s["id"], f"image {s['metadata']['image_key']!r} has {n} "
                                          "question(s); MME scores pairs")
        return kept

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        rows = []
        for s in samples:
            if s.get("answer") not in ("yes", "no"):
                raise ValueError(f"sample {s['id']} has no yes/no answer")
            text, error = common.resolve(preds, fails, s["id"])
            got = "other" if error else self.read(text)
            meta = s.get("metadata", {})
            rows.append({"id": s["id"], "prediction": text, "extracted": got,
                         "target": s["answer"], "correct": got == s["answer"], "error": error,
                         "category": meta.get("category"), "image_key": meta.get("image_key")})
        by_cat = defaultdict(lambda: defaultdict(list))
        for r in rows:
            by_cat[r["category"]][r["image_key"]].append(r["correct"])
        subtasks = {}
        for cat, images in sorted(by_cat.items(), key=lambda kv: str(kv[0])):
            acc = [sum(v) / len(v) for v in images.values()]
            plus = [float(all(v)) for v in images.values()]
            subtasks[cat] = {"accuracy": common.mean(acc), "accuracy_plus": common.mean(plus),
                             "score": common.mean(100.0 * a + 100.0 * p for a, p in zip(acc, plus)),
                             "num_questions": sum(len(v) for v in images.values()),
                             "num_images": len(images)}
        metrics: dict[str, Any] = {
            "perception": sum(v["score"] for c, v in subtasks.items() if c in MME_PERCEPTION),
            "cognition": sum(v["score"] for c, v in subtasks.items() if c not in MME_PERCEPTION),
            "perception_missing": [c for c in MME_PERCEPTION if c not in subtasks],
            "cognition_missing": [c for c in MME_COGNITION if c not in subtasks],
            "unknown_categories": sorted(str(c) for c in subtasks
                                         if c not in MME_PERCEPTION + MME_COGNITION),
            "accuracy": common.mean(r["correct"] for r in rows), "num_samples": len(rows),
            "num_failed": sum(r["error"] is not None for r in rows),
            "num_unparsed": sum(r["error"] is None and r["extracted"] == "other" for r in rows),
            "subtasks": subtasks, **self.report.metrics()}
        return {"metrics": metrics, "per_sample": rows}
