"""The ``llava_json`` task: held-out LLaVA-format conversations, scored by exact match."""

from __future__ import annotations

from typing import Any

from lavi_jax.data.llava import prepare_conversation
from lavi_jax.data.records import load_records, parse_record
import lavi_jax.eval.scorers.common as common
from lavi_jax.eval.scorers.vqa import match_accuracy


class LlavaJsonEvaluator(common.Evaluator):
    """Held-out LLaVA conversations. Prompt: every turn before the last (assistant) turn; target: that turn.

    Metrics: ``exact_match`` (stripped prediction equals the stripped target),
    ``normalized_match`` (equal after the VQA answer normalisation), and both
    per ``question_type`` when the records have one.
    """

    def __init__(self, name: str = "llava_json", breakdown_key: str = "question_type"):
        self.name, self.breakdown_key = name, breakdown_key

    def load(self, questions, annotations=None, *, image_root=None, limit=None) -> list[dict]:
        samples = []
        for index, raw in enumerate(common.take(load_records(questions), limit)):
            sample = {"id": f"#{index}", "prompt": "", "answers": [""], "metadata": {}}
            try:
                record = parse_record(raw)
                sample["id"] = str(record.get("id", sample["id"]))
                images, videos = common.as_list(record.get("image")), common.as_list(record.get("video"))
                turns = prepare_conversation(record.get("conversations"), len(images) + len(videos))
                if turns[-1]["from"] not in ("gpt", "assistant"):
                    raise ValueError("the last turn is not an assistant answer")
                sample.update(image=common.join_root(image_root, images) or None,
                              video=common.join_root(image_root, videos) or None,
                              conversation=turns[:-1], prompt=turns[-2]["value"] if len(turns) > 1 else "",
                              answers=[turns[-1]["value"]], answer=turns[-1]["value"])
                if record.get(self.breakdown_key) is not None:
                    sample["metadata"][self.breakdown_key] = record[self.breakdown_key]
            except Exception as e:  # a bad record is a failed sample, not a failed run
                sample["error"] = f"{type(e).__name__}: {e}"
            samples.append(sample)
        ids = common.unique_ids([s["id"] for s in samples])
        for s, i in zip(samples, ids):
            s["id"] = i
        return samples

    def score(self, samples, predictions, failures=None) -> dict:
        preds, fails = common.normalize_predictions(predictions), common.normalize_predictions(failures)
        rows = []
        for s in samples:
            text, error = common.resolve(preds, fails, s["id"])
            target = s["answers"][0]
            row = {"id": s["id"], "prediction": text, "target": target, "error": error,
                   "correct": error is None and text.strip() == target.strip(),
                   "normalized_correct": error is None and match_accuracy(text, [target], "normalized") == 1.0}
            if self.breakdown_key in s.get("metadata", {}):
                row[self.breakdown_key] = s["metadata"][self.breakdown_key]
            rows.append(row)
        metrics: dict[str, Any] = {"exact_match": common.mean(r["correct"] for r in rows),
                                   "normalized_match": common.mean(r["normalized_correct"] for r in rows),
                                   "num_samples": len(rows), "num_failed": sum(r["error"] is not None for r in rows)}
        by = common.breakdown(rows, self.breakdown_key, lambda r: float(r["correct"]))
        if by:
            metrics[f"by_{self.breakdown_key}"] = by
        return {"metrics": metrics, "per_sample": rows}
