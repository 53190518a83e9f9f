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
