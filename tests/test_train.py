"""Training: sharded step equality, multi-process equality, resume, freezing, bad records, dry run."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import lavi_jax
from lavi_jax import config as C, sharding, train as training
from lavi_jax.demo.synthetic import write_synthetic_vqa
from tests.small import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_batch(cfg, B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 500, (B, T)).astype(np.int32)
    ids[:, 2] = cfg.model.image_token_id
    s = cfg.model.vision.image_size
    return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "loss_mask": (rng.random((B, T)) > 0.3).astype(np.float32),
            "pixel_values": rng.normal(size=(B, 1, 1, s, s, 3)).astype(np.float32), "item_mask": np.ones((B, 1, 1), bool)}


def run_steps(mesh_shape, n=3, **train):
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    cfg.train.update(trainable="all", learning_rate=1e-3, eps=1e-6, warmup_steps=1, num_steps=n, **train)
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(list(mesh_shape.values())))])
    model = lavi_jax.LaVi(cfg.model)
    tx = training.make_optimizer(cfg.train)
    patterns = training.trainable_patterns(cfg.train.trainable)
    ids0 = jnp.zeros((1, 8), jnp.int32)
    _, shardings = training.state_shardings(model, tx, patterns, mesh, ids0)
    state = training.create_state(sharding.init_params(model, jax.random.key(0), ids0, mesh=mesh), tx, patterns, shardings)
    step = jax.jit(training.make_train_step(model, tx, cfg.train), out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
    losses = []
    with sharding.use_mesh(mesh):
        for _ in range(n):
            state, m = step(state, sharding.to_global(tiny_batch(cfg, seed=0), mesh))
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def test_sharded_train_steps_equal_single_device():
    single_losses, single = run_steps({"data": 1, "fsdp": 1, "tensor": 1})
    losses, params = run_steps({"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(losses, single_losses, atol=1e-5)
    assert single_losses[2] < single_losses[0]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow  # ~70 s
def test_gradient_accumulation_equals_full_batch():
    full, p_full = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, n=2)
    accum, p_accum = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, n=2, grad_accum=2)
    np.testing.assert_allclose(accum, full, atol=1e-5)
    for a, b in zip(jax.tree.leaves(p_accum), jax.tree.leaves(p_full)):
        np.testing.assert_allclose(a, b, atol=1e-5)


BATCH_MOVES = re.compile(r"\b(all-gather|collective-permute|all-to-all)(-start)?\(")


def sgd_step(mesh_shape, grad_accum):
    """One plain-SGD (lr 1) step of the tiny model on a 16-row batch -> (loss, gradients, compiled HLO text)."""
    cfg = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    cfg.train.update(trainable="all", grad_accum=grad_accum)
    mesh = sharding.make_mesh(mesh_shape)
    model = lavi_jax.LaVi(cfg.model)
    tx = optax.sgd(1.0)
    patterns = training.trainable_patterns(cfg.train.trainable)
    ids0 = jnp.zeros((1, 8), jnp.int32)
    _, shardings = training.state_shardings(model, tx, patterns, mesh, ids0)
    params = sharding.init_params(model, jax.random.key(0), ids0, mesh=mesh)
    before = jax.device_get(params)
    state = training.create_state(params, tx, patterns, shardings)
    batch = sharding.to_global(tiny_batch(cfg, B=16), mesh)
    step = jax.jit(training.make_train_step(model, tx, cfg.train), in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    with sharding.use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
        state, m = compiled(state, batch)
    grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
    return float(m["loss"]), grads, compiled.as_text()


@pytest.mark.slow  # the default run's test_gradient_accumulation_equals_full_batch checks the accumulated step
def test_gradient_accumulation_keeps_each_device_on_its_own_rows():
    """Micro-batches are strided (rows j::k), so splitting a data-parallel batch adds no collective that moves rows."""
    loss1, grads1, hlo1 = sgd_step({"data": 8}, 1)
    loss2, grads2, hlo2 = sgd_step({"data": 8}, 2)
    assert len(BATCH_MOVES.findall(hlo2)) == len(BATCH_MOVES.findall(hlo1)) == 0, BATCH_MOVES.findall(hlo2)[:5]
    np.testing.assert_allclose(loss2, loss1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_reaches_kernels_and_embeddings_only(scan):
    """Decay by role, not ndim: q/k/v biases [H, D], scanned norm scales [L, D] and conditioner biases stay undecayed."""
    from lavi_jax.train.optimizer import DECAYED, NOT_DECAYED, decay_mask

    seen = set()
    for path in ("configs/lavi_qwen2_7b_siglip.py:tiny", "configs/lavi_qwen2_7b_siglip.py:hd,tiny",
                 "configs/lavi_vicuna7b_clip336.py:tiny", "configs/llava_ov_7b_concat.py:tiny"):
        cfg = lavi_jax.configs.get(path)
        cfg.model.scan_layers = scan
        shapes, _ = sharding.abstract_params(lavi_jax.LaVi(cfg.model), jnp.zeros((1, 8), jnp.int32))
        flat_mask = traverse_util.flatten_dict(decay_mask(shapes))
        for k, x in traverse_util.flatten_dict(shapes).items():
            name = k[-1]
            assert name in DECAYED | NOT_DECAYED, f"{path}: {'/'.join(k)} is not classified for weight decay"
            want = name == "kernel" or (name.endswith("embedding") and name not in ("class_embedding", "tile_base_embedding"))
            assert bool(flat_mask[k]) == want, (path, "/".join(k), x.shape)
            seen.add((name, x.ndim))
    # the layouts the old ndim >= 2 rule got wrong are among those checked
    assert ("bias", 2) in seen and (("scale", 2) in seen) == scan and ("tile_row_embedding", 2) in seen


@pytest.mark.slow  # ~80 s; tensor-sharded steps stay in the default run (test_sharded_train_steps_equal_single_device)
def test_tensor_parallel_step_and_generation_with_a_vocabulary_tensor_does_not_divide():
    """Vicuna's 32001 tokens under tensor=8 (here 257 under tensor=2): the vocab dimension stays replicated
    (sharding.UNEVEN_REPLICATED) instead of failing, and the sharded step equals the single-device one."""
    from lavi_jax.generate import Generator

    def run(mesh_shape):
        cfg = lavi_jax.configs.get("configs/lavi_vicuna7b_clip336.py:tiny")
        cfg.model.llm.vocab_size, cfg.model.image_token_id = 257, 256
        cfg.train.update(trainable="all")
        mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(list(mesh_shape.values())))])
        model = lavi_jax.LaVi(cfg.model)
        tx = training.make_optimizer(cfg.train)
        patterns = training.trainable_patterns("all")
        ids0 = jnp.zeros((1, 8), jnp.int32)
        _, shardings = training.state_shardings(model, tx, patterns, mesh, ids0)
        assert shardings.params["llm"]["embed_tokens"]["embedding"].spec[0] == (None if mesh_shape["tensor"] > 1 else "tensor")
        params = sharding.init_params(model, jax.random.key(0), ids0, mesh=mesh)
        state = training.create_state(params, tx, patterns, shardings)
        batch = tiny_batch(cfg)
        batch["input_ids"] = batch["input_ids"] % 256
        batch["input_ids"][:, 2] = cfg.model.image_token_id
        step = jax.jit(training.make_train_step(model, tx, cfg.train), out_shardings=(shardings, sharding.replicated(mesh)))
        with sharding.use_mesh(mesh):
            state, m = step(state, sharding.to_global(batch, mesh))
            out = Generator(model, max_new_tokens=3)(state.params, jnp.asarray(batch["input_ids"][:2, 3:]))
        return float(m["loss"]), np.asarray(out[0])

    loss1, gen1 = run({"data": 1, "fsdp": 1, "tensor": 1})
    loss2, gen2 = run({"data": 2, "fsdp": 1, "tensor": 2})
    np.testing.assert_allclose(loss2, loss1, atol=1e-5)
    np.testing.assert_array_equal(gen2, gen1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes in the default run: test_storage_train's SIGKILL run, test_packing_train
def test_two_processes_match_one_process():
    worker = os.path.join(ROOT, "tests", "distributed_worker.py")
    env = lambda n: dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker, "2", str(i), str(port)], env=env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    multi = json.loads(outs[0][0].strip().splitlines()[-1])
    one = subprocess.run([sys.executable, worker, "1", "0", "0"], env=env(8), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    single = json.loads(one.stdout.strip().splitlines()[-1])
    assert multi["processes"] == 2 and single["processes"] == 1 and multi["devices"] == single["devices"] == 8
    np.testing.assert_allclose(multi["losses"], single["losses"], atol=1e-5)
    # Process 0's 16-token rows are padded to process 1's bucket (24), not to the largest (32); alone: its own 16.
    assert multi["bucket"] == {"seq_len": 24, "pad_tail": 7, "mask_tail": 0}
    assert single["bucket"] == {"seq_len": 16, "pad_tail": 15, "mask_tail": 1}


# ----------------------------------------------------------------------------- the full loop on real data


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_synthetic_vqa(str(tmp_path_factory.mktemp("vqa")), num_train=40, num_eval=8, image_size=32)


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow  # ~80 s; kill-and-resume equality stays in the default run (test_storage_train's SIGKILL test)
def test_resume_reproduces_uninterrupted_run(vqa, tmp_path):
    straight_state, straight = training.train(small_config(vqa), str(tmp_path / "a"))
    training.train(small_config(vqa), str(tmp_path / "b"), stop_at=3)
    assert sorted(metrics(tmp_path / "b")) == [1, 2, 3]
    resumed_state, _ = training.train(small_config(vqa), str(tmp_path / "b"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(jax.device_get(straight_state.params)), jax.tree.leaves(jax.device_get(resumed_state.params))):
        np.testing.assert_array_equal(a, b)
    m = json.loads(open(tmp_path / "a" / "metrics.jsonl").readline())
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(m)
    assert os.listdir(tmp_path / "a" / "tensorboard")
    assert 0.0 <= straight["exact_match"] <= 1.0 and straight["eval_examples"] == 8


@pytest.mark.slow  # ~30 s; frozen bases stay in the default run (test_lora_train, test_qlora)
def test_frozen_params_stay_bit_identical(vqa, tmp_path):
    config = small_config(vqa, trainable="projector+conditioners", num_steps=2, checkpoint_every=2)
    model = lavi_jax.LaVi(config.model)
    state, _ = training.train(config, str(tmp_path))
    start = sharding.init_params(model, jax.random.key(config.train.seed), jnp.zeros((1, 8), jnp.int32),
                                 mesh=sharding.make_mesh(config.mesh.to_dict()))
    before = traverse_util.flatten_dict(jax.device_get(start))
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    patterns = training.trainable_patterns(config.train.trainable)
    frozen = [k for k in before if not training.is_trainable(k, patterns)]
    trained = [k for k in before if training.is_trainable(k, patterns)]
    assert any(k[0] == "vision" for k in frozen) and any(k[0] == "llm" for k in frozen) and trained
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg="/".join(k))
    assert any(not np.array_equal(after[k], before[k]) for k in trained)
    # Optimizer state exists for the trainable params only (AdamW mu and nu).
    opt_leaves = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_leaves == 2 * sum(int(np.prod(before[k].shape)) for k in trained)


@pytest.mark.slow  # ~45 s; skip-and-count of bad records stays in the default run (test_faults' corpus test)
def test_bad_records_are_skipped_and_reported_then_budget_stops_the_run(vqa, tmp_path, capsys):
    records = json.load(open(vqa["train_json"]))
    records[1]["image"] = "images/missing.png"
    records[5]["image"] = "../../etc/passwd"
    records[7]["conversations"] = []
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(records))
    config = small_config(vqa, num_steps=6, checkpoint_every=6)
    config.data.update(train_json=str(bad_json), max_bad_records=5)
    config.evals.exact_match = False
    training.train(config, str(tmp_path / "ok"))
    out = capsys.readouterr().out
    for rid in (records[1]["id"], records[5]["id"], records[7]["id"]):
        assert rid in out
    config.data.max_bad_records = 1
    with pytest.raises(Exception, match="bad record"):
        training.train(config, str(tmp_path / "over"))


@pytest.mark.slow  # ~30 s; the dry run stays in the default run (test_dry_run_tpu.py)
def test_dry_run_reports_memory_and_flops_without_training(tmp_path):
    config = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    config.dry_run = True
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.update(batch_size=8)
    config.data.seq_buckets = (32,)
    report = training.dry_run(config)
    assert report["devices"] == 8 and report["flops_per_step"] > 0
    assert 0 < report["params_bytes_per_device"] < sharding.count_params(
        sharding.abstract_params(lavi_jax.LaVi(config.model), jnp.zeros((1, 8), jnp.int32))[0]) * 4
    assert not os.path.exists(tmp_path / "checkpoints")
    config.train.grad_accum = 2  # the step's FLOPs do not depend on how the batch is split
    accumulated = training.dry_run(config)
    assert accumulated["flops_per_step"] == pytest.approx(report["flops_per_step"], rel=0.1)  # not 1/2


def test_demo_command_runs_end_to_end(tmp_path):
    """The README's main-job command on the quick variant: data written, both fusions trained and scored."""
    env = dict(os.environ, LAVI_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    cmd = [sys.executable, os.path.join(ROOT, "demo.py"), "--config", os.path.join(ROOT, "configs/demo.py:quick"),
           "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out exact match on" in out.stdout and "modulation" in out.stdout and "none" in out.stdout
    results = json.load(open(tmp_path / "demo_results.json"))
    spec = json.load(open(tmp_path / "data" / "spec.json"))
    records = json.load(open(tmp_path / "data" / "train.json"))
    assert len(records) == spec["num_train"]
    assert all(len(r["conversations"]) == 2 * spec["train_turns"] for r in records)
    assert 0 < results["majority_rate"] < 1
    for fusion in ("modulation", "none"):
        r = results["results"][fusion]
        assert r["eval_examples"] == spec["num_eval"] and 0 <= r["exact_match"] <= 1
        assert {"exact_match/colour", "exact_match/count", "exact_match/side"} <= set(r)
        assert os.path.isdir(tmp_path / fusion / "checkpoints")


def test_demo_majority_rate_groups_by_question_type_and_shape_named():
    from lavi_jax.demo.run import majority_rate

    def record(kind, question, answer):
        return {"question_type": kind, "answer": answer,
                "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}

    records = [record("colour", "What colour is the circle?", a) for a in ("red", "red", "blue")]
    records += [record("colour", "What is the colour of the circle?", "red"), record("colour", "What colour is the square?", "blue")]
    records += [record("count", "How many shapes are there?", a) for a in ("one", "two", "two")]
    # circle: red 3 of 4; square: blue 1 of 1; count: two 2 of 3
    assert majority_rate(records) == pytest.approx(6 / 8)


def test_lr_mults_scale_the_updates_of_matching_params():
    c = C.train(learning_rate=1e-2, warmup_steps=1, num_steps=10, clip_grad_norm=0.0, weight_decay=0.1)
    params = {"vision": {"w": jnp.ones((3, 2))}, "projector": {"b": jnp.ones((2,))}, "llm": {"w": jnp.full((2, 2), 2.0)}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)

    def updates(mults):
        c.lr_mults = mults
        tx = training.make_optimizer(c)
        state = tx.init(params)
        for _ in range(2):
            u, state = tx.update(grads, state, params)
        return u

    base = updates(())
    scaled = updates(((r"^vision/", 3.0), (r"^(vision|projector)/", 0.0)))  # first match wins
    np.testing.assert_allclose(scaled["vision"]["w"], 3.0 * base["vision"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(scaled["projector"]["b"], 0.0)
    np.testing.assert_array_equal(scaled["llm"]["w"], base["llm"]["w"])
    assert np.abs(base["vision"]["w"]).min() > 0
    with pytest.raises(ValueError, match="lr_mults"):
        updates(((r"(", 2.0),))


def test_a_data_path_the_user_set_is_used_or_the_run_stops_saying_what_to_pass(tmp_path):
    """train.py without training data stops naming the flag; the demo, which writes its own data, refuses a
    user's data path instead of silently replacing it."""
    from lavi_jax.demo.run import run as run_demo

    config = lavi_jax.configs.get("configs/demo.py:quick")
    with pytest.raises(ValueError, match=r"--config.data.train_json="):
        training.train(config, str(tmp_path / "train"))
    config.data.train_json = str(tmp_path / "mine.json")
    with pytest.raises(ValueError, match=r"config.data.train_json is set.*python train.py"):
        run_demo(config, str(tmp_path / "demo"))
    assert not os.path.exists(tmp_path / "demo" / "data") and not os.path.exists(tmp_path / "train")
