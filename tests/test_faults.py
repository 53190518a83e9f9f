"""Bad inputs, killed runs, non-finite steps, wrong checkpoints, unsafe loading."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import lavi_jax
from lavi_jax import checkpoint, sharding, train as training
from lavi_jax.data import ExampleBuilder, make_image_processor, make_tokenizer
from lavi_jax.demo.synthetic import write_synthetic_vqa
from lavi_jax.data.bad_records import BadRecord
from tests.small import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a corpus of bad and odd inputs


def write_corpus(root):
    """Files under ``root``; returns (records, ids expected to be skipped, ids of legit odd formats)."""
    os.makedirs(root, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    p = lambda name: os.path.join(root, name)
    rgb.save(p("ok.png"))
    rgb.save(p("full.jpg"), quality=90)
    with open(p("full.jpg"), "rb") as f:
        data = f.read()
    open(p("truncated.jpg"), "wb").write(data[: len(data) // 2])
    with open(p("ok.png"), "rb") as f:
        data = f.read()
    open(p("truncated.png"), "wb").write(data[: len(data) // 2])
    open(p("empty.png"), "wb").close()
    open(p("text.jpg"), "w").write("not an image at all\n")
    rgb.convert("CMYK").save(p("cmyk.jpg"))
    Image.fromarray((np.arange(1200, dtype=np.uint16).reshape(40, 30) * 50)).save(p("deep16.png"))
    rgb.convert("L").save(p("gray.png"))
    rgb.convert("RGBA").save(p("rgba.png"))
    rgb.convert("P").save(p("palette.png"))
    rgb.save(p("anim.gif"), save_all=True, append_images=[rgb.rotate(90), rgb.rotate(180)], duration=50, loop=0)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(p("one.png"))
    Image.new("1", (20000, 20000)).save(p("bomb.png"))  # 4e8 pixels, a few KB on disk
    open(p("corrupt.mp4"), "wb").write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with av.open(p("noframes.mp4"), "w") as c:  # a valid mp4 without a single video frame (audio only)
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with av.open(p("clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)

    conv = lambda q="<image>\nWhat is it?", a="red": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec = lambda rid, **kw: dict({"id": rid, "conversations": conv()}, **kw)
    bad = {
        "truncated-jpeg": rec("truncated-jpeg", image="truncated.jpg"),
        "truncated-png": rec("truncated-png", image="truncated.png"),
        "zero-byte": rec("zero-byte", image="empty.png"),
        "text-as-jpg": rec("text-as-jpg", image="text.jpg"),
        "bomb": rec("bomb", image="bomb.png"),
        "missing": rec("missing", image="nowhere.png"),
        "escape": rec("escape", image="../../../../etc/passwd"),
        "absolute": rec("absolute", image="/etc/passwd"),
        "no-conversations": {"id": "no-conversations", "image": "ok.png"},
        "wrong-types": {"id": "wrong-types", "image": 5, "conversations": "hello"},
        "empty-conversation": rec("empty-conversation", conversations=[]),
        "no-assistant": rec("no-assistant", image="ok.png", conversations=[{"from": "human", "value": "<image>\nhi"}]),
        "too-long": rec("too-long", image="ok.png", conversations=conv("<image>\n" + "x" * 500)),
        "corrupt-mp4": rec("corrupt-mp4", video="corrupt.mp4"),
        "zero-frames": rec("zero-frames", video="noframes.mp4"),
    }
    legit = {
        "cmyk": rec("cmyk", image="cmyk.jpg"), "16-bit": rec("16-bit", image="deep16.png"),
        "gray": rec("gray", image="gray.png"), "rgba": rec("rgba", image="rgba.png"),
        "palette": rec("palette", image="palette.png"), "gif": rec("gif", image="anim.gif"),
        "1x1": rec("1x1", image="one.png"), "jpeg": rec("jpeg", image="full.jpg"),
        "unicode": rec("unicode", image="ok.png", conversations=conv("<image>\nCe\u0301zanne? \u05e9\u05dc\u05d5\u05dd \U0001f600 \u200f", "\u00e9t\u00e9 \U0001f308")),
        "video": rec("video", video="clip.mp4"),
        "text-only": rec("text-only", conversations=conv("What is 2+2?", "four")),
    }
    records = list(bad.values()) + list(legit.values())
    random.Random(0).shuffle(records)
    return records, set(bad), set(legit)


def test_bad_and_odd_inputs_are_skipped_or_decoded_and_nothing_escapes_the_root(tmp_path):
    root = str(tmp_path / "media")
    records, bad_ids, legit_ids = write_corpus(root)
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and isinstance(args[0], str) else None)
    builder = ExampleBuilder(make_tokenizer("byte"), make_image_processor("siglip", 32), root, max_images=1,
                             num_frames=2, max_length=64)
    results = {r["id"] if isinstance(r, dict) and isinstance(r.get("id"), str) else None: builder(i, r) for i, r in enumerate(records)}
    skipped = {k for k, v in results.items() if isinstance(v, BadRecord)}
    assert skipped == bad_ids, {k: v.reason for k, v in results.items() if isinstance(v, BadRecord)}
    for k in bad_ids:
        assert results[k].reason and results[k].id == k
    assert "too large" in results["bomb"].reason or "pixels" in results["bomb"].reason
    assert "escapes" in results["escape"].reason and "absolute" in results["absolute"].reason
    for k in legit_ids - {"text-only"}:
        ex = results[k]
        assert np.isfinite(ex["pixel_values"]).all() and ex["item_mask"][0, 0], k
    assert results["video"]["item_mask"][0].all()  # two frames sampled from the clip
    gray = results["gray"]["pixel_values"][0, 0]
    np.testing.assert_allclose(gray[..., 0], gray[..., 1])  # grayscale replicated to RGB
    assert np.abs(results["1x1"]["pixel_values"][0, 0] - results["1x1"]["pixel_values"][0, 0, 0, 0]).max() < 1e-6
    assert not [f for f in opened if f.startswith("/etc/")], "read outside the image root"


def test_training_and_eval_survive_the_corpus(tmp_path, capsys):
    root = str(tmp_path / "media")
    records, bad_ids, legit_ids = write_corpus(root)
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records))
    vqa = {"train_json": str(path), "eval_json": str(path), "image_root": root}
    config = small_config(vqa, num_steps=4, checkpoint_every=4, batch_size=8)
    config.data.update(num_frames=2, seq_buckets=(64,), max_bad_records=len(bad_ids))
    config.model.projector.max_frames = 2
    _, out = training.train(config, str(tmp_path / "run"))
    assert out["eval_bad_records"] == len(bad_ids)
    assert out["eval_examples"] == len(legit_ids)  # every legit record scored, no more, no less
    printed = capsys.readouterr().out
    assert all(rid in printed for rid in list(bad_ids)[:5])


# ----------------------------------------------------------------------------- killed runs


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_synthetic_vqa(str(tmp_path_factory.mktemp("vqa")), num_train=64, num_eval=8, image_size=32)


@pytest.mark.slow  # ~3 min on 2 cores; the default run keeps kill-and-resume through the two-process bucket test
def test_sigkill_at_random_points_resumes_to_identical_params(vqa, tmp_path):
    steps = 14
    data_dir = vqa["image_root"]
    workdir = str(tmp_path / "killed")
    worker = [sys.executable, os.path.join(ROOT, "tests", "train_worker.py"), data_dir, workdir, str(steps)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    lines = lambda: sum(1 for _ in open(metrics_file)) if os.path.exists(metrics_file) else 0
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        before = lines()
        proc = subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = before + rng.randint(1, 2)
        deadline = time.time() + 300
        while lines() < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))  # inside a step or an async checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    done = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    from tests.train_worker import config_for

    reference, _ = training.train(config_for(data_dir, steps), str(tmp_path / "straight"))
    config = config_for(data_dir, steps)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    resumed = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), config.model, mesh)
    for a, b in zip(jax.tree.leaves(jax.device_get(reference.params)), jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(a, b)
    # Every step logged more than once (redone after a kill) has the same loss each time.
    seen = {}
    for row in map(json.loads, open(metrics_file)):
        if "loss" in row:
            assert seen.setdefault(row["step"], row["loss"]) == row["loss"], row
    assert sorted(seen) == list(range(1, steps + 1))


# ----------------------------------------------------------------------------- non-finite steps


def test_nonfinite_steps_are_skipped_then_stop_the_run(vqa, tmp_path):
    config = small_config(vqa, num_steps=8, learning_rate=1e30, warmup_steps=1, max_nonfinite=3, clip_grad_norm=0.0)
    config.evals.exact_match = False
    with pytest.raises(training.NonFiniteError, match=r"step \d+: 3 consecutive non-finite"):
        training.train(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any(r.get("nonfinite_step") for r in rows)


def tiny_state_and_batch(**train):
    """The tiny 7B-shaped config with ``train`` settings on one device -> (config, model, optimizer, fresh train
    state, a finite batch of 2 rows with one image each)."""
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    cfg.train.update(**train)
    model = lavi_jax.LaVi(cfg.model)
    tx = training.make_optimizer(cfg.train)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    patterns = training.trainable_patterns(cfg.train.trainable)
    _, shardings = training.state_shardings(model, tx, patterns, mesh, jnp.zeros((1, 8), jnp.int32))
    params = sharding.init_params(model, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), mesh=mesh)
    state = training.create_state(params, tx, patterns, shardings)
    s = cfg.model.vision.image_size
    ids = np.full((2, 8), 5, np.int32)
    ids[:, 1] = cfg.model.image_token_id
    batch = {"input_ids": ids, "attention_mask": np.ones((2, 8), np.int32), "loss_mask": np.ones((2, 8), np.float32),
             "pixel_values": np.zeros((2, 1, 1, s, s, 3), np.float32), "item_mask": np.ones((2, 1, 1), bool)}
    return cfg, model, tx, state, batch


@pytest.mark.slow  # ~35 s; skipped non-finite steps stay in the default run, end to end
def test_nonfinite_update_leaves_state_untouched():
    cfg, model, tx, state, good = tiny_state_and_batch(trainable="all")
    batch = dict(good, pixel_values=np.full_like(good["pixel_values"], np.nan))
    step = jax.jit(training.make_train_step(model, tx, cfg.train))
    before = jax.device_get((state.params, state.opt_state))
    new, m = step(state, batch)
    assert not bool(m["finite"]) and int(new.nonfinite) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((new.params, new.opt_state)))):
        np.testing.assert_array_equal(a, b)
    batch["pixel_values"] = np.zeros_like(batch["pixel_values"])
    new, m = step(new, batch)
    assert bool(m["finite"]) and int(new.nonfinite) == 0


@pytest.mark.slow  # ~35 s
def test_logged_learning_rate_is_the_one_the_optimizer_used_after_a_skipped_step():
    """A non-finite step reverts optax's count but not ``state.step``: the logged rate follows the optimizer."""
    cfg, model, tx, state, good = tiny_state_and_batch(trainable="all", learning_rate=1e-3, warmup_steps=4, num_steps=8)
    bad = dict(good, pixel_values=np.full_like(good["pixel_values"], np.nan))
    step = jax.jit(training.make_train_step(model, tx, cfg.train))
    schedule = training.learning_rate_schedule(cfg.train)
    logged = []
    for batch in (good, bad, good, good):
        count = int(state.opt_state[1][0].count)  # the optimizer's count before the step (adamw's scale_by_adam)
        state, m = step(state, batch)
        logged.append((float(m["learning_rate"]), float(schedule(count)), bool(m["finite"])))
    assert [f for *_, f in logged] == [True, False, True, True] and int(state.step) == 4
    assert int(state.opt_state[1][0].count) == 3
    for got, want, _ in logged:
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert logged[2][0] == logged[1][0] < float(schedule(2))  # the step after the skip reuses the skipped rate


# ----------------------------------------------------------------------------- wrong checkpoints, unsafe loading


@pytest.mark.slow  # ~30 s
def test_checkpoint_for_another_config_fails_naming_the_path(tmp_path):
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    ids = jnp.zeros((1, 8), jnp.int32)
    params = sharding.init_params(lavi_jax.LaVi(cfg.model), jax.random.key(0), ids)
    checkpoint.save_params(str(tmp_path), cfg, params)
    other = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny").model
    other.llm.intermediate_size = 96
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"\['llm'\]\['layers_0'\]\['mlp'\]\['down_proj'\]\['kernel'\] has shape \(128, 64\)"):
        checkpoint.restore_params(str(tmp_path), other)
    llama = lavi_jax.configs.get("configs/lavi_vicuna7b_clip336.py:tiny").model
    with pytest.raises(checkpoint.CheckpointMismatch, match="checkpoint"):
        checkpoint.restore_params(str(tmp_path), llama)


def test_load_shards_params_over_the_devices_by_default(tmp_path):
    """``lavi_jax.load`` without a mesh splits params over every device (not one full copy per device)."""
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    model = lavi_jax.LaVi(cfg.model)
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    params = sharding.init_params(model, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), mesh=one)
    checkpoint.save_params(str(tmp_path), cfg, params)
    loaded_model, loaded = lavi_jax.load(str(tmp_path))
    largest = max(jax.tree.leaves(loaded), key=lambda x: x.size)
    assert len(largest.sharding.device_set) == len(jax.devices()) == 8
    assert largest.sharding.shard_shape(largest.shape) != largest.shape, largest.sharding
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (8, 16)), jnp.int32)
    want = model.apply({"params": params}, ids)
    got = jax.jit(loaded_model.apply)({"params": loaded}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_no_unsafe_loading_in_the_package():
    pattern = (r"\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import|\b(c?pickle|dill|joblib)\.loads?\(|"
               r"torch\.load\((?![^)]*weights_only\s*=\s*True)|trust_remote_code\s*=\s*True|numpy\.load\([^)]*allow_pickle\s*=\s*True")
    out = subprocess.run(["grep", "-rnP", pattern, "--include=*.py", "lavi_jax", "conversions", "train.py", "eval.py"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout == "", out.stdout


def test_cli_rejects_bad_arguments(tmp_path):
    run = lambda *a, script="train.py": subprocess.run([sys.executable, os.path.join(ROOT, script), *a], capture_output=True,
                                                       text=True, cwd=str(tmp_path), timeout=120,
                                                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out = run("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert out.returncode != 0 and "nope.py" in out.stderr
    out = run("--config", os.path.join(ROOT, "configs/demo.py"))
    assert out.returncode != 0 and "workdir" in out.stderr
    out = run("--config", os.path.join(ROOT, "configs/demo.py"), "--workdir", str(tmp_path), "--config.mesh.data=3",
              "--config.demo.num_train=16", "--config.demo.num_eval=8", "--config.demo.fusions=('none',)", script="demo.py")
    assert out.returncode != 0 and "mesh" in out.stderr
