"""Checkpoint porting: HF import (streaming, sharded, scanned), HF export bit for bit, LLaVA, the PyTorch
LaVi reference, the logit checker and the CLIs' error messages."""

import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from PIL import Image

import lavi_jax
from conversions import check_logits, export_hf as export_cli, import_hf as import_cli
from conversions.torch_lavi import LaViReference
from lavi_jax import checkpoint
from lavi_jax import config as C
from lavi_jax import sharding
from lavi_jax.hf import exporter, importer, mapping, placement, safetensors_io
from lavi_jax.hf.safetensors_io import SafetensorsReader
from lavi_jax.models.lavi import LaVi
from tests import hf_models
from tests.small import perturb

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Builds (once per module) tiny random HF models by name: ``hf("qwen2", tie=True)`` -> (dir, model)."""
    cache = {}

    def get(kind, **kw):
        key = (kind, tuple(sorted(kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(kind)
            cache[key] = getattr(hf_models, kind)(path, **kw)
        return cache[key]

    return get


def tensors(path) -> dict:
    reader = SafetensorsReader(path)
    return {n: reader.get(n) for n in reader.names()}


def ids_batch(vocab, image_token_id=None, placeholders=(), T=12, B=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 2, (B, T)).astype(np.int32)
    for b, ps in enumerate(placeholders):
        ids[b, list(ps)] = image_token_id
    return ids


def assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


# ----------------------------------------------------------------------------- LLM round trips


LLM_CASES = [(arch, tie, gqa) for arch in ("qwen2", "llama") for tie in (False, True) for gqa in (False, True)]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("arch,tie,gqa", LLM_CASES, ids=[f"{a}-{'tied' if t else 'untied'}-{'gqa' if g else 'mha'}" for a, t, g in LLM_CASES])
def test_llm_roundtrip_is_bit_exact(hf, tmp_path, arch, tie, gqa, scan):
    path, model = hf(arch, tie=tie, kv_heads=2 if gqa else 4)
    cfg, params = importer.import_hf(path, scan=scan)
    assert cfg.fusion == "none" and cfg.scan_layers == scan and cfg.llm.tie_word_embeddings == tie
    assert ("blocks" in params["llm"]) == scan
    exporter.export_params(cfg, params, str(tmp_path / "out"))
    src, dst = tensors(path), tensors(str(tmp_path / "out" / "llm"))
    assert sorted(src) == sorted(dst)
    for name in src:
        assert src[name].dtype == dst[name].dtype == np.float32
        assert src[name].tobytes() == dst[name].tobytes(), name
    back, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "llm"), output_loading_info=True)
    assert type(back) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("arch,scan", [("qwen2", False), ("llama", True)])
def test_cli_import_then_load_matches_hf_logits(hf, tmp_path, arch, scan, capsys):
    """``import_hf`` CLI -> ``lavi_jax.load`` gives the source model's logits (float32, within 1e-4); the
    tokenizer travels with the checkpoint and its export."""
    path, model = hf(arch, tie=arch == "qwen2", kv_heads=2)
    shutil.copytree(path, tmp_path / "hf")
    hf_models.tokenizer(tmp_path / "hf")
    out, exported = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert import_cli.main(["--llm", str(tmp_path / "hf"), "--out", out] + (["--scan"] if scan else [])) == 0
    assert "wrote" in capsys.readouterr().out
    config = checkpoint.read_config(out)
    assert checkpoint.tokenizer_dir(out) == config.data.tokenizer == os.path.join(out, "tokenizer")
    from lavi_jax.data.tokenizer import HFTokenizer

    assert HFTokenizer(config.data.tokenizer).image_token_id == config.model.image_token_id < config.model.llm.vocab_size
    lm, params = lavi_jax.load(out)
    ids = ids_batch(config.model.llm.vocab_size)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ours = np.asarray(jax.jit(lm.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(pos).long()).logits.numpy()
    err = np.abs(ours - ref)[mask.astype(bool)].max()
    print(f"{arch} (scan={scan}) via CLI + lavi_jax.load: max abs logit diff vs HF {err:.2e}")
    assert err < ATOL and np.abs(ref).max() > 0.1
    assert import_cli.main(["--llm", str(tmp_path / "hf"), "--out", out]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err

    assert export_cli.main(["--ckpt", out, "--out", exported]) == 0
    assert sorted(os.listdir(exported)) == ["llm"]
    assert transformers.AutoTokenizer.from_pretrained(os.path.join(exported, "llm"))("a red circle")["input_ids"]
    assert check_logits.main(["--ckpt", out, "--hf", os.path.join(exported, "llm"), "--prompt", "a red circle"]) == 0
    report = capsys.readouterr().out
    assert "tokenizer: " + os.path.join(out, "tokenizer") in report and "OK" in report


def test_sharded_import_equals_unsharded(hf, monkeypatch):
    """data 2 x fsdp 2 x tensor 2 on 8 CPU devices: the same values, in their shards (device-side layer stacking)."""
    assert jax.device_count() == 8
    llm, _ = hf("qwen2", kv_heads=2)
    vis, _ = hf("siglip")
    base = C.model(conditioner=C.conditioner(width=32, num_heads=4), scan_layers=True)
    monkeypatch.setattr(placement, "HOST_STACK_BYTES", 0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, sharded = importer.import_hf(llm, vis, base, mesh=mesh)
    monkeypatch.setattr(placement, "HOST_STACK_BYTES", 2**30)
    _, single = importer.import_hf(llm, vis, base, mesh=sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert_trees_equal(sharded, single)
    up = sharded["llm"]["blocks"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # [layers, embed, mlp]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 32, 48)


def test_import_from_sharded_safetensors(hf, tmp_path, monkeypatch):
    single, _ = hf("qwen2", kv_heads=2)
    multi, _ = hf_models.qwen2(tmp_path / "multi", kv_heads=2, max_shard_size="40KB")
    assert os.path.exists(os.path.join(multi, safetensors_io.INDEX))
    assert len([f for f in os.listdir(multi) if f.endswith(".safetensors")]) > 2
    _, a = importer.import_hf(single)
    monkeypatch.setattr(placement, "CHUNK_BYTES", 1000)  # also: large tensors converted in row chunks
    monkeypatch.setattr(safetensors_io, "READ_CHUNK_BYTES", 1000)  # and read in row chunks
    _, b = importer.import_hf(multi)
    assert_trees_equal(a, b)


def test_bfloat16_checkpoint(tmp_path, monkeypatch):
    """bf16 safetensors are read with numpy (ml_dtypes) and round-trip bit for bit at --dtype bfloat16."""
    _, model = hf_models.qwen2(tmp_path / "f32", kv_heads=2)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    src = tensors(str(tmp_path / "bf16"))
    assert src["model.norm.weight"].dtype == np.dtype("bfloat16")
    cfg, params = importer.import_hf(str(tmp_path / "bf16"), dtype="bfloat16")
    assert params["llm"]["norm"]["scale"].dtype == jnp.bfloat16
    exporter.export_params(cfg, params, str(tmp_path / "out"))
    dst = tensors(str(tmp_path / "out" / "llm"))
    assert all(src[n].tobytes() == dst[n].tobytes() for n in src)
    monkeypatch.setattr(placement, "CHUNK_BYTES", 1000)  # upcast to float32, in row chunks
    _, p32 = importer.import_hf(str(tmp_path / "bf16"))
    for path, name in [(("norm", "scale"), "model.norm.weight"), (("lm_head", "kernel"), "lm_head.weight"),
                       (("layers_1", "mlp", "down_proj", "kernel"), "model.layers.1.mlp.down_proj.weight")]:
        leaf = p32["llm"]
        for k in path:
            leaf = leaf[k]
        want = src[name].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(leaf), want.T if want.ndim == 2 else want)


# ----------------------------------------------------------------------------- errors


def _rewrite(path, drop=(), add=None):
    t = tensors(path)
    for n in drop:
        del t[n]
    t.update(add or {})
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(path, f))
    specs = [(n, x.shape, x.dtype, lambda x=x: x) for n, x in t.items()]
    safetensors_io.write_safetensors(path, specs)


def _edit_config(path, **kv):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(kv)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


ERRORS = {
    "unsupported-model-type": (lambda p: _edit_config(p, model_type="gemma"), "unsupported LLM model_type 'gemma'"),
    "missing-tensor": (lambda p: _rewrite(p, drop=["model.layers.1.mlp.up_proj.weight"]),
                       "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    "shape-mismatch": (lambda p: _edit_config(p, intermediate_size=128),
                       "shape mismatch for model.layers.0.mlp.gate_proj.weight: checkpoint has (96, 64), model expects (128, 64)"),
    "unknown-extra": (lambda p: _rewrite(p, add={"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32),
                                                 "model.mystery": np.zeros(2, np.float32)}),
                      "2 unknown tensor(s)"),
    "sliding-window": (lambda p: _edit_config(p, use_sliding_window=True, sliding_window=64), "sliding-window attention"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_import_errors_are_one_line(tmp_path, capsys, case):
    path, _ = hf_models.qwen2(tmp_path / "hf", kv_heads=2)
    edit, message = ERRORS[case]
    edit(path)
    capsys.readouterr()
    assert import_cli.main(["--llm", path, "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("import_hf: error: ") and "\n" not in err, err
    assert message in err, err
    if case == "unknown-extra":
        assert "model.layers.0.self_attn.extra.weight" in err and "model.mystery" in err


def test_full_siglip_model_as_vision_source(hf, tmp_path):
    """A full SiglipModel dir: the vision tower is mapped, the text tower and heads are reported, not errors."""
    llm, _ = hf("qwen2", kv_heads=2)
    path, model = hf_models.siglip_full(tmp_path / "siglip")
    cfg, sources = importer.plan(llm, path)
    assert cfg.fusion == "modulation" and cfg.vision.hidden_size == 48 and cfg.vision.num_layers == 3
    notes = importer.check_names(sources[1])
    assert any("text tower" in n for n in notes) and any("pooling head" in n for n in notes)
    sd = model.state_dict()
    for e in sources[1].entries:
        assert sources[1].reader.shape(e.hf) == tuple(sd[e.hf].shape)
    for s in sources:
        s.reader.close()


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(safetensors_io.ConversionError, match="pickled"):
        SafetensorsReader(str(tmp_path))


# ----------------------------------------------------------------------------- LLaVA


def llava_inputs(cfg, P, seed=0):
    """Our ids (one placeholder per image) and HF's (each placeholder repeated P times) + the text positions."""
    img = cfg.image_token_id
    ids = ids_batch(cfg.llm.vocab_size, img, [(2, 6), (4, 8)], T=10, seed=seed)
    s = cfg.vision.image_size
    pix = np.random.default_rng(seed).normal(size=(2, 2, 1, s, s, 3)).astype(np.float32)
    rows, pos = [], []
    for b in range(2):
        r, p = [], []
        for t in ids[b]:
            r += [img] * P if t == img else [int(t)]
            p.append(len(r) - 1)
        rows.append(r)
        pos.append(p)
    return ids, pix, torch.tensor(rows), np.asarray(pos)


@pytest.mark.parametrize("vision,text", [("clip", "llama"), ("siglip", "qwen2")])
def test_llava_concat_matches_hf_llava(hf, tmp_path, vision, text):
    """LLaVA -> concat fusion: logits equal HF LLaVA's on two images per row; the export's PyTorch reference too."""
    path, model = hf("llava", vision=vision, text=text)
    notes = []
    cfg, params = importer.import_hf(llava_dir=path, log=notes.append)
    assert cfg.fusion == "concat" and cfg.image_token_id == 299
    assert cfg.vision.drop_cls == (vision == "clip") and tuple(cfg.vision.feature_layers) == ((-2,) if vision == "clip" else (-1,))
    assert any("pooling head" in n for n in notes) == (vision == "siglip")
    P = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    ids, pix, hf_ids, pos = llava_inputs(cfg, P)
    ours = np.asarray(jax.jit(LaVi(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(pix)))
    with torch.no_grad():
        ref = model(input_ids=hf_ids, pixel_values=torch.from_numpy(pix[:, :, 0].reshape((4,) + pix.shape[3:]).transpose(0, 3, 1, 2))).logits.numpy()
    err = np.abs(ours - np.take_along_axis(ref, pos[:, :, None], 1)).max()
    print(f"llava {vision}+{text} concat: max abs logit diff vs HF LLaVA {err:.2e}")
    assert err < ATOL
    exporter.export_params(cfg, params, str(tmp_path / "out"))
    with torch.no_grad():
        torch_ref = LaViReference.from_pretrained(str(tmp_path / "out"))(torch.from_numpy(ids), torch.from_numpy(pix)).numpy()
    err = np.abs(ours - torch_ref).max()
    print(f"llava {vision}+{text} concat: max abs logit diff vs torch_lavi {err:.2e}")
    assert err < ATOL


def test_llava_onevision_import(hf):
    """LLaVA-OneVision: LLM, vision tower, projector and image_newline imported as is, with its anyres geometry."""
    path, model = hf("llava", vision="siglip", text="qwen2", onevision=True)
    notes = []
    cfg, params = importer.import_hf(llava_dir=path, log=notes.append)
    assert cfg.anyres.enabled and cfg.anyres.aspect == model.config.vision_aspect_ratio
    np.testing.assert_array_equal(np.asarray(params["image_newline"]), model.model.image_newline.detach().numpy())
    src = tensors(path)
    find = lambda suffix: next(v for k, v in src.items() if k.endswith(suffix))
    np.testing.assert_array_equal(np.asarray(params["projector"]["linear_2"]["kernel"]), find("multi_modal_projector.linear_2.weight").T)
    np.testing.assert_array_equal(np.asarray(params["vision"]["layers_2"]["fc1"]["bias"]), find("encoder.layers.2.mlp.fc1.bias"))
    np.testing.assert_array_equal(np.asarray(params["llm"]["embed_tokens"]["embedding"]),
                                  model.get_input_embeddings().weight.detach().numpy())
    # LaVi on LLaVA-OV's towers: the LLaVA projector is left out (reported), ours is fresh.
    notes = []
    cfg, params = importer.import_hf(llava_dir=path, fusion="modulation",
                                      base=C.model(conditioner=C.conditioner(width=32, num_heads=4)), log=notes.append)
    assert cfg.fusion == "modulation" and any("LLaVA projector" in n for n in notes)
    assert params["projector"]["linear_1"]["kernel"].shape == (48, 32)


# ----------------------------------------------------------------------------- PyTorch LaVi reference


VARIANTS = {
    "attention": dict(conditioner=dict(), projector=dict()),
    "mlp-final-pool2": dict(conditioner=dict(type="mlp", final_norm=True), projector=dict(pool=2)),
    "conv-every2-shift-scan": dict(conditioner=dict(type="conv", every=2, offset=1, params=("shift",)), projector=dict(), scan=True),
    "shared-attn-scale-linear": dict(conditioner=dict(shared=True, norms=("attn",), params=("scale",)), projector=dict(type="linear")),
    "kv-share-all-scan": dict(conditioner=dict(kv_share="all"), projector=dict(), scan=True),
    "kv-share-1-final": dict(conditioner=dict(kv_share="1", final_norm=True, norms=("mlp",)), projector=dict()),
    "kv-share-all-video-pool2": dict(conditioner=dict(kv_share="all"), projector=dict(video_pool=2)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_reference_matches_jax(hf, tmp_path, variant):
    """Export -> torch_lavi logits equal the JAX model's on 2 items x 2 frames; --lavi imports the export back."""
    v = VARIANTS[variant]
    llm, _ = hf("qwen2", kv_heads=2)
    vis, _ = hf("clip") if variant == "attention" else hf("siglip")
    base = C.model(conditioner=C.conditioner(width=32, num_heads=4, **v["conditioner"]),
                   projector=C.projector(max_frames=4, **v["projector"]), scan_layers=v.get("scan", False),
                   vision=C.vision(feature_layers=(-2, -1)))
    cfg, params = importer.import_hf(llm, vis, base)
    params = perturb(params)
    out = str(tmp_path / "out")
    exporter.export_params(cfg, params, out)
    assert json.load(open(os.path.join(out, "lavi", "config.json")))["modulated_norms"] == mapping.modulated_norms(cfg)

    ids = ids_batch(cfg.llm.vocab_size, cfg.image_token_id, [(2, 7), (5,)])
    s = cfg.vision.image_size
    pix = np.random.default_rng(1).normal(size=(2, 2, 2, s, s, 3)).astype(np.float32)
    mask = np.ones((2, 2, 2), bool)
    mask[0, 1, 1] = False
    ours = np.asarray(jax.jit(LaVi(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask)))
    ref_model = LaViReference.from_pretrained(out)
    with torch.no_grad():
        theirs = ref_model(torch.from_numpy(ids), torch.from_numpy(pix), torch.from_numpy(mask)).numpy()
        plain = ref_model.llm(torch.from_numpy(ids).long()).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"torch_lavi {variant}: max abs logit diff {err:.2e} (images move logits by {np.abs(ours - plain).max():.2f})")
    assert err < ATOL
    assert np.abs(ours - plain).max() > 0.1  # the deltas matter
    np.testing.assert_allclose(ours[0, :2], plain[0, :2], atol=ATOL)  # before the first image: the plain LLM

    _, back = importer.import_hf(lavi_dir=out)
    assert_trees_equal(back, params)
    if variant in ("attention", "kv-share-1-final"):  # weights saved from PyTorch import back too
        ref_model.save_pretrained(str(tmp_path / "from_torch"))
        _, back = importer.import_hf(lavi_dir=str(tmp_path / "from_torch"))
        assert_trees_equal(back, params)


def test_cli_export_reimport_and_check_logits(hf, tmp_path, capsys):
    """import_hf --config -> (train) -> export_hf -> import_hf --lavi through the CLIs, and check_logits."""
    llm, _ = hf("llama", kv_heads=2)
    vis, _ = hf("siglip")
    conf = tmp_path / "tiny.py"
    conf.write_text("from lavi_jax import config as C\n\n\ndef get_config(arg=''):\n    c = C.ConfigDict()\n"
                    "    c.model = C.model(conditioner=C.conditioner(width=32, num_heads=4))\n    return c\n")
    ckpt, trained, out, back = (str(tmp_path / n) for n in ("ckpt", "trained", "out", "back"))
    assert import_cli.main(["--llm", llm, "--vision", vis, "--config", str(conf), "--out", ckpt]) == 0
    config = checkpoint.read_config(ckpt)
    assert config.model.fusion == "modulation" and config.model.conditioner.width == 32
    assert config.data.processor == "siglip" and config.data.image_size == 32
    _, params = lavi_jax.load(ckpt)
    checkpoint.save_params(trained, config, perturb(params))  # stands in for a trained checkpoint
    assert export_cli.main(["--ckpt", trained, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["lavi", "llm", "vision"]
    vision, info = transformers.SiglipVisionModel.from_pretrained(os.path.join(out, "vision"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert import_cli.main(["--lavi", out, "--out", back]) == 0
    assert_trees_equal(lavi_jax.load(trained)[1], lavi_jax.load(back)[1])
    capsys.readouterr()

    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    assert check_logits.main(["--ckpt", trained, "--hf", out, "--image", str(image), "--image", str(image)]) == 0
    text = capsys.readouterr().out
    assert "LaViReference" in text and "2 image(s)" in text and "fixed ids" in text, text
    assert "top-1 agreement  1.0000" in text
    other, _ = hf("llama", kv_heads=2, seed=1)
    assert check_logits.main(["--ckpt", trained, "--hf", other]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_mesh_is_the_configs_with_flags_replacing_axes():
    config = C.ConfigDict({"mesh": {"data": -1, "fsdp": 4, "tensor": 1}})
    args = lambda **kw: argparse.Namespace(**{"mesh_data": None, "mesh_fsdp": None, "mesh_tensor": None, **kw})
    assert import_cli.mesh_shape(args(mesh_tensor=2), config) == {"data": -1, "fsdp": 4, "tensor": 2}
    assert import_cli.mesh_shape(args(), None) is None and import_cli.mesh_shape(args(mesh_fsdp=8), None) == {"fsdp": 8}
