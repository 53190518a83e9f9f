"""The LoRA demo (configs/demo_lora.py): a trained demo model tuned on a question kind it never saw, and the
synthetic-data options it needs (``eval_kinds``, ``eval_unseen``) leaving the default demo data unchanged."""

import collections
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import lavi_jax
from lavi_jax import checkpoint, lora, sharding
from lavi_jax.demo.synthetic import write_synthetic_vqa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of train.json, eval.json and of every file (relative path + bytes, sorted), written by the code before
# eval_kinds / eval_unseen existed: the demo's records, images and their order must not move.
DEMO_SPEC = dict(num_train=24, num_eval=12, seed=0, image_size=64, train_turns=1,
                 train_kinds=("colour", "count", "side", "side"), grid=4, sentences=True, jitter=False)
BEFORE = [
    (DEMO_SPEC, "3d126f44070ecc04a99f565636944509e35fca46bb39f9674f8ee9310d505b9e",
     "04c478f1ba6411e65c6b4460500cdcc50a4c936106ea57438f46df80dc5e7632",
     "c71000fe29c4960d425ee967b90bf161457e75cbef10e2ca0c6c62e9b2e0230f"),
    (dict(num_train=24, num_eval=12, seed=3, image_size=32), "2334526f65d87780ef88f9f833d693a9ec2e2839150675fb21d854af703f04f4",
     "f59e73ae11599cafbde3ef134da256bbfbb25c0893aecaf396af7b645d196961",
     "6536073ac7107f3b4e25a1ac7e0c69a2697ba91fd9cb775cc5be964e109e76b8"),
    (dict(num_train=12, num_eval=6, seed=1, image_size=32, train_turns=3, train_kinds=("colour", "count", "side", "shape")),
     "e80d7783252c7a578ae3f3609562e680384132b720ef1c085f06e45aaa109d4e",
     "2ac9ad7546457febc592f96c63df6bbcdb5b1c6be08e04dfd30c43dba9256668",
     "f79a9f2b45647c5b36eba9ddfb803f786bc9d9fdc5561eda7b1cd0ab27e37ca9"),
]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tree_sha(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


@pytest.mark.parametrize("spec,train_sha,eval_sha,all_sha", BEFORE, ids=["demo", "plain", "multi-turn"])
def test_default_held_out_kinds_write_the_same_records_and_images_as_before(tmp_path, spec, train_sha, eval_sha, all_sha):
    paths = write_synthetic_vqa(str(tmp_path), **spec)
    assert (sha(paths["train_json"]), sha(paths["eval_json"]), tree_sha(str(tmp_path))) == (train_sha, eval_sha, all_sha)


def pixels(root, record):
    return np.asarray(Image.open(os.path.join(root, record["image"])).convert("RGB"))


def named_shape(image, colour):
    """The shape drawn in ``colour`` (RGB), told from the pixels: the share of its bounding box it fills
    (square 1, circle pi/4, triangle 1/2)."""
    ys, xs = np.nonzero((image == colour).all(-1))
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"


def test_new_held_out_kind_on_images_unseen_in_training(tmp_path):
    """eval_kinds=("shape",) with eval_unseen: every held-out record asks a shape, its answer is the shape the
    pixels show in the named colour, and no held-out image equals a training image (without eval_unseen, the
    same draw repeats training images)."""
    from lavi_jax.demo.synthetic import COLOURS

    kw = dict(num_train=600, num_eval=200, seed=5, image_size=64, train_kinds=("shape",), grid=4, sentences=True,
              jitter=False, eval_kinds=("shape",))
    seen = {}
    for unseen in (False, True):
        root = str(tmp_path / str(unseen))
        paths = write_synthetic_vqa(root, eval_unseen=unseen, **kw)
        train, held_out = (json.load(open(paths[k])) for k in ("train_json", "eval_json"))
        assert collections.Counter(r["question_type"] for r in train + held_out) == {"shape": 800}
        train_images = {pixels(root, r).tobytes() for r in train}
        seen[unseen] = sum(pixels(root, r).tobytes() in train_images for r in held_out)
        for r in held_out[:60]:
            colour = next(c for c in COLOURS if c in r["conversations"][0]["value"])
            assert r["answer"] == f"The {colour} shape is a {named_shape(pixels(root, r), COLOURS[colour])}."
    assert seen[True] == 0 < seen[False]
    with pytest.raises(ValueError, match="eval_kinds"):
        write_synthetic_vqa(str(tmp_path / "bad"), num_train=2, num_eval=2, eval_kinds=("size",))


@pytest.mark.slow  # a demo-model checkpoint, then demo.py in a subprocess (~50 s on 2 quiet cores)
def test_lora_demo_quick_tunes_adapters_only_from_a_demo_checkpoint(tmp_path):
    """``python demo.py --config configs/demo_lora.py:quick`` end to end (one CPU device) from a saved demo-model
    checkpoint: the start checkpoint and the tuned model are both scored on shape questions only, every base
    param is left as it was, the adapters move, and under 5 % of the params train."""
    base_config = lavi_jax.configs.get("configs/demo.py")
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    base = sharding.init_params(lavi_jax.LaVi(base_config.model), jax.random.key(0), np.zeros((1, 8), np.int32),
                                mesh=mesh)
    checkpoint.save_params(str(tmp_path / "base"), base_config, base)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--workdir", str(tmp_path / "lora"),
                          "--config", os.path.join(ROOT, "configs/demo_lora.py:quick"),
                          f"--config.init.checkpoint={tmp_path / 'base'}"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "start" in out.stdout and "shape" in out.stdout and "colour" not in out.stdout
    summary = json.load(open(tmp_path / "lora" / "demo_results.json"))
    r = summary["results"]["modulation"]
    assert {k for k in r if k.startswith("exact_match/")} == {"exact_match/shape"} == \
        {k for k in summary["start"] if k.startswith("exact_match/")}
    held_out = json.load(open(tmp_path / "lora" / "data" / "eval.json"))
    assert {x["question_type"] for x in held_out} == {"shape"}

    _, params = checkpoint.restore_run_params(str(tmp_path / "lora" / "modulation"), mesh)
    tuned, before = traverse_util.flatten_dict(jax.device_get(params)), traverse_util.flatten_dict(jax.device_get(base))
    adapters = {k for k in tuned if k[-1] in lora.ADAPTERS}
    assert set(tuned) - set(before) == adapters
    assert any("conditioner" in k for k in adapters) and any("self_attn" in k for k in adapters)
    for k, v in before.items():  # frozen: bit for bit
        np.testing.assert_array_equal(tuned[k], v, err_msg="/".join(k))
    assert all(np.abs(tuned[k]).max() > 0 for k in adapters if k[-1] == "lora_b")
    n_adapters = sum(tuned[k].size for k in adapters)
    n_base = sum(v.size for v in before.values())
    assert (r["trainable_params"], r["model_params"]) == (n_adapters, n_base)
    assert n_adapters < 0.05 * n_base
    assert f"({n_adapters / n_base:.2%})" in out.stdout
