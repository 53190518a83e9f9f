"""LaVi-HD: modulation over anyres tiles (whole image + crops) with a tile-position embedding.

The reference is ``conversions.torch_lavi`` (PyTorch) on the exported weights, whose crop grid comes from
transformers' ``get_anyres_image_grid_shape``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from conversions.torch_lavi import LaViReference
from lavi_jax import config as C
from lavi_jax.data.anyres import num_crops
from lavi_jax.generate import Generator
from lavi_jax.hf import exporter, importer
from lavi_jax.models.lavi import LaVi
from lavi_jax.train.step import loss_terms
from tests import hf_models
from tests.small import perturb

ATOL = 1e-4
S = 32  # the tiny SigLIP's image size
PINPOINTS = ((S, S), (S, 2 * S), (2 * S, S), (2 * S, 2 * S), (S, 3 * S))
MAX_CROPS = 4
# Row 0: a wide and a tall image; row 1: an image and a 3-frame video (sizes (0, 0)).
SIZES = np.asarray([[[20, 90], [90, 33]], [[50, 50], [0, 0]]], np.int32)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    llm, _ = hf_models.qwen2(tmp_path_factory.mktemp("qwen2"), kv_heads=2)
    vis, _ = hf_models.siglip(tmp_path_factory.mktemp("siglip"))
    return llm, vis


def hd_model(towers, tile_embedding="grid", max_frames=4, fusion="modulation"):
    """max_frames=4 < 1 + MAX_CROPS: with the grid embedding image items do not use the temporal table."""
    llm, vis = towers
    base = C.model(fusion=fusion, conditioner=C.conditioner(width=32, num_heads=4),
                   projector=C.projector(max_frames=max_frames, temporal_embedding=fusion == "modulation"),
                   anyres=C.anyres(enabled=True, pinpoints=PINPOINTS, max_crops=MAX_CROPS, tile_embedding=tile_embedding))
    cfg, params = importer.import_hf(llm, vis, base)
    return cfg, perturb(params)


def inputs(cfg):
    """ids [2, 12] with the placeholders, pixels [2, 2, 1 + MAX_CROPS, S, S, 3], masks from each image's crops."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.llm.vocab_size - 2, (2, 12)).astype(np.int32)
    ids[0, [2, 7]] = ids[1, [4, 6]] = cfg.image_token_id
    F = 1 + MAX_CROPS
    pix = rng.normal(size=(2, 2, F, S, S, 3)).astype(np.float32)
    mask = np.zeros((2, 2, F), bool)
    for b in range(2):
        for n in range(2):
            h, w = SIZES[b, n]
            mask[b, n, :1 + num_crops((h, w), PINPOINTS, S) if h else 3] = True
    pix[~mask] = 0
    return ids, pix, mask


@pytest.mark.parametrize("tile_embedding", ["grid", "temporal"])
def test_torch_reference_matches_hd_item(towers, tmp_path, tile_embedding):
    cfg, params = hd_model(towers, tile_embedding, max_frames=4 if tile_embedding == "grid" else 1 + MAX_CROPS)
    assert ("tile_row_embedding" in params["projector"]) == (tile_embedding == "grid")
    out = str(tmp_path / "out")
    exporter.export_params(cfg, params, out)
    ids, pix, mask = inputs(cfg)
    ours = np.asarray(jax.jit(LaVi(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(pix),
                                                 jnp.asarray(mask), image_sizes=jnp.asarray(SIZES)))
    ref = LaViReference.from_pretrained(out)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids), torch.from_numpy(pix), torch.from_numpy(mask),
                     image_sizes=torch.from_numpy(SIZES)).numpy()
        plain = ref.llm(torch.from_numpy(ids).long()).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"torch_lavi HD ({tile_embedding}): max abs logit diff {err:.2e}")
    assert err < ATOL and np.abs(ours - plain).max() > 0.1
    _, back = importer.import_hf(lavi_dir=out)  # the tile tables travel in the lavi/ export
    flat_a, flat_b = traverse_util.flatten_dict(back), traverse_util.flatten_dict(params)
    assert flat_a.keys() == flat_b.keys()


def test_check_logits_cli_on_an_hd_export(towers, tmp_path, capsys):
    """export_hf of a LaVi-HD checkpoint -> check_logits --image (a wide and a tall photo, 1 + 2 and 1 + 3 crops of
    4 slots): the reference gets the crops' mask and the image sizes (its tile grid), exit 0."""
    from PIL import Image

    from conversions import check_logits
    from lavi_jax import checkpoint

    cfg, params = hd_model(towers)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    checkpoint.save_params(ckpt, C.experiment(cfg), params)
    exporter.export_params(cfg, params, out)
    paths = []
    for name, (h, w) in (("wide", (20, 60)), ("tall", (100, 33))):
        paths += ["--image", str(tmp_path / f"{name}.png")]
        Image.fromarray(np.random.default_rng(h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    assert check_logits.main(["--ckpt", ckpt, "--hf", out, *paths]) == 0
    text = capsys.readouterr().out
    assert "LaViReference" in text and "2 image(s)" in text, text


def test_temporal_tiles_need_the_frames(towers):
    cfg, params = hd_model(towers, "temporal", max_frames=4)
    ids, pix, mask = inputs(cfg)
    with pytest.raises(ValueError, match="5 frames exceed projector.max_frames=4"):
        LaVi(cfg).apply({"params": params}, ids, pix, mask, image_sizes=SIZES)


def test_tile_positions_change_the_answer(towers):
    """The grid embedding reads image_sizes: a different grid for the same pixels moves the logits after the image."""
    cfg, params = hd_model(towers)
    ids, pix, mask = inputs(cfg)
    apply = jax.jit(LaVi(cfg).apply)
    a = np.asarray(apply({"params": params}, ids, pix, mask, image_sizes=SIZES))
    other = SIZES.copy()
    other[0, 0] = (90, 20)  # 2 x 1 instead of 1 x 2 crops: same number of frames, other positions
    b = np.asarray(apply({"params": params}, ids, pix, mask, image_sizes=other))
    np.testing.assert_array_equal(a[1], b[1])  # the other row is untouched
    np.testing.assert_array_equal(a[0, :2], b[0, :2])  # before the image
    assert np.abs(a[0, 2:] - b[0, 2:]).max() > 1e-3


def test_concat_greedy_generation_equals_full_forward(towers):
    """Anyres concat: Generator (its cached prefix laid out from image_sizes) = argmax of full forwards."""
    cfg, params = hd_model(towers, fusion="concat")
    ids, pix, mask = inputs(cfg)
    model = LaVi(cfg)
    tokens, _ = Generator(model, max_new_tokens=2, buckets=None)(params, ids, None, pix, mask, SIZES)
    forward = jax.jit(model.apply)
    seq = ids
    for i in range(2):
        logits = forward({"params": params}, seq, pix, mask, image_sizes=SIZES)
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)
        np.testing.assert_array_equal(np.asarray(tokens)[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)


def test_generation_and_training_take_image_sizes(towers):
    """Generator's first token logits equal the forward's; the loss has gradients on the tile tables."""
    cfg, params = hd_model(towers)
    ids, pix, mask = inputs(cfg)
    model = LaVi(cfg)
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids, pix, mask, image_sizes=SIZES))
    state = Generator(model, max_new_tokens=2).prefill(params, ids, None, pix, mask, SIZES)
    np.testing.assert_allclose(np.asarray(state["logits"]), full[:, -1], atol=ATOL)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32),
             "pixel_values": pix, "item_mask": mask, "image_sizes": SIZES}
    grads = jax.jit(jax.grad(lambda p: loss_terms(model, p, batch)[0]))(params)
    for name in ("tile_base_embedding", "tile_row_embedding", "tile_col_embedding"):
        assert np.abs(np.asarray(grads["projector"][name])).max() > 0, name


def test_eval_runner_and_predict_hd(tmp_path):
    """A LaVi-HD checkpoint: the eval runner (batched, 1 + max_crops frames) and python -m lavi_jax.predict's
    Predictor (frames trimmed to those used) give the same greedy answers on a wide and a tall image."""
    import json

    from PIL import Image

    from lavi_jax import checkpoint, sharding
    from lavi_jax import eval as lavi_eval
    from lavi_jax.data import make_components
    from lavi_jax.data.anyres import AnyresProcessor
    from lavi_jax.demo.synthetic import write_synthetic_vqa
    from lavi_jax.predict import Predictor
    from tests.test_eval import random_params, tiny_config

    paths = write_synthetic_vqa(str(tmp_path / "data"), num_train=1, num_eval=2, image_size=64)
    records = json.load(open(paths["eval_json"]))
    for r, (w, h) in zip(records, ((150, 40), (30, 100))):  # other aspect ratios: other grids (1x3, 2x1)
        path = f"{paths['image_root']}/{r['image']}"
        Image.open(path).convert("RGB").resize((w, h)).save(path)
    config = tiny_config(paths)
    s = config.model.vision.image_size
    config.model.anyres.update(enabled=True, pinpoints=((s, s), (s, 2 * s), (2 * s, s), (2 * s, 2 * s), (s, 3 * s)),
                               max_crops=4)
    config.evals.update(tasks="llava_json", max_new_tokens=4)
    config.evals.llava_json.update(questions=paths["eval_json"], image_root=paths["image_root"])
    ckpt = checkpoint.save_params(str(tmp_path / "ckpt"), config, random_params(config))

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tokenizer, processor = make_components(config)
    assert isinstance(processor, AnyresProcessor)
    params = checkpoint.restore_params(ckpt, config.model, mesh)
    runner = lavi_eval.make_runner(config, LaVi(config.model), mesh, tokenizer, processor)
    (result,) = lavi_eval.run_tasks(runner, params, lavi_eval.tasks_from_config(config), print_summary=False)
    assert result["num_failed"] == 0

    predictor = Predictor(ckpt, max_new_tokens=4)
    for row, r in zip(result["per_sample"], records):
        inputs = predictor.inputs(row["prompt"], [f"{paths['image_root']}/{r['image']}"])
        h, w = np.asarray(Image.open(f"{paths['image_root']}/{r['image']}")).shape[:2]
        assert inputs[4].tolist() == [[[h, w]]] and inputs[2].shape[2] == 1 + num_crops((h, w), config.model.anyres.pinpoints, s)
        assert predictor.answer(inputs) == row["prediction"]


@pytest.mark.slow
def test_training_run_on_anyres_records(tmp_path):
    """train.py's loop on records of three aspect ratios, 8 devices (data 2 x fsdp 2 x tensor 2): the batches
    carry tiles and image_sizes, the loss is finite and the end-of-run exact match sees every eval record."""
    import json
    import os

    from PIL import Image

    from lavi_jax.demo.synthetic import write_synthetic_vqa
    from lavi_jax.train import loop as training
    from tests.small import small_config

    vqa = write_synthetic_vqa(str(tmp_path / "data"), num_train=16, num_eval=8, image_size=64)
    for i, r in enumerate(json.load(open(vqa["train_json"])) + json.load(open(vqa["eval_json"]))):
        path = os.path.join(vqa["image_root"], r["image"])
        Image.open(path).convert("RGB").resize(((64, 150, 40)[i % 3], (64, 40, 100)[i % 3])).save(path)
    config = small_config(vqa, num_steps=3, checkpoint_every=3)
    config.model.anyres.update(enabled=True, pinpoints=((S, S), (S, 2 * S), (2 * S, S), (2 * S, 2 * S)), max_crops=4)
    state, metrics = training.train(config, str(tmp_path / "w"))
    assert np.isfinite(metrics["loss"]) and metrics["bad_records"] == 0
    assert metrics["eval_examples"] == 8 and metrics["eval_bad_records"] == 0
    assert "tile_row_embedding" in state.params["projector"]


def test_torch_reference_refuses_anyres_concat(towers, tmp_path):
    cfg, params = hd_model(towers, fusion="concat")
    exporter.export_params(cfg, params, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no anyres concat path"):
        LaViReference.from_pretrained(str(tmp_path / "out"))


@pytest.mark.parametrize("path", [pytest.param("configs/lavi_qwen2_7b_siglip.py:hd,tiny", marks=pytest.mark.slow),
                                  "configs/llava_ov_7b_concat.py:tiny"])
def test_anyres_without_image_sizes_fails_naming_them(path):
    """LaVi-HD's tile embedding and anyres concat's crop layout both come from image_sizes: a call without them
    stops (before, LaVi-HD silently gave crops the clamped temporal table)."""
    cfg = C.get(path).model
    cfg.anyres.update(enabled=True, pinpoints=((S, S), (S, 2 * S), (2 * S, S), (2 * S, 2 * S)), max_crops=MAX_CROPS)
    model = LaVi(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 500, (1, 12)), jnp.int32).at[0, 2].set(cfg.image_token_id)
    pix = jnp.asarray(rng.normal(size=(1, 1, 1 + MAX_CROPS, S, S, 3)), jnp.float32)
    sizes = jnp.asarray([[[40, 70]]], jnp.int32)
    params = model.init(jax.random.key(0), ids, pix, image_sizes=sizes)["params"]
    assert np.isfinite(np.asarray(model.apply({"params": params}, ids, pix, image_sizes=sizes))).all()
    with pytest.raises(ValueError, match="image_sizes"):
        model.apply({"params": params}, ids, pix)
