"""The README demo: synthetic VQA data, one training run per fusion, a side-by-side accuracy table."""

from __future__ import annotations

import collections
import copy
import time

import jax
from jax.experimental import multihost_utils

from lavi_jax import eval as evaluation, sharding, storage
from lavi_jax.data import load_records, make_components
from lavi_jax.demo.synthetic import QUESTION_TYPES, SHAPES, write_synthetic_vqa
from lavi_jax.models.lavi import LaVi
from lavi_jax.train import train


def majority_rate(records) -> float:
    """Accuracy of always giving the most common answer per question type and shape named:
    the best a model that ignores the image can do."""
    by_kind = collections.defaultdict(collections.Counter)
    for r in records:
        question = r["conversations"][-2]["value"]
        by_kind[r["question_type"], next((s for s in SHAPES if s in question), "")][r["answer"]] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(len(records), 1)


def by_question_type(records, correct: dict[int, bool]) -> dict[str, float]:
    """``{"exact_match/<question_type>": accuracy}`` over the evaluated records."""
    hits = collections.defaultdict(list)
    for index, ok in correct.items():
        hits[records[index]["question_type"]].append(ok)
    return {f"exact_match/{kind}": sum(v) / len(v) for kind, v in sorted(hits.items())}


def _read_json(path: str):
    try:
        return storage.read_json(path)
    except (OSError, ValueError):  # absent or unreadable: the data is written anew
        return None


def check_config(config) -> None:
    """The demo writes its own data: a data path set by the user would be ignored, so it stops instead."""
    given = [k for k in ("train_json", "eval_json", "image_root") if config.data.get(k)]
    if given:
        raise ValueError(f"the demo trains on its own synthetic data, but config.data.{given[0]} is set: "
                         f"to train on your data run `python train.py --config configs/demo.py "
                         f"--config.data.train_json=... --config.data.image_root=...` (conversations of mixed "
                         f"length: add --config.data.packing=True to pack several per row)")


def write_data(config, data_dir: str) -> dict[str, str]:
    """Writes the synthetic set (process 0, only when its spec changed); -> its paths."""
    d = config.demo
    spec = {"num_train": d.num_train, "num_eval": d.num_eval, "seed": d.seed, "image_size": d.image_size,
            "train_turns": d.train_turns, "train_kinds": list(d.train_kinds), "grid": d.grid,
            "sentences": d.sentences, "jitter": d.jitter}
    paths = {"train_json": storage.join(data_dir, "train.json"), "eval_json": storage.join(data_dir, "eval.json"),
             "image_root": data_dir}
    if jax.process_index() == 0 and _read_json(storage.join(data_dir, "spec.json")) != spec:
        write_synthetic_vqa(data_dir, **dict(spec, train_kinds=tuple(spec["train_kinds"])))
        storage.write_json(storage.join(data_dir, "spec.json"), spec)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo data written")
    return paths


def run(config, workdir: str) -> dict:
    """Trains one model per ``config.demo.fusions`` in ``workdir/<fusion>`` and prints their held-out exact match
    per question type next to the majority-answer rate. -> ``{fusion: metrics}``."""
    check_config(config)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.update(write_data(config, storage.join(workdir, "data")))
    eval_records = load_records(config.data.eval_json)
    results = {}
    for fusion in config.demo.fusions:
        run_config = copy.deepcopy(config)
        with run_config.unlocked():
            run_config.model.fusion = fusion
            run_config.evals.exact_match = False  # evaluated below, with the per-type breakdown
        t0 = time.time()
        state, out = train(run_config, storage.join(workdir, fusion))
        tokenizer, processor = make_components(run_config)
        mesh = sharding.make_mesh(run_config.mesh.to_dict())  # the mesh train() placed the params on
        scores, correct = evaluation.evaluate_exact_match(run_config, LaVi(run_config.model), state.params, mesh,
                                                          tokenizer, processor)
        out.update(scores, **by_question_type(eval_records, correct))
        out["wall_seconds"] = time.time() - t0
        results[fusion] = out
    majority = majority_rate(eval_records)
    if jax.process_index() == 0:
        print_table(results, majority, len(eval_records))
        storage.write_json(storage.join(workdir, "demo_results.json"), {"majority_rate": majority, "results": results},
                           indent=1)
    return results


def print_table(results: dict, majority: float, num_questions: int) -> None:
    kinds = [k for k in QUESTION_TYPES if any(f"exact_match/{k}" in r for r in results.values())]
    print()
    print(f"held-out exact match on {num_questions} synthetic VQA questions (majority-answer rate {majority:.1%})")
    print(f"{'fusion':<12}{'all':>8}" + "".join(f"{k:>8}" for k in kinds) + f"{'loss':>9}{'seconds':>9}")
    for fusion, r in results.items():
        print(f"{fusion:<12}{r.get('exact_match', 0):>8.1%}" + "".join(f"{r.get('exact_match/' + k, 0):>8.1%}" for k in kinds)
              + f"{r.get('loss', float('nan')):>9.4f}{r['wall_seconds']:>9.0f}")
