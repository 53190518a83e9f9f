"""Evaluation with a ``gs://`` output folder (against the GCS emulator): results, lmms-eval files, the predictions
log in parts, and resuming from it; the same scores and predictions as a local output folder."""

import json

import jax
import pytest

import lavi_jax
import lavi_jax.eval as lavi_eval
from lavi_jax import checkpoint, sharding, storage
from lavi_jax.data import make_components
from lavi_jax.demo.synthetic import write_synthetic_vqa
from lavi_jax.eval import resume

from tests.test_eval import Preempted, counting_generate, random_params, strip, tiny_config

BATCH = 2
NUM = 6  # llava_json samples: 3 batches of 2


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny local checkpoint, a local llava_json set, a 1-device runner, and the run into a local out folder."""
    root = tmp_path_factory.mktemp("storage_eval")
    paths = write_synthetic_vqa(str(root / "data"), num_train=1, num_eval=NUM, image_size=64)
    config = tiny_config(paths)
    config.evals.update(tasks="llava_json", max_new_tokens=4, batch_size=BATCH)
    ckpt = checkpoint.save_params(str(root / "ckpt"), config, random_params(config))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tokenizer, processor = make_components(config)
    params = checkpoint.restore_params(ckpt, config.model, mesh)
    runner = lavi_eval.Runner(lavi_jax.LaVi(config.model), mesh, tokenizer, processor, batch_size=BATCH,
                              num_threads=2, progress=False)
    ident = {"path": ckpt, "step": 0}
    local = str(root / "out")
    reference = lavi_eval.run_tasks(runner, params, lavi_eval.tasks_from_config(config), local, checkpoint=ident,
                                    print_summary=False)
    return {"config": config, "ckpt": ckpt, "runner": runner, "params": params, "ident": ident, "local": local,
            "reference": reference}


def task_list(small):
    return lavi_eval.tasks_from_config(small["config"])


def parts(log: str) -> list[str]:
    return [n for n in storage.listdir(log) if n.startswith("part-")]


def logged(log: str) -> list[dict]:
    return [json.loads(x) for n in parts(log) for x in storage.read_text(storage.join(log, n)).splitlines()]




def test_results_and_harness_files_in_the_bucket(small, bucket):
    out = storage.join(bucket, "eval", "results")
    (result,) = lavi_eval.run_tasks(small["runner"], small["params"], task_list(small), out,
                                    checkpoint=small["ident"], print_summary=False)
    (reference,) = small["reference"]
    assert strip(result) == strip(reference)
    assert strip(storage.read_json(storage.join(out, "llava_json.json"))) == strip(reference)
    (doc,) = [storage.read_json(p) for p in storage.glob(storage.join(out, "*_results.json"))]
    (local_doc,) = [storage.read_json(p) for p in storage.glob(storage.join(small["local"], "*_results.json"))]
    assert doc["results"] == local_doc["results"] and doc["n-samples"] == local_doc["n-samples"]
    assert doc["task_hashes"] == local_doc["task_hashes"]
    (samples,) = storage.glob(storage.join(out, "*_samples_llava_json.jsonl"))
    (local_samples,) = storage.glob(storage.join(small["local"], "*_samples_llava_json.jsonl"))
    assert storage.read_text(samples) == storage.read_text(local_samples)
    log = resume.log_dir(out, "llava_json")
    assert storage.listdir(log) == ["header.json", "part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    header = storage.read_json(storage.join(log, "header.json"))
    assert header["checkpoint"] == {"path": small["ckpt"], "step": 0}
    assert header == storage.read_json(storage.join(resume.log_dir(small["local"], "llava_json"), "header.json"))
    assert sorted(r["id"] for r in logged(log)) == sorted(r["id"] for r in reference["per_sample"])


def test_interrupted_run_resumes_from_the_bucket(small, bucket, monkeypatch, capsys):
    """Preempted after 1 batch, a rerun reads the parts in the bucket, generates only the rest and equals the
    uninterrupted run; a part that does not parse is dropped with the parts after it."""
    out = storage.join(bucket, "results")
    log = resume.log_dir(out, "llava_json")
    calls = counting_generate(monkeypatch, stop_after=1)
    with pytest.raises(Preempted):
        lavi_eval.run_tasks(small["runner"], small["params"], task_list(small), out, checkpoint=small["ident"])
    first = logged(log)
    assert calls == [BATCH] and parts(log) == ["part-00000.jsonl"] and len(first) == BATCH
    storage.write_bytes(storage.join(log, "part-00001.jsonl"), b'{"id": "cut sh')
    storage.write_bytes(storage.join(log, "part-00002.jsonl"), b'{"id": "after the cut", "prediction": "x"}\n')
    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    (result,) = lavi_eval.run_tasks(small["runner"], small["params"], task_list(small), out, checkpoint=small["ident"])
    assert f"{log}: resuming, {BATCH} samples done" in capsys.readouterr().out
    assert result["settings"]["resumed"] == BATCH and sum(calls) == NUM - BATCH
    assert strip(result) == strip(small["reference"][0])
    assert strip(storage.read_json(storage.join(out, "llava_json.json"))) == strip(small["reference"][0])
    done = logged(log)
    assert parts(log) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert done[:BATCH] == first and len(done) == NUM and "after the cut" not in {r["id"] for r in done}


def test_log_of_another_config_is_started_over(small, bucket, monkeypatch, capsys):
    out = storage.join(bucket, "results")
    log = resume.log_dir(out, "llava_json")
    run = lambda: lavi_eval.run_tasks(small["runner"], small["params"], task_list(small), out,
                                      checkpoint=small["ident"], print_summary=False)[0]
    run()
    header = storage.read_json(storage.join(log, "header.json"))
    storage.write_json(storage.join(log, "header.json"), {**header, "config": "another"})
    storage.write_bytes(storage.join(log, "part-00007.jsonl"), b'{"id": "stale", "prediction": "x"}\n')
    calls = counting_generate(monkeypatch)
    result = run()
    assert f"{log}: written for another config; starting over" in capsys.readouterr().out
    assert result["settings"]["resumed"] == 0 and sum(calls) == NUM
    assert strip(result) == strip(small["reference"][0])
    assert storage.read_json(storage.join(log, "header.json")) == header
    assert parts(log) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]  # the old parts removed
    assert "stale" not in {r["id"] for r in logged(log)}


def test_evaluate_checkpoint_from_and_to_the_bucket(small, bucket, capsys):
    """eval.py's entry point: a checkpoint in the bucket evaluated into the bucket; a rerun resumes every sample."""
    ckpt = checkpoint.save_params(storage.join(bucket, "run", "checkpoints"), small["config"], small["params"])
    out = storage.join(bucket, "run", "results")
    config = small["config"].copy_and_resolve_references()
    (result,) = lavi_eval.evaluate_checkpoint(config, storage.join(bucket, "run"), out)
    assert strip(result) == strip(small["reference"][0])
    assert result["settings"]["checkpoint"] == {"path": ckpt, "step": 0}
    assert storage.read_json(storage.join(resume.log_dir(out, "llava_json"), "header.json"))["checkpoint"]["path"] \
        == f"{bucket}/run/checkpoints"
    (again,) = lavi_eval.evaluate_checkpoint(config, storage.join(ckpt, "0"), out)
    assert again["settings"]["resumed"] == NUM and strip(again) == strip(result)
    assert "resuming, 6 samples done" in capsys.readouterr().out


def test_dry_run_report_in_the_bucket(small, bucket):
    from lavi_jax.train.dry_run import dry_run

    config = small["config"].copy_and_resolve_references()
    config.data.seq_buckets = (32,)
    path = storage.join(bucket, "dry", "report.json")
    report = dry_run(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), topology="",
                     programs="prefill", report_path=path)
    assert storage.read_json(path) == json.loads(json.dumps(report)) and "prefill" in report["programs"]
