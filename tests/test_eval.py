"""Batch evaluation: 1 device = 8 devices = unbatched generation, failed images scored wrong, results files, CLI."""

import base64
import io
import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

import lavi_jax
import lavi_jax.eval as lavi_eval
from lavi_jax import checkpoint, sharding
from lavi_jax.data import make_components
from lavi_jax.data.media import MediaLoader, media_items
from lavi_jax.demo.synthetic import write_synthetic_vqa
from lavi_jax.eval import scorers
from lavi_jax.eval.runner import conversation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 5


def tiny_config(paths):
    config = lavi_jax.configs.get("configs/demo.py")
    config.demo.enabled = False
    config.model.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
    config.model.vision.update(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, patch_size=16)
    config.model.projector.pool = 1
    config.model.conditioner.update(width=16, num_heads=2)
    config.data.update(train_json=paths["train_json"], eval_json=paths["eval_json"], image_root=paths["image_root"],
                       num_threads=2)
    config.evals.update(batch_size=8)
    return config


def random_params(config):
    """Params for the config's shapes without compiling an init: unit-scale embeddings, fan-in scaled weights and
    non-zero conditioner outputs, so answers vary from sample to sample and depend on the image."""
    shapes, _ = sharding.abstract_params(lavi_jax.LaVi(config.model), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)

    def fill(path, s):
        if "scale" in jax.tree_util.keystr(path):  # norm weights
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        std = 1.0 if len(s.shape) < 2 or "embed" in jax.tree_util.keystr(path) else float(np.prod(s.shape[:-1])) ** -0.5
        return (std * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint (random params, conditioner outputs non-zero so images matter), a LLaVA eval set (one image
    missing) and a POPE set (one image missing, one outside the image root)."""
    root = tmp_path_factory.mktemp("eval")
    paths = write_synthetic_vqa(str(root / "data"), num_train=1, num_eval=10, image_size=64)
    records = json.load(open(paths["eval_json"]))
    records.append({**records[0], "id": "no-image", "image": "images/missing.png"})
    with open(paths["eval_json"], "w") as f:
        json.dump(records, f)
    pope = [{"question_id": i, "image": r["image"], "text": f"Is there a {s} in the image?",
             "label": "yes" if any(x["shape"] == s for x in r["scene"]) else "no", "category": "random"}
            for i, (r, s) in enumerate(zip(records[:8], ["circle", "square", "triangle"] * 3))]
    pope.append({"question_id": 8, "image": "images/missing.png", "text": "Is there a dog?", "label": "yes", "category": "random"})
    pope.append({"question_id": 9, "image": "../outside.png", "text": "Is there a cat?", "label": "no", "category": "random"})
    pope_path = root / "pope.jsonl"
    pope_path.write_text("".join(json.dumps(p) + "\n" for p in pope))

    config = tiny_config(paths)
    ckpt = checkpoint.save_params(str(root / "ckpt"), config, random_params(config))
    return {"root": root, "paths": paths, "pope": str(pope_path), "config": config, "ckpt": ckpt}


def tasks(setup):
    config = setup["config"].copy_and_resolve_references()
    config.evals.tasks = "llava_json,pope"
    # No answer-format suffix: both tasks' prompts then fall in one length bucket and share compiled programs.
    config.evals.pope.update(questions=setup["pope"], image_root=setup["paths"]["image_root"], max_new_tokens=MAX_NEW)
    config.evals.pope.options.prompt_suffix = None
    config.evals.max_new_tokens = MAX_NEW
    return config, lavi_eval.tasks_from_config(config)


def run_on(setup, n, out):
    config, task_list = tasks(setup)
    mesh = sharding.make_mesh({"data": n}, devices=jax.devices()[:n])
    model = lavi_jax.LaVi(config.model)
    tokenizer, processor = make_components(config)
    params = checkpoint.restore_params(setup["ckpt"], config.model, mesh)
    runner = lavi_eval.make_runner(config, model, mesh, tokenizer, processor)
    return runner, params, lavi_eval.run_tasks(runner, params, task_list, out)


def strip(result):
    return {k: v for k, v in result.items() if k not in ("seconds", "settings")}


@pytest.fixture(scope="module")
def runs(setup):
    return {n: run_on(setup, n, str(setup["root"] / f"out{n}")) for n in (1, 8)}


def test_tasks_from_config(setup):
    config, (llava, pope) = tasks(setup)
    assert (llava.name, llava.questions, llava.image_root, llava.max_new_tokens) == (
        "llava_json", setup["paths"]["eval_json"], setup["paths"]["image_root"], MAX_NEW)
    assert (pope.name, pope.label, pope.questions, pope.max_new_tokens, pope.limit) == ("pope", "pope", setup["pope"], MAX_NEW, None)
    assert pope.options == {"prompt_suffix": None}
    config.evals = ml_collections.ConfigDict({"tasks": {"pope_small": {"name": "pope", "questions": "q.jsonl", "limit": 2}},
                                              "max_new_tokens": MAX_NEW})
    (t,) = lavi_eval.tasks_from_config(config)
    assert (t.name, t.label, t.questions, t.limit, t.max_new_tokens) == ("pope", "pope_small", "q.jsonl", 2, MAX_NEW)


def test_eight_devices_equal_one_device(runs):
    one, eight = runs[1][2], runs[8][2]
    assert [strip(r) for r in one] == [strip(r) for r in eight]
    assert one[0]["settings"]["devices"] == 1 and eight[0]["settings"]["devices"] == 8
    llava, pope = one
    assert llava["num_samples"] == 11 and pope["num_samples"] == 10
    assert all(isinstance(r["prediction"], str) for r in llava["per_sample"] if r["error"] is None)


def test_predictions_equal_generation_of_each_sample_alone(setup, runs):
    """Each sample generated in a batch of its own (right-padded, filler rows) gives the runner's prediction."""
    runner, params, (llava, _) = runs[1]
    tokenizer, root = runner.tokenizer, setup["paths"]["image_root"]
    gen = runner.generator(MAX_NEW)
    samples = scorers.LlavaJsonEvaluator().load(setup["paths"]["eval_json"], image_root=root)
    by_id = {r["id"]: r for r in llava["per_sample"]}
    put = lambda x: jax.device_put(x, sharding.batch_sharding(runner.mesh, x.ndim))
    for s in samples[:3]:
        prompt = tokenizer.encode_prompt(s["conversation"])
        ids = np.full((8, 64), tokenizer.pad_id, np.int32)
        ids[:, :len(prompt)] = prompt
        mask = (np.arange(64)[None] < np.r_[len(prompt), [1] * 7][:, None]).astype(np.int32)
        pix, item_mask = MediaLoader(runner.processor, 1, root, None, joined=True)(s, 1)
        pix = np.repeat(pix[None], 8, 0)
        item_mask = np.repeat(item_mask[None], 8, 0)
        with sharding.use_mesh(runner.mesh):
            tokens, lengths = gen(params, put(ids), put(mask), put(pix), put(item_mask))
        alone = tokenizer.decode(np.asarray(tokens)[0, :int(lengths[0])]).strip()
        assert by_id[s["id"]]["prediction"] == alone
        with sharding.use_mesh(runner.mesh):  # the image matters: without it the answer changes
            blind, _ = gen(params, put(ids), put(mask), put(pix), put(np.zeros_like(item_mask)))
        assert not np.array_equal(np.asarray(blind)[0], np.asarray(tokens)[0])
    assert len({r["prediction"] for r in llava["per_sample"]}) > 5


def test_media_loader_videos_and_embedded_images(tmp_path):
    from PIL import Image

    from lavi_jax.data import make_image_processor

    processor = make_image_processor("siglip", 16)
    frames = [Image.new("RGB", (20, 20), (40 * i, 0, 0)) for i in range(5)]
    os.makedirs(tmp_path / "clip")
    for i, frame in enumerate(frames):
        frame.save(tmp_path / "clip" / f"frame_{i}.png")
    buffer = io.BytesIO()
    frames[1].save(buffer, format="PNG")
    sample = {"id": "v", "prompt": "What happens?", "image": None, "video": str(tmp_path / "clip"),
              "metadata": {"image_base64": base64.b64encode(buffer.getvalue()).decode()}}
    assert [k for k, _ in media_items(sample)] == ["base64", "video"]
    assert conversation(sample, 2)[0]["value"] == "<image>\n<image>\nWhat happens?"
    pixels, mask = MediaLoader(processor, 3, str(tmp_path), None, joined=True)(sample, 3)
    assert pixels.shape == (3, 3, 16, 16, 3)
    np.testing.assert_array_equal(mask, [[True, False, False], [True, True, True], [False, False, False]])
    np.testing.assert_allclose(pixels[0, 0], processor(frames[1]))
    np.testing.assert_allclose(pixels[1, 2], processor(frames[4]))  # frames 0, 2, 4 of 5
    with pytest.raises(ValueError, match="outside the image root"):
        MediaLoader(processor, 1, str(tmp_path / "clip"), None, joined=True)({"image": str(tmp_path / "clip/../x.png")}, 1)


def test_missing_images_are_scored_wrong_with_reason(runs):
    llava, pope = runs[8][2]
    row = next(r for r in llava["per_sample"] if r["id"] == "no-image")
    assert not row["correct"] and "FileNotFoundError" in row["error"] and "missing.png" in row["error"]
    assert llava["num_failed"] == 1 and llava["failures"][0]["id"] == "no-image"
    reasons = {f["id"]: f["reason"] for f in pope["failures"]}
    assert set(reasons) == {"8", "9"}
    assert "FileNotFoundError" in reasons["8"] and "outside the image root" in reasons["9"]
    rows = {r["id"]: r for r in pope["per_sample"]}
    assert not rows["8"]["correct"] and not rows["9"]["correct"]
    # A failed "yes" counts as a false negative, a failed "no" as a false positive.
    m = pope["metrics"]
    assert m["num_failed"] == 2 and m["tp"] + m["fn"] + m["fp"] + m["tn"] == 10


def test_results_files(setup, runs):
    for n in (1, 8):
        for result in runs[n][2]:
            with open(setup["root"] / f"out{n}" / f"{result['task']}.json") as f:
                saved = json.load(f)
            assert saved["metrics"] == result["metrics"] and saved["per_sample"] == json.loads(json.dumps(result["per_sample"]))
            assert {"id", "prediction", "error", "prompt"} <= set(saved["per_sample"][0])
    table = lavi_eval.summary_table(runs[1][2])
    assert "llava_json" in table and "pope" in table and "exact_match" in table and "f1" in table


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_two_processes_match_in_process_run(setup, runs, tmp_path):
    """eval.py on 2 processes x 4 CPU devices writes the same results as the in-process 8-device run."""
    args = ["--config", os.path.join(ROOT, "configs/demo.py"), "--ckpt", setup["ckpt"], "--out", str(tmp_path),
            "--config.evals.tasks=llava_json,pope", "--config.evals.batch_size=8",
            f"--config.evals.max_new_tokens={MAX_NEW}", "--config.data.num_threads=2",
            f"--config.evals.pope.questions={setup['pope']}", f"--config.evals.pope.image_root={setup['paths']['image_root']}",
            "--config.evals.pope.options.prompt_suffix=none"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               LAVI_NO_PROGRESS="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *args, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    assert "llava_json" in outs[0][0] and "pope" in outs[0][0]  # the summary table, from process 0 only
    assert "llava_json" not in outs[1][0]
    for result in runs[8][2]:
        with open(tmp_path / f"{result['task']}.json") as f:
            saved = json.load(f)
        assert saved["settings"]["processes"] == 2 and saved["settings"]["devices"] == 8
        assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
        assert saved["per_sample"] == json.loads(json.dumps(result["per_sample"]))


@pytest.mark.slow  # a minute of train-step compilation
def test_training_runs_benchmark_evals(setup, tmp_path):
    """config.evals.tasks during training: scores in metrics.jsonl and results/step_<n>/<task>.json."""
    config = setup["config"].copy_and_resolve_references()
    config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1)
    config.evals.update(exact_match=False, every=1, tasks="llava_json", max_new_tokens=2, limit=4)
    config.init.checkpoint = setup["ckpt"]  # restoring is much faster than compiling an init
    from lavi_jax.train import train  # the layer above eval

    _, out = train(config, str(tmp_path))
    assert out["llava_json/num_samples"] == 4 and 0.0 <= out["llava_json/exact_match"] <= 1.0
    for step in (1, 2):
        with open(tmp_path / "results" / f"step_{step}" / "llava_json.json") as f:
            assert json.load(f)["num_samples"] == 4
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "llava_json/exact_match" in r] == [1, 2]


def test_task_errors_name_the_task_and_flag(setup):
    config = setup["config"].copy_and_resolve_references()
    config.evals.tasks = "pope"
    with pytest.raises(ValueError, match=r"'pope': no questions file; set --config.evals.pope.questions="):
        lavi_eval.tasks_from_config(config)
    config.evals.tasks = "pope_small"
    with pytest.raises(ValueError, match=r"'pope_small': no settings block config.evals.pope_small"):
        lavi_eval.tasks_from_config(config)
    config.evals.pope_small = lavi_jax.configs.eval_task(name="pope", questions="q.jsonl", options={"metric": "none"})
    (t,) = lavi_eval.tasks_from_config(config)
    assert (t.name, t.label, t.options) == ("pope", "pope_small", {"metric": None})
    config.evals.pope_small.prompt_suffix = "x"
    with pytest.raises(ValueError, match=r"scorer options go in --config.evals.pope_small.options"):
        lavi_eval.tasks_from_config(config)


def test_checkpoint_config_missing_falls_back_unreadable_raises(setup, tmp_path):
    import orbax.checkpoint as ocp

    from lavi_jax.eval import from_checkpoint

    params = random_params(setup["config"])
    with checkpoint.manager(str(tmp_path / "bare"), async_save=False) as m:
        m.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        m.wait_until_finished()
    assert from_checkpoint.saved_config(str(tmp_path / "bare"), 0) is None
    broken = checkpoint.save_params(str(tmp_path / "broken"), setup["config"], params)
    with open(os.path.join(broken, "0", "config", "metadata"), "w") as f:
        f.write("{not json")
    with pytest.raises(lavi_eval.CheckpointConfigError, match=r"broken/0/config/metadata"):
        lavi_eval.evaluate_checkpoint(setup["config"], broken, None)


# ----------------------------------------------------------------------------- conventions, harness files, resume, meshes


def make_runner_on(setup, mesh_shape, batch_size):
    config, task_list = tasks(setup)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    tokenizer, processor = make_components(config)
    params = checkpoint.restore_params(setup["ckpt"], config.model, mesh)
    runner = lavi_eval.Runner(lavi_jax.LaVi(config.model), mesh, tokenizer, processor, batch_size=batch_size,
                              num_threads=2, progress=False)
    return runner, params, task_list


def test_results_name_the_convention(setup, runs):
    for result in runs[1][2]:
        assert result["convention"] == scorers.get(result["evaluator"], **tasks(setup)[1][0].options if
                                                   result["evaluator"] == "llava_json" else {}).convention
        with open(setup["root"] / "out1" / f"{result['task']}.json") as f:
            assert json.load(f)["convention"] == result["convention"]
        assert isinstance(result["convention"], str) and result["convention"]


def test_lmms_eval_files(setup, runs):
    """<date>_results.json and <date>_samples_<task>.jsonl carry lmms-eval's keys; its own table reader reads them."""
    from lmms_eval.utils import get_results_filenames

    out = setup["root"] / "out1"
    names = get_results_filenames(sorted(str(p) for p in out.iterdir()))
    (path,) = [p for p in names if p.endswith("_results.json")]
    doc = json.load(open(path))
    assert {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "date", "task_hashes", "model_name", "model_name_sanitized"} <= set(doc)
    llava, pope = runs[1][2]
    assert set(doc["results"]) == {"llava_json", "pope"}
    assert doc["results"]["pope"]["pope_accuracy,none"] == pytest.approx(pope["metrics"]["accuracy"])
    assert doc["results"]["pope"]["pope_f1_score,none"] == pytest.approx(pope["metrics"]["f1"])
    assert doc["results"]["llava_json"]["exact_match,none"] == pytest.approx(llava["metrics"]["exact_match"])
    assert doc["results"]["pope"]["alias"] == "pope" and doc["results"]["pope"]["pope_accuracy_stderr,none"] == "N/A"
    assert doc["n-samples"]["pope"] == {"original": 10, "effective": 10}
    assert doc["configs"]["pope"]["metadata"]["convention"] == pope["convention"]
    date = os.path.basename(path)[: -len("_results.json")]
    for result, name in ((llava, "llava_json"), (pope, "pope")):
        lines = [json.loads(x) for x in open(out / f"{date}_samples_{name}.jsonl")]
        assert len(lines) == result["num_samples"] and [x["doc_id"] for x in lines] == list(range(len(lines)))
        for line, row in zip(lines, result["per_sample"]):
            assert {"doc_id", "doc_hash", "target", "input", "filtered_resps"} <= set(line)
            assert line["filtered_resps"] == (row["prediction"] or "") and line["lavi_jax"]["id"] == row["id"]
        metric = "pope_accuracy" if name == "pope" else "exact_match"
        assert np.mean([x[metric] for x in lines]) == pytest.approx(result["metrics"]["accuracy" if name == "pope"
                                                                                     else "exact_match"])


def test_lmms_eval_table_reads_the_results_file(setup, runs):
    """lmms-eval's own table printer reads the file."""
    from lmms_eval.utils import make_table

    (path,) = (setup["root"] / "out1").glob("*_results.json")
    table = make_table(json.load(open(path)))
    assert "pope_f1_score" in table and "llava_json" in table and "exact_match" in table


class Preempted(Exception):
    pass


def counting_generate(monkeypatch, stop_after=None):
    """Patches Runner._generate to count generated rows per call, raising ``Preempted`` after ``stop_after`` calls."""
    calls = []
    original = lavi_eval.Runner._generate

    def generate(self, params, gen, prompts, *args):
        if stop_after is not None and len(calls) == stop_after:
            raise Preempted
        calls.append(len(prompts))
        return original(self, params, gen, prompts, *args)

    monkeypatch.setattr(lavi_eval.Runner, "_generate", generate)
    return calls


def part_names(log):
    """The part files of predictions log folder ``log``, in order."""
    return sorted(p.name for p in log.iterdir() if p.name.startswith("part-"))


def logged_records(log):
    """The records of predictions log folder ``log``, parts in order."""
    return [json.loads(x) for name in part_names(log) for x in (log / name).read_text().splitlines()]


def test_interrupted_run_resumes_to_the_same_results(setup, runs, tmp_path, monkeypatch, capsys):
    """Preempted after 2 batches of 2, a rerun generates only the rest and equals the uninterrupted run."""
    runner, params, task_list = make_runner_on(setup, {"data": 1}, 2)
    ident = {"path": setup["ckpt"], "step": 0}
    out = str(tmp_path)
    calls = counting_generate(monkeypatch, stop_after=2)
    with pytest.raises(Preempted):
        lavi_eval.run_tasks(runner, params, task_list, out, checkpoint=ident)
    log = tmp_path / "llava_json.predictions"
    logged = logged_records(log)
    assert calls == [2, 2] and len(logged) == 4 and part_names(log) == ["part-00000.jsonl", "part-00001.jsonl"]
    (log / "part-00002.jsonl").write_text('{"id": "cut sh')  # a part that does not parse: dropped, and all after it
    (log / "part-00003.jsonl").write_text('{"id": "after the cut", "prediction": "x", "error": null}\n')
    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    resumed = lavi_eval.run_tasks(runner, params, task_list, out, checkpoint=ident)
    assert "resuming, 4 samples done" in capsys.readouterr().out
    assert resumed[0]["settings"]["resumed"] == 4 and resumed[1]["settings"]["resumed"] == 0
    assert sum(calls) == 11 - 4 + 10  # llava_json: the 7 not done; pope: all 10 (image failures are found in batches)
    assert [strip(r) for r in resumed] == [strip(r) for r in runs[1][2]]
    done = logged_records(log)
    assert len(done) == 11 and done[:4] == logged  # numbered on after the last intact part
    assert part_names(log) == [f"part-{i:05d}.jsonl" for i in range(6)]
    print(f"resume: {len(logged)} of 11 llava_json samples done before the interruption, "
          f"{11 - len(logged)} generated after it; per-sample predictions and metrics equal", file=sys.stderr)


def test_resume_of_another_run_starts_over(setup, tmp_path, monkeypatch, capsys):
    runner, params, task_list = make_runner_on(setup, {"data": 1}, 4)
    task = task_list[0]
    task.limit = 4
    out, ident = str(tmp_path), {"path": setup["ckpt"], "step": 0}
    first = runner.run(params, task, out, checkpoint=ident)
    again = runner.run(params, task, out, checkpoint=ident)
    assert again["settings"]["resumed"] == 4 and strip(again) == strip(first)
    calls = counting_generate(monkeypatch)
    other = runner.run(params, task, out, checkpoint={"path": setup["ckpt"], "step": 1})
    assert "written for another checkpoint; starting over" in capsys.readouterr().out
    assert other["settings"]["resumed"] == 0 and sum(calls) == 4
    log = tmp_path / "llava_json.predictions"
    assert len(logged_records(log)) == 4 and part_names(log) == ["part-00000.jsonl"]  # the old parts removed
    header = json.loads((log / "header.json").read_text())
    (log / "header.json").write_text(json.dumps({**header, "config": "another"}))
    assert runner.run(params, task, out, checkpoint={"path": setup["ckpt"], "step": 1})["settings"]["resumed"] == 0
    assert "written for another config; starting over" in capsys.readouterr().out
    task.limit = 3
    assert runner.run(params, task, out, checkpoint={"path": setup["ckpt"], "step": 1})["settings"]["resumed"] == 0
    assert "written for another task; starting over" in capsys.readouterr().out
    assert runner.run(params, task, out)["settings"]["resumed"] == 0  # no checkpoint identity: never resumes
    assert "names no checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("mesh_shape,batch_size,global_batch", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, 3, 4), ({"data": 2, "fsdp": 2, "tensor": 2}, 5, 8), ({"data": 8}, 3, 8)])
def test_padded_last_batch_on_any_mesh(setup, runs, mesh_shape, batch_size, global_batch):
    """A global batch that is not a multiple of the batch shards, and a padded last batch, give the 1-device run."""
    runner, params, task_list = make_runner_on(setup, mesh_shape, batch_size)
    results = lavi_eval.run_tasks(runner, params, task_list, print_summary=False)
    assert [r["settings"]["global_batch"] for r in results] == [global_batch, global_batch]
    assert [strip(r) for r in results] == [strip(r) for r in runs[1][2]]


@pytest.mark.slow  # ~25 s
def test_batches_sized_for_their_own_samples(setup, runs, tmp_path):
    """A task mixing text-only, one-image and two-image samples: each batch carries only its samples' item slots
    (before: every batch was sized to the task's largest sample), and every prediction equals the sample
    generated alone with exactly its own items."""
    runner, params, _ = runs[1]
    root = setup["paths"]["image_root"]
    base = json.load(open(setup["paths"]["eval_json"]))[:4]
    q = lambda r: r["conversations"][0]["value"].replace("<image>\n", "")
    records = ([{**r, "id": f"one{i}"} for i, r in enumerate(base[:2])]
               + [{"id": f"two{i}", "image": [a["image"], b["image"]],
                   "conversations": [{"from": "human", "value": "<image>\n<image>\n" + q(a)}, a["conversations"][1]]}
                  for i, (a, b) in enumerate([(base[0], base[2]), (base[1], base[3])])]
               + [{"id": "text", "conversations": [{"from": "human", "value": q(base[0])}, base[0]["conversations"][1]]}])
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    task = lavi_eval.Task(name="llava_json", questions=str(path), image_root=root, max_new_tokens=MAX_NEW)
    samples = scorers.LlavaJsonEvaluator().load(str(path), image_root=root)
    plan = runner._plan(samples, task, {})
    laid = sorted((lay.num_items, sorted(samples[i]["id"] for i in b)) for b, lay in zip(plan.batches, plan.layouts))
    assert laid == [(0, ["text"]), (1, ["one0", "one1"]), (2, ["two0", "two1"])]
    result = runner.run(params, task)
    by_id = {r["id"]: r["prediction"] for r in result["per_sample"]}
    tokenizer, gen = runner.tokenizer, runner.generator(MAX_NEW)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(runner.mesh, x.ndim))
    for s in samples:
        n = len(media_items(s))
        prompt = tokenizer.encode_prompt(s["conversation"])
        ids = np.full((1, 64), tokenizer.pad_id, np.int32)
        ids[0, 64 - len(prompt):] = prompt
        mask = (ids != tokenizer.pad_id).astype(np.int32)
        mask[0, 64 - len(prompt):] = 1
        args = [put(ids), put(mask)]
        if n:
            pix, item_mask = MediaLoader(runner.processor, 1, root, None, joined=True)(s, n)
            args += [put(pix[None]), put(item_mask[None])]
        with sharding.use_mesh(runner.mesh):
            tokens, lengths = gen(params, *args)
        assert by_id[s["id"]] == tokenizer.decode(np.asarray(tokens)[0, :int(lengths[0])]).strip(), s["id"]
