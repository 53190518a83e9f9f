"""PEFT parity both ways: adapters PEFT trained import with PEFT's logits, exported ones load in PEFT with ours.

References are transformers + PEFT themselves on tiny random Qwen2 / LLaMA models built here, with random
non-zero A and B; several ranks, alphas, target sets and rslora; unmerged and merged; 1e-4 on float32 logits.
"""

import copy
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from flax import traverse_util

import lavi_jax
from conversions import check_logits, export_hf as export_cli, import_hf as import_cli
from lavi_jax import checkpoint, lora, sharding
from lavi_jax.hf import UnsupportedModel, peft
from tests import hf_models

ATOL = 1e-4
# (arch, scan, r, alpha, PEFT target_modules, rslora, layers_to_transform)
slow = pytest.mark.slow  # more of the same at ~1 min each on 2 shared cores: in the full run
CASES = [
    ("qwen2", False, 4, 8.0, ["q_proj", "v_proj"], False, None),
    pytest.param("llama", True, 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 True, None, marks=slow),
    pytest.param("qwen2", False, 2, 6.0, ["o_proj", "down_proj", "gate_proj"], False, [1], marks=slow),
]
IDS = ["qwen2-unrolled-r4-a8-qv", "llama-scan-r8-a16-rslora-all", "qwen2-unrolled-r2-a6-layer1"]


def ids_batch(vocab, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, (2, 10)).astype(np.int32)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits.numpy()


def jax_logits(model, params, ids):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))


def assert_close(got, want, what):
    err = float(np.abs(got - want).max())
    print(f"{what}: max abs logit diff {err:.2e}")
    assert err <= ATOL, (what, err)


def randomize_adapters(peft_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def assert_peft_loads_every_key(peft_model, adapter_dir):
    """PEFT fills what it finds and warns about the rest: reload as a second adapter and read its load result."""
    result = peft_model.load_adapter(adapter_dir, adapter_name="check")
    assert not result.missing_keys and not result.unexpected_keys, result
    peft_model.delete_adapter("check")


@pytest.mark.parametrize("arch,scan,r,alpha,targets,rslora,layers", CASES, ids=IDS)
def test_peft_adapter_imports_with_peft_logits(tmp_path, arch, scan, r, alpha, targets, rslora, layers):
    base_dir, base = getattr(hf_models, arch)(tmp_path / "base")
    pm = hf_peft.get_peft_model(copy.deepcopy(base), hf_peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
        layers_to_transform=layers))
    randomize_adapters(pm, seed=r)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ckpt = str(tmp_path / "ckpt")
    assert import_cli.main(["--llm", base_dir, "--lora", str(tmp_path / "adapter"), "--out", ckpt]
                           + (["--scan"] if scan else [])) == 0
    config = checkpoint.read_config(ckpt)
    spec = checkpoint.lora_spec(config)
    assert (spec.rank, spec.alpha, spec.rslora) == (r, alpha, rslora)
    ids = ids_batch(config.model.llm.vocab_size)
    ref = torch_logits(pm, ids)
    assert np.abs(ref - torch_logits(base, ids)).max() > 1e-2  # the adapter matters

    _, params = checkpoint.restore_run_params(ckpt)
    n_adapters = sum(1 for k in traverse_util.flatten_dict(params) if k[-1] == "lora_a")
    assert n_adapters == (len(targets) if scan else len(targets) * (len(layers) if layers else 2))
    unmerged = jax_logits(lora.wrap(lavi_jax.LaVi(config.model), spec), params, ids)
    assert_close(unmerged, ref, f"PEFT -> lavi_jax {arch} r={r} unmerged")

    model, merged = lavi_jax.load(ckpt)  # merged at load
    ref_merged = torch_logits(copy.deepcopy(pm).merge_and_unload(), ids)
    assert_close(jax_logits(model, merged, ids), ref_merged, f"PEFT -> lavi_jax {arch} r={r} merged")


def random_lora_checkpoint(tmp_path, arch, scan, spec_kw, seed=0):
    """An imported base plus JAX-side random adapters, saved as a LoRA checkpoint -> (ckpt, config, params, base)."""
    base_dir, base = getattr(hf_models, arch)(tmp_path / "base")
    plain = str(tmp_path / "plain")
    assert import_cli.main(["--llm", base_dir, "--out", plain] + (["--scan"] if scan else [])) == 0
    config = checkpoint.read_config(plain)
    config.train.lora.update(spec_kw)
    spec = checkpoint.lora_spec(config)
    _, params = lavi_jax.load(plain)
    target, _ = sharding.abstract_params(lora.wrap(lavi_jax.LaVi(config.model), spec), jnp.zeros((1, 8), jnp.int32))
    flat = traverse_util.flatten_dict(jax.device_get(params))
    keys = jax.random.split(jax.random.key(seed), 1000)
    for i, (k, t) in enumerate(traverse_util.flatten_dict(target).items()):
        if k[-1] in lora.ADAPTERS:
            flat[k] = np.asarray(0.1 * jax.random.normal(keys[i], t.shape, t.dtype))
    params = traverse_util.unflatten_dict(flat)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_params(ckpt, config, params)
    return ckpt, config, params, base


@pytest.mark.parametrize("arch,scan,spec_kw", [
    pytest.param("qwen2", True, dict(rank=4, alpha=8.0, targets="llm"), marks=slow),
    ("llama", False, dict(rank=3, alpha=5.0, rslora=True,
                          targets=r"^llm/layers_1/self_attn/[qv]_proj$,^llm/layers_0/mlp/up_proj$")),
], ids=["qwen2-scan-all", "llama-some-rslora"])
def test_exported_adapter_loads_in_peft_with_our_logits(tmp_path, arch, scan, spec_kw):
    ckpt, config, params, base = random_lora_checkpoint(tmp_path, arch, scan, spec_kw)
    spec = checkpoint.lora_spec(config)
    ids = ids_batch(config.model.llm.vocab_size, seed=1)
    ours = jax_logits(lora.wrap(lavi_jax.LaVi(config.model), spec), params, ids)

    out = str(tmp_path / "out")
    assert export_cli.main(["--ckpt", ckpt, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["llm", "lora"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Found missing adapter keys" would be a warning
        pm = hf_peft.PeftModel.from_pretrained(hf_base, os.path.join(out, "lora"))
    assert_peft_loads_every_key(pm, os.path.join(out, "lora"))
    pm.eval()
    assert_close(torch_logits(pm, ids), ours, f"lavi_jax -> PEFT {arch} unmerged")
    assert np.abs(ours - torch_logits(base, ids)).max() > 1e-2
    assert_close(torch_logits(pm.merge_and_unload(), ids), ours, f"lavi_jax -> PEFT {arch} merge_and_unload")

    merged_out = str(tmp_path / "merged")
    assert export_cli.main(["--ckpt", ckpt, "--out", merged_out, "--merge-lora"]) == 0
    assert sorted(os.listdir(merged_out)) == ["llm"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(merged_out, "llm")).eval()
    assert_close(torch_logits(merged, ids), ours, f"lavi_jax --merge-lora -> HF {arch}")
    # check_logits takes the LoRA checkpoint (merged at load) against the merged export.
    assert check_logits.main(["--ckpt", ckpt, "--hf", os.path.join(merged_out, "llm"), "--prompt", "a red circle"]) == 0


@pytest.mark.parametrize("option,value", [("use_dora", True), ("fan_in_fan_out", True), ("bias", "lora_only"),
                                          ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8})])
def test_unsupported_peft_option_fails_naming_it(tmp_path, option, value):
    import json

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"], option: value}))
    with pytest.raises(UnsupportedModel, match=option):
        peft.read_adapter_config(str(d))


@slow
def test_adapter_on_an_unsupported_module_fails_naming_it(tmp_path, capsys):
    base_dir, base = hf_models.qwen2(tmp_path / "base")
    pm = hf_peft.get_peft_model(copy.deepcopy(base), hf_peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert import_cli.main(["--llm", base_dir, "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "lm_head" in err and "does not adapt" in err
