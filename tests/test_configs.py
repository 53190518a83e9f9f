"""Full-size configs: abstract init only (no weights allocated), parameter counts against HF models of the same geometry."""

import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import traverse_util

import lavi_jax
from lavi_jax.hf import config as hf_config
from lavi_jax import sharding

CONFIGS = ["configs/lavi_qwen2_7b_siglip.py", "configs/lavi_vicuna7b_clip336.py", "configs/llava_ov_7b_concat.py"]


def hf_param_count(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def split_counts(params):
    flat = traverse_util.flatten_dict(params)
    count = lambda pred: sum(int(v.size) for k, v in flat.items() if pred(k))
    is_cond = lambda k: any("conditioner" in p for p in k)
    return {
        "llm": count(lambda k: k[0] == "llm" and not is_cond(k)),
        "conditioners": count(is_cond),
        "vision": count(lambda k: k[0] == "vision"),
        "projector": count(lambda k: k[0] == "projector"),
    }


@pytest.mark.parametrize("path", CONFIGS)
def test_full_size_parameter_counts_match_hf(path):
    cfg = lavi_jax.configs.get(path).model
    params, _ = sharding.abstract_params(lavi_jax.LaVi(cfg), jnp.zeros((1, 8), jnp.int32))
    counts = split_counts(params)
    llm_cls = transformers.Qwen2ForCausalLM if cfg.llm.arch == "qwen2" else transformers.LlamaForCausalLM
    llm_ref = hf_param_count(llm_cls, transformers.AutoConfig.for_model(**hf_config.llm_to_hf(cfg.llm)))
    vis_cls = transformers.SiglipVisionModel if cfg.vision.type == "siglip" else transformers.CLIPVisionModel
    vis_ref = hf_param_count(vis_cls, transformers.AutoConfig.for_model(**hf_config.vision_to_hf(cfg.vision)))
    print(path, counts, {"hf_llm": llm_ref, "hf_vision": vis_ref})
    assert abs(counts["llm"] - llm_ref) / llm_ref < 0.01
    assert abs(counts["vision"] - vis_ref) / vis_ref < 0.01
    if "qwen2_7b" in path:  # published sizes: Qwen2-7B 7.62 B, SigLIP-so400m vision tower ~0.43 B (0.41 B without its pooling head)
        assert abs(counts["llm"] - 7.62e9) / 7.62e9 < 0.01
        assert 0.40e9 < counts["vision"] < 0.44e9
    if cfg.fusion == "modulation":
        assert 0 < counts["conditioners"] < 0.1 * counts["llm"]
    else:
        assert counts["conditioners"] == 0


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", CONFIGS + ["configs/demo.py"])
def test_every_setting_can_be_overridden_from_the_command_line(path):
    """config_flags cannot override a None-valued field, so no default may be None."""
    config = lavi_jax.configs.get(path)
    exempt = {"model.llm.rope_scaling"}  # a dict copied from the HF config by the importer, not a command-line value
    nones = [name for name, value in _leaves(config)
             if value is None and name.startswith(("model.", "train.")) and name not in exempt]
    assert not nones, f"{path}: None defaults cannot be set with --config.X=...: {nones}"


def test_explicit_conditioner_layers_from_the_command_line():
    import subprocess
    import sys

    code = ("from absl import flags; from ml_collections import config_flags; import sys;"
            "config_flags.DEFINE_config_file('config', None, lock_config=False);"
            "flags.FLAGS(sys.argv);"
            "from lavi_jax.models.decoder import modulated_layers as m; c = flags.FLAGS.config.model;"
            "print(m(c.conditioner, c.llm.num_layers))")
    out = subprocess.run([sys.executable, "-c", code, "--config", "configs/demo.py",
                          "--config.model.conditioner.layers=(0,2)"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(0, 2)"
    from lavi_jax.models.decoder import modulated_layers

    assert modulated_layers(lavi_jax.configs.get("configs/demo.py").model.conditioner, 3) == (0, 1, 2)
