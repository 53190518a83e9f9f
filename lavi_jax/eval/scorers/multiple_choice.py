"""Multiple-choice benchmarks: MMBench, SEED-Bench, ScienceQA-IMG, MVBench, Video-MME.

Scoring follows lmms-eval 0.7.3's task code item by item (`mc_lmms_eval`), one rule per
benchmark; `convention="lenient"` swaps in the permissive extractor of `mc_lenient` instead.
Files are read by `mc_loaders` (one loader per `format`).

Where lmms-eval departs from the benchmarks' own scripts, lmms-eval is followed:
  MMBench     lmms-eval's scoring without a GPT key, `eval_result(..., eval_method="static")`
              (task mmbench_en_dev_static; convention "lmms-eval 0.7.3 mmbench_static", the
              default for mmbench and mmbench_cn): the rule-based `can_infer` of
              `mmbench_evals.py` (a lone or wrapped letter A-E, a lone "A" in an answer of more
              than three words excepted as a possible article, else the one option text inside
              the answer), and where that reads nothing, `extract_mcq_answer` over the option
              letters (so "The answer is A" reads as A). The GPT matching of lmms-eval's default
              `eval_method="openai"` (it needs the OpenAI API) is left out. Kept as an option,
              `convention="mmbench_can_infer"`: `can_infer` alone, an answer it cannot read being
              wrong (the "openai" path with GPT answering nothing). Circular evaluation as
              `eval_result`: rows whose `index` agrees modulo 1,000,000 (or LLaVA's rotations,
              `rotate=True`) form a group, a question counts only if every row of its group is
              right, and groups are those of the main rows (index < 1,000,000); copies without a
              main row are skipped.
  SEED-Bench  the official benchmark ranks the options by likelihood; lmms-eval generates and
              compares the first character of the output with the answer, ignoring case.
  ScienceQA   LLaVA's `eval_science_qa.py` takes an upper-case letter, "X. ..." or one
              "The answer is X."; lmms-eval takes the whole output equal to the letter in either
              case, or an output starting with an upper-case letter and ".".
  MVBench     the official script compares the output's first word with "(X)"; lmms-eval's
              `mcq_acc` cleans punctuation and takes "X. ..." or the first stand-alone A-E, in
              either case (so the article "a" reads as A), and leaves empty outputs out of the
              accuracy.
  Video-MME   the official `extract_characters_regex` strips answer prefixes and gives up on
              long answers; lmms-eval 0.7.3 uses its shared `extract_mcq_answer` over A-D.
  generic     ("multiple_choice") lmms-eval's `extract_mcq_answer` over the sample's letters.

Bad input: samples without an answer letter and repeated ids (the first is kept) are left out
of the metrics and listed with their reason in metrics["skipped"], as are records the loader
could not read.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import lavi_jax.eval.scorers.common as common
from lavi_jax.eval.scorers import mc_lmms_eval
from lavi_jax.eval.scorers.mc_lenient import LETTERS, extract_choice
from lavi_jax.eval.scorers.mc_loaders import (LOADERS, answer_letter, build_prompt,
                                              options_from_text, record_options)

log = logging.getLogger(__name__)

LMMS_EVAL = "lmms-eval 0.7.3"
DEFAULT_RULE = {"generic": "mcq_extract", "mmbench": "mmbench_static",
                "seed_bench": "seed_bench", "scienceqa": "scienceqa", "mvbench": "mvbench",
                "videomme": "videomme"}

__all__ = ["DEFAULT_RULE", "LETTERS", "MultipleChoiceEvaluator", "answer_letter", "build_prompt",
           "extract_choice", "options_from_text", "record_options"]


class MultipleChoiceEvaluator(common.Evaluator):
    """Option-letter accuracy, optional circular grouping and per-key breakdowns.

    `convention`: None for the format's lmms-eval rule, a rule name of `mc_lmms_eval.RULES`
    or `mc_lmms_eval.ALIASES` (or "lmms-eval 0.7.3 <rule>"), or "lenient"; `self.convention`
    names the rule actually followed (an alias resolved).
    """

    def __init__(self, name: str = "multiple_choice", format: str = "generic",
                 circular: bool = False, rotate: bool = False,
                 prompt_suffix: str | None = common.OPTION_LETTER_PROMPT,
                 image_cache_dir: str | None = None, split: str = "test",
                 breakdown_keys: Sequence[str] = ("category",), convention: str | None = None):
        if format not in LOADERS:
            raise ValueError(f"unknown multiple-choice format {format!r}")
        self.name, self.format, self.circular, self.rotate = name, format, circular, rotate
        self.prompt_suffix, self.image_cache_dir, self.split = prompt_suffix, image_cache_dir, split
        self.breakdown_keys = tuple(breakdown_keys)
        rule = DEFAULT_RULE[format] if convention is None else convention
        if rule.startswith(LMMS_EVAL + " "):
            rule = rule[len(LMMS_EVAL) + 1:]
        rule = mc_lmms_eval.ALIASES.get(rule, rule)
        if rule != "lenient" and rule not in mc_lmms_eval.RULES:
            raise ValueError(f"unknown convention {convention!r}; known: lenient, "
                             + ", ".join(mc_lmms_eval.RULES))
        self.rule = rule
        self.convention = "lenient" if rule == "lenient" else f"{LMMS_EVAL} {rule}"
        self.skipped: list[dict] = []

    # -- loading

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        self.skipped = []
        samples = LOADERS[self.format](self, questions, annotations)
        for s in samples:
            s["image"] = common.join_root(image_root, s.get("image"))
            if s.get("video"):
                s["video"] = common.join_root(image_root, s["video"])
        return common.take(samples, limit)

    def skip(self, sample_id: str, reason: str) -> None:
        """Records a question left out, with the reason (reported in metrics["skipped"])."""
        log.warning("%s: skipping %s: %s", self.name, sample_id, reason)
        self.skipped.append({"id": str(sample_id), "reason": reason})

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

    def judge(self, text: str, options: Sequence[str], answer: str) -> tuple[str | None, bool]:
        """(letter read or None, correct) for one model output under this convention."""
        if self.rule == "lenient":
            letters = LETTERS[:len(options)] if options else None
            choice = extract_choice(text, options, letters)
            return choice, choice == answer
        choice, correct = mc_lmms_eval.RULES[self.rule](text, options, answer)
        return choice, bool(correct)

    def score(self, samples, predictions, failures=None) -> dict:
        preds = common.normalize_predictions(predictions)
        fails = common.normalize_predictions(failures)
        skipped = list(self.skipped)
        rows, seen = [], set()
        for s in samples:
            if s["id"] in seen:
                skipped.append({"id": s["id"], "reason": "duplicate id (the first is scored)"})
                continue
            seen.add(s["id"])
            if s.get("answer") is None:
                skipped.append({"id": s["id"], "reason": "no answer letter (answer missing or "
                                                         "not one of the options)"})
                continue
            text, error = common.resolve(preds, fails, s["id"])
            choice, correct = (None, False) if error else self.judge(text, s.get("options") or [],
                                                                     s["answer"])
            meta = s.get("metadata", {})
            row = {"id": s["id"], "prediction": text, "extracted": choice, "target": s["answer"],
                   "correct": correct, "error": error, "group": meta.get("group", s["id"]),
                   "main": meta.get("main", True),
                   # lmms-eval's MVBench accuracy leaves out empty outputs.
                   "counted": not (self.rule == "mvbench" and text == "")}
            for key in self.breakdown_keys:
                if key in meta:
                    row[key] = meta[key]
            rows.append(row)
        for item in skipped[len(self.skipped):]:
            log.warning("%s: skipping %s: %s", self.name, item["id"], item["reason"])
        counted = [r for r in rows if r["counted"]]
        metrics: dict[str, Any] = {"accuracy": common.mean(r["correct"] for r in counted),
                                   "num_samples": len(rows),
                                   "num_failed": sum(r["error"] is not None for r in rows),
                                   "num_unparsed": sum(r["error"] is None and r["extracted"] is None
                                                       for r in rows)}
        if len(counted) != len(rows):
            metrics["num_empty_uncounted"] = len(rows) - len(counted)
        if self.circular:
            metrics.update(self._circular(rows, skipped))
        for key in self.breakdown_keys:
            by = common.breakdown(counted, key, lambda r: float(r["correct"]))
            if by:
                metrics[f"by_{key}"] = by
        metrics["num_skipped"], metrics["skipped"] = len(skipped), skipped
        return {"metrics": metrics, "per_sample": rows}

    def _circular(self, rows: list[dict], skipped: list[dict]) -> dict:
        """A group is right when all its rows are; only groups with a main row count."""
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            groups[str(r["group"])].append(r)
        mains = []
        for key, members in groups.items():
            main = [r for r in members if r["main"]]
            if not main:
                skipped.extend({"id": r["id"], "reason": "circular copy without its main "
                                "question"} for r in members)
                continue
            mains.append({**main[0], "hit": all(r["correct"] for r in members)})
        out: dict[str, Any] = {"circular_accuracy": common.mean(m["hit"] for m in mains),
                               "num_groups": len(mains)}
        for key in self.breakdown_keys:
            by = common.breakdown(mains, key, lambda m: float(m["hit"]))
            if by:
                out[f"circular_by_{key}"] = by
        return out
