"""Yes/no benchmarks: what POPE (`pope.py`) and MME (`mme.py`) share.

Each follows its reference's answer parsing by default (`extractor="reference"`); the permissive
`extract_yes_no` below is an explicit option (`extractor="lenient"`, results name the convention
"lenient"):

    a leading "yes"/"no" word decides; otherwise a negation ("no", "not", "n't", "none", "cannot",
    ...) means no and a "yes" means yes; anything else is unreadable (None).

Bad input found by `load` (missing fields, labels that are not yes/no, repeated ids, ...) is kept
on the evaluator as `skipped` (id -> reason; those questions are left out) and `input_notes`
(id -> note; those questions are scored), logged, and copied into the metrics by `score`.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import lavi_jax.eval.scorers.common as common

EXTRACTORS = ("reference", "lenient")
_NEGATIONS = frozenset({"no", "not", "none", "nothing", "nope", "never", "neither", "nor",
                        "cannot"})
_log = logging.getLogger(__name__)


def extract_yes_no(text: str | None) -> str | None:
    """The lenient reading of a free-text answer: "yes", "no" or None."""
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


def check_extractor(extractor: str) -> str:
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    return extractor


class InputReport:
    """What `load` skipped or noted, by sample id; `metrics()` is merged into the scores."""

    def __init__(self, task: str):
        self.task, self.skipped, self.notes = task, {}, {}

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped[sample_id] = reason
        _log.warning("%s: skipped %s: %s", self.task, sample_id, reason)

    def note(self, sample_id: str, note: str) -> None:
        self.notes[sample_id] = note
        _log.warning("%s: %s: %s", self.task, sample_id, note)

    def metrics(self) -> dict:
        return {"num_skipped": len(self.skipped), "skipped": dict(self.skipped),
                "input_notes": dict(self.notes)}


def note_repeated_ids(report: InputReport, ids: Sequence[str]) -> list[str]:
    """`common.unique_ids(ids)`, noting every id that had to be made unique."""
    unique = common.unique_ids(ids)
    for given, made in zip(ids, unique):
        if given != made:
            report.note(made, f"question id {given!r} is repeated; scored as {made!r}")
    return unique


def binary_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes_ratio (share of "yes" predictions), "yes" positive.

    A ratio whose denominator is 0 is 0.0.
    """
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
            "f1": f1, "yes_ratio": sum(p == "yes" for _, p in pairs) / n if n else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "num_samples": n}

