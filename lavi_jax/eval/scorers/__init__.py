"""Benchmark scorers, shared by eval.py and in-training evaluation.

    from lavi_jax.eval import scorers
    ev = scorers.get("textvqa")
    samples = ev.load("llava_textvqa_val_v051_ocr.jsonl", "TextVQA_0.5.1_val.json",
                      image_root="train_images")
    predictions = {s["id"]: generate(s["image"], s["prompt"]) for s in samples}
    result = ev.score(samples, predictions)   # {"metrics": {...}, "per_sample": [...]}

Every evaluator has `load(questions, annotations=None, *, image_root=None, limit=None) -> samples`
and `score(samples, predictions, failures=None) -> {"metrics", "per_sample"}`; see `common`.
Accuracies are fractions in [0, 1]; MME scores are in the benchmark's points.
"""

from __future__ import annotations

from typing import Callable

from lavi_jax.eval.scorers import common, llava_json, mme, multiple_choice, pope, vqa, yes_no
from lavi_jax.eval.scorers.common import (OPTION_LETTER_PROMPT, OPTION_LETTER_PROMPT_CN,
                                        SHORT_ANSWER_PROMPT, Evaluator)
from lavi_jax.eval.scorers.llava_json import LlavaJsonEvaluator
from lavi_jax.eval.scorers.multiple_choice import MultipleChoiceEvaluator, extract_choice
from lavi_jax.eval.scorers.vqa import VQAEvaluator, normalize_answer, vqa_soft_accuracy
from lavi_jax.eval.scorers.mme import MMEEvaluator
from lavi_jax.eval.scorers.pope import POPEEvaluator
from lavi_jax.eval.scorers.yes_no import extract_yes_no

_MC = MultipleChoiceEvaluator

_REGISTRY: dict[str, Callable[..., Evaluator]] = {
    "vqa": lambda **kw: VQAEvaluator(**{"name": "vqa", **kw}),
    "vqav2": lambda **kw: VQAEvaluator(**{"name": "vqav2", "metric": "vqa_soft", **kw}),
    "textvqa": lambda **kw: VQAEvaluator(**{"name": "textvqa", "metric": "evalai_soft", **kw}),
    "gqa": lambda **kw: VQAEvaluator(**{"name": "gqa", "metric": "llava_gqa", **kw}),
    "multiple_choice": lambda **kw: _MC(**{"name": "multiple_choice", **kw}),
    "mmbench": lambda **kw: _MC(**{"name": "mmbench", "format": "mmbench", "circular": True,
                                   "breakdown_keys": ("category", "l2_category"), **kw}),
    "mmbench_cn": lambda **kw: _MC(**{"name": "mmbench_cn", "format": "mmbench",
                                      "circular": True, "prompt_suffix": OPTION_LETTER_PROMPT_CN,
                                      "breakdown_keys": ("category", "l2_category"), **kw}),
    "seed_bench": lambda **kw: _MC(**{"name": "seed_bench", "format": "seed_bench",
                                      "breakdown_keys": ("category", "data_type"), **kw}),
    "scienceqa_img": lambda **kw: _MC(**{"name": "scienceqa_img", "format": "scienceqa", **kw}),
    "mvbench": lambda **kw: _MC(**{"name": "mvbench", "format": "mvbench", **kw}),
    "videomme": lambda **kw: _MC(**{"name": "videomme", "format": "videomme",
                                    "breakdown_keys": ("category", "duration", "domain"), **kw}),
    "llava_json": lambda **kw: LlavaJsonEvaluator(**kw),
    "pope": lambda **kw: POPEEvaluator(**{"name": "pope", **kw}),
    "mme": lambda **kw: MMEEvaluator(**{"name": "mme", **kw}),
}


def get(name: str, **options) -> Evaluator:
    """The evaluator registered as `name`; `options` go to its constructor (e.g. metric=...)."""
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown evaluator {name!r}; known: {', '.join(names())}") from None
    return factory(**options)


def names() -> list[str]:
    return sorted(_REGISTRY)


def register(name: str, factory: Callable[..., Evaluator]) -> None:
    """Adds an evaluator factory (called with the options given to `get`)."""
    _REGISTRY[name.lower()] = factory


__all__ = ["Evaluator", "LlavaJsonEvaluator", "MMEEvaluator", "MultipleChoiceEvaluator", "OPTION_LETTER_PROMPT",
           "OPTION_LETTER_PROMPT_CN", "POPEEvaluator", "SHORT_ANSWER_PROMPT", "VQAEvaluator",
           "common", "extract_choice", "extract_yes_no", "get", "llava_json", "multiple_choice", "names",
           "normalize_answer", "register", "vqa", "vqa_soft_accuracy", "yes_no"]
