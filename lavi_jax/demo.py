"""The README demo: synthetic VQA data, one training run per fusion, a side-by-side accuracy table."""

from __future__ import annotations

import collections
import copy
import json
import os
import time

import jax


def majority_rate(records) -> float:
    """Accuracy of always giving the most common answer per question type and shape named:
    the best a model that ignores the image can do."""
    from lavi_jax.data.synthetic import SHAPES

    by_kind = collections.defaultdict(collections.Counter)
    for r in records:
        question = r["conversations"][-2]["value"]
        by_kind[r["question_type"], next((s for s in SHAPES if s in question), "")][r["answer"]] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(len(records), 1)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run(config, workdir: str) -> dict:
    from lavi_jax import trainer
    from lavi_jax.data import load_records, synthetic, write_synthetic_vqa

    d = config.demo
    data_dir = os.path.join(workdir, "data")
    spec = {"num_train": d.num_train, "num_eval": d.num_eval, "seed": d.seed, "image_size": d.image_size,
            "train_turns": d.get("train_turns", 1), "train_kinds": list(d.get("train_kinds", synthetic.QUESTION_TYPES)),
            "grid": d.get("grid", 0), "sentences": d.get("sentences", False), "jitter": d.get("jitter", True)}
    if jax.process_index() == 0 and _read_json(os.path.join(data_dir, "spec.json")) != spec:
        write_synthetic_vqa(data_dir, **dict(spec, train_kinds=tuple(spec["train_kinds"])))
        with open(os.path.join(data_dir, "spec.json"), "w") as f:
            json.dump(spec, f)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("demo data written")
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.train_json = os.path.join(data_dir, "train.json")
        config.data.eval_json = os.path.join(data_dir, "eval.json")
        config.data.image_root = data_dir
    results = {}
    for fusion in d.fusions:
        run_config = copy.deepcopy(config)
        with run_config.unlocked():
            run_config.model.fusion = fusion
        t0 = time.time()
        out = trainer.train(run_config, os.path.join(workdir, fusion))
        out.pop("state", None)
        out["wall_seconds"] = time.time() - t0
        results[fusion] = out
    eval_records = load_records(config.data.eval_json)
    majority = majority_rate(eval_records)
    if jax.process_index() == 0:
        kinds = sorted({k.split("/")[1] for r in results.values() for k in r if k.startswith("exact_match/")})
        print()
        print(f"held-out exact match on {len(eval_records)} synthetic VQA questions (majority-answer rate {majority:.1%})")
        print(f"{'fusion':<12}{'all':>8}" + "".join(f"{k:>8}" for k in kinds) + f"{'loss':>9}{'seconds':>9}")
        for fusion, r in results.items():
            print(f"{fusion:<12}{r.get('exact_match', 0):>8.1%}" + "".join(f"{r.get('exact_match/' + k, 0):>8.1%}" for k in kinds)
                  + f"{r.get('loss', float('nan')):>9.4f}{r['wall_seconds']:>9.0f}")
        with open(os.path.join(workdir, "demo_results.json"), "w") as f:
            json.dump({"majority_rate": majority, "results": results}, f, indent=1)
    return results
