"""The README demo: synthetic VQA data, one training run per fusion, a side-by-side accuracy table.

With ``config.init.checkpoint`` set (e.g. ``configs/demo_lora.py``: a trained demo model LoRA-tuned on a
question kind it never saw, ``demo.eval_kinds``), the run starts from that checkpoint, and the table also
shows the checkpoint's own accuracy before training and the share of params that trained."""

from __future__ import annotations

import collections
import copy
import time

import jax
from jax.experimental import multihost_utils

from lavi_jax import checkpoint, eval as evaluation, lora, sharding, storage
from lavi_jax.data import load_records, make_components
from lavi_jax.demo.synthetic import COLOURS, EXTRA_TYPES, QUESTION_TYPES, SHAPES, write_synthetic_vqa
from lavi_jax.models.lavi import LaVi
from lavi_jax.train import train
from lavi_jax.train.optimizer import partition, run_patterns


def majority_rate(records) -> float:
    """Accuracy of always giving the most common answer per question type and shape or colour named:
    the best a model that ignores the image can do."""
    by_kind = collections.defaultdict(collections.Counter)
    for r in records:
        question = r["conversations"][-2]["value"]
        named = next((s for s in SHAPES + tuple(COLOURS) if s in question.split("?")[0].split()), "")
        by_kind[r["question_type"], named][r["answer"]] += 1
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
    if checkpoint.lora_spec(config) is not None and not config.init.checkpoint:
        raise ValueError("a LoRA demo tunes a trained model: train one with `python demo.py --workdir W`, then pass "
                         "--config.init.checkpoint=W/modulation")


def write_data(config, data_dir: str) -> dict[str, str]:
    """Writes the synthetic set (process 0, only when its spec changed); -> its paths."""
    d = config.demo
    spec = {"num_train": d.num_train, "num_eval": d.num_eval, "seed": d.seed, "image_size": d.image_size,
            "train_turns": d.train_turns, "train_kinds": list(d.train_kinds), "grid": d.grid,
            "sentences": d.sentences, "jitter": d.jitter}
    for key, default in (("eval_kinds", QUESTION_TYPES), ("eval_unseen", False)):  # in the spec when not default
        if key in d and d[key] != default:
            spec[key] = list(d[key]) if key == "eval_kinds" else d[key]
    paths = {"train_json": storage.join(data_dir, "train.json"), "eval_json": storage.join(data_dir, "eval.json"),
             "image_root": data_dir}
    if jax.process_index() == 0 and _read_json(storage.join(data_dir, "spec.json")) != spec:
        write_synthetic_vqa(data_dir, **dict(spec, train_kinds=tuple(spec["train_kinds"]),
                                             eval_kinds=tuple(spec.get("eval_kinds", QUESTION_TYPES))))
        storage.write_json(storage.join(data_dir, "spec.json"), spec)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo data written")
    return paths


def trainable_count(config, params) -> tuple[int, int]:
    """``(trained, base)``: params the run updates (``train.trainable`` and the LoRA adapters) and params of
    the model without adapters."""
    flat = lambda tree: jax.tree.leaves(tree)
    trained = sum(int(x.size) for x in flat(partition(params, run_patterns(config.train))[0]))
    return trained, sum(int(x.size) for x in flat(lora.split(params)[1]))


def run(config, workdir: str) -> dict:
    """Trains one model per ``config.demo.fusions`` in ``workdir/<fusion>`` and prints their held-out exact match
    per question type next to the majority-answer rate (and, from a ``config.init.checkpoint``, next to that
    checkpoint's own). -> ``{fusion: metrics}``."""
    check_config(config)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.update(write_data(config, storage.join(workdir, "data")))
    eval_records = load_records(config.data.eval_json)
    tokenizer, processor = make_components(config)
    spec = checkpoint.lora_spec(config)
    start = None
    if config.init.checkpoint:  # the model this run starts from, on the same held-out questions
        mesh = sharding.make_mesh(config.mesh.to_dict())
        start_config = checkpoint.read_config(checkpoint.resolve(config.init.checkpoint))
        params = checkpoint.restore_params(config.init.checkpoint, start_config.model, mesh)
        scores, correct = evaluation.evaluate_exact_match(config, LaVi(start_config.model), params, mesh, tokenizer,
                                                          processor)
        start = dict(scores, **by_question_type(eval_records, correct), checkpoint=config.init.checkpoint)
        del params
    results = {}
    for fusion in config.demo.fusions:
        run_config = copy.deepcopy(config)
        with run_config.unlocked():
            run_config.model.fusion = fusion
            run_config.evals.exact_match = False  # evaluated below, with the per-type breakdown
        t0 = time.time()
        state, out = train(run_config, storage.join(workdir, fusion))
        mesh = sharding.make_mesh(run_config.mesh.to_dict())  # the mesh train() placed the params on
        params = state.params if spec is None else jax.jit(lambda p: lora.merge(p, spec))(state.params)
        scores, correct = evaluation.evaluate_exact_match(run_config, LaVi(run_config.model), params, mesh,
                                                          tokenizer, processor)
        out.update(scores, **by_question_type(eval_records, correct))
        out["wall_seconds"] = time.time() - t0
        if start is not None:
            out["trainable_params"], out["model_params"] = trainable_count(run_config, state.params)
            out["steps"] = int(state.step)
        results[fusion] = out
    majority = majority_rate(eval_records)
    if jax.process_index() == 0:
        print_table(results, majority, len(eval_records), start)
        summary = {"majority_rate": majority, "results": results}
        if start is not None:
            summary["start"] = start
        storage.write_json(storage.join(workdir, "demo_results.json"), summary, indent=1)
    return results


def print_table(results: dict, majority: float, num_questions: int, start: dict | None = None) -> None:
    rows = dict(results) if start is None else {"start": start, **results}
    kinds = [k for k in QUESTION_TYPES + EXTRA_TYPES if any(f"exact_match/{k}" in r for r in rows.values())]
    print()
    print(f"held-out exact match on {num_questions} synthetic VQA questions (majority-answer rate {majority:.1%})")
    print(f"{'fusion':<12}{'all':>8}" + "".join(f"{k:>8}" for k in kinds) + f"{'loss':>9}{'seconds':>9}")
    for fusion, r in rows.items():
        print(f"{fusion:<12}{r.get('exact_match', 0):>8.1%}" + "".join(f"{r.get('exact_match/' + k, 0):>8.1%}" for k in kinds)
              + f"{r.get('loss', float('nan')):>9.4f}{r.get('wall_seconds', float('nan')):>9.0f}")
    if start is not None:
        print(f"start: {start['checkpoint']} before training")
        for fusion, r in results.items():
            print(f"{fusion}: {r['steps']} steps, trained {r['trainable_params']:,} of {r['model_params']:,} "
                  f"params ({r['trainable_params'] / r['model_params']:.2%})")
