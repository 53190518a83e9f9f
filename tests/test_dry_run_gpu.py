"""The dry run for a named GPU slice: XLA's GPU compiler (jax's CUDA plugin) compiles for abstract H100s on a CPU host.

The plugin is a 5.5 GB install that the CI does not make, so the compiling tests are marked slow; run them with

    python -m venv --system-site-packages /work/venv-cuda && /work/venv-cuda/bin/pip install "jax[cuda12]==0.10.2"
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venv-cuda/bin/python -m pytest -m slow tests/test_dry_run_gpu.py

The unmarked tests need no plugin: the GPU table, slice names, one-line errors, the cuDNN fallback rules.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest

import lavi_jax
from lavi_jax.models.attention import implementation_for, resolve_attention
from lavi_jax.train import TopologyError, dry_run, gpu_targets, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dry_run_module = sys.modules["lavi_jax.train.dry_run"]
CUDNN = re.compile(r'custom_call_target="(__cudnn\$fmha\w*)"')


# ----------------------------------------------------------------------------- no plugin needed


def test_gpu_table():
    assert set(topology.GPUS) == set(gpu_targets.TARGETS) == {"h100", "h200", "a100", "b200"}
    for name, gpu in topology.GPUS.items():
        t = gpu_targets.TARGETS[name]
        assert gpu.platform == "gpu" and gpu.device_kind == t.device_kind and gpu.spec_hbm_bytes == t.memory_bytes
        assert gpu.hbm_bytes == int(topology.GPU_MEMORY_FRACTION * t.memory_bytes)
        text = gpu_targets.target_config(name)
        assert f"core_count: {t.core_count}\n" in text and f'device_description_str: "{t.device_kind}"' in text
        assert f"major: {t.compute_capability[0]}\n" in text and text.count("{") == text.count("}")
    assert topology.GPUS["h100"].peak_bf16_flops == 989e12 and topology.GPUS["h100"].spec_hbm_bytes / 2**30 > 79
    assert topology.GPUS["h200"].spec_hbm_bytes > topology.GPUS["h100"].spec_hbm_bytes


def test_gpu_slice_names():
    assert topology.parse("h100:1x8") == (topology.GPUS["h100"], (1, 1, 8))
    assert topology.parse("h100:1x2x8") == (topology.GPUS["h100"], (1, 2, 8))
    assert topology.parse("v5e:8x8")[0].platform == "tpu"
    with pytest.raises(TopologyError, match=r"unknown GPU slice 'h999:1x8': known chips v4, .*known GPUs h100, h200"):
        topology.devices("h999:1x8")
    with pytest.raises(TopologyError, match=r"GPU slice 'h100:1x1x1x8': expected"):
        topology.devices("h100:1x1x1x8")


def test_missing_cuda_plugin_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax_cuda12_plugin" else real(name, *a))
    with pytest.raises(TopologyError, match=r'needs the GPU compiler \(jax\'s CUDA plugin\): pip install "jax\[cuda12\]=='
                       + jax.__version__) as e:
        topology.devices("h100:1x1x8")
    assert "\n" not in str(e.value)


def test_train_py_unknown_gpu_is_one_line_and_writes_nothing(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/lavi_qwen2_7b_siglip.py:tiny"),
           "--workdir", str(tmp_path / "wd"), "--config.dry_run_topology=h101:1x8"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and not os.path.exists(tmp_path / "wd")
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("dry run: unknown GPU slice 'h101:1x8'")


def test_cudnn_resolution_and_fallbacks():
    bf16 = jax.numpy.bfloat16
    assert resolve_attention("auto", "gpu") == "cudnn"
    q, kv = (2, 2048, 28, 128), (2, 2048, 4, 128)  # the 7B decoder: GQA 28 / 4, head_dim 128
    assert implementation_for("auto", "gpu", q, kv, bf16, aligned=True, masked=True) == "cudnn"
    # Masked (a bias in cuDNN) at an odd length: cuDNN's training kernels refuse it, so xla.
    assert implementation_for("auto", "gpu", (2, 2048, 28, 128), (2, 729, 28, 128), bf16, False, masked=True) == "xla"
    assert implementation_for("auto", "gpu", (2, 2775, 28, 128), (2, 2775, 4, 128), bf16, True, masked=True) == "xla"
    assert implementation_for("auto", "gpu", (2, 1, 28, 128), (2, 2048, 4, 128), bf16, False, masked=True) == "xla"
    # Unmasked (the ViT, bidirectional): any length.
    assert implementation_for("auto", "gpu", (2, 729, 16, 72), (2, 729, 16, 72), bf16, True, masked=False) == "cudnn"
    assert implementation_for("auto", "gpu", (2, 729, 16, 72), (2, 729, 16, 72), jax.numpy.float32, True) == "xla"


# ----------------------------------------------------------------------------- the GPU compiler (slow: the plugin)


def tiny(fusion="modulation", image_size=32, scan=True, **train):
    config = lavi_jax.configs.get(f"configs/{'llava_ov_7b_concat' if fusion == 'concat' else 'lavi_qwen2_7b_siglip'}.py:tiny")
    from lavi_jax import config as C

    C.set_precision(config.model, "mixed")  # bf16 compute, f32 params and AdamW state
    config.model.update(scan_layers=scan, remat_policy="full", attention="auto")
    config.model.vision.image_size = config.data.image_size = image_size  # 32: 16 patches; 24: 9 (odd)
    if config.model.get("anyres") is not None:
        config.model.anyres.enabled = False  # one frame per image: the conditioner's keys are its patches
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.update(batch_size=8, trainable="projector+conditioners+llm", **train)
    config.data.update(seq_buckets=(128,), max_images=1, num_frames=1, packing=False, pack_max_images=1)  # one item per row
    config.evals.update(batch_size=8, max_new_tokens=5)
    return config


def _cudnn_calls(config, slice_="h100:1x1x8") -> dict:
    mesh = topology.make_mesh(config.mesh.to_dict(), slice_)
    chip = topology.chip_of(mesh)
    compiled, _ = dry_run_module._compile(dry_run_module._train_lowered(config, mesh)[0], chip, mesh.devices.flat[0])
    calls = {}
    for name in CUDNN.findall(compiled.as_text()):
        calls[name] = calls.get(name, 0) + 1
    return calls


@pytest.mark.slow
def test_tiny_dry_run_on_an_h100_host(tmp_path):
    path = tmp_path / "report.json"
    r = dry_run(tiny(grad_accum=2), topology="h100:1x1x8", programs="train,prefill,decode", report_path=str(path))
    gpu = topology.GPUS["h100"]
    assert r["devices"] == 8 and r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["chip"]["platform"] == "gpu"
    assert r["chip"]["hbm_bytes"] == gpu.hbm_bytes and r["fits"] is True
    assert json.load(open(path))["programs"].keys() == {"train", "prefill", "decode"}
    for p in r["programs"].values():
        b = p["bytes_per_device"]
        assert 0 < b["params"] <= b["arguments"] and b["peak"] == b["arguments"] + b["outputs"] + b["temp"] - b["donated"]
        assert p["fits"] and p["headroom_bytes"] == gpu.hbm_bytes - b["peak"]
        assert p["flops"] > 0 and p["seconds_lower_bound"] == pytest.approx(p["flops_per_device"] / 989e12)
    assert "GPU slice h100:1x1x8" in dry_run_module.format_report(r)
    two = tiny()
    two.mesh.data = -1  # two hosts: 16 GPUs, 4 x 2 x 2
    r2 = dry_run(two, topology="h100:1x2x8", programs="train")
    assert r2["devices"] == 16 and r2["programs"]["train"]["fits"]


@pytest.mark.slow
def test_cudnn_kernel_is_in_the_compiled_program():
    """Unrolled, so that each layer's call is in the program once: the decoder's masked attention (causal, padding,
    packed segments, GQA 4 / 2) is cuDNN's biased kernel, forward and backward; the ViT's (bidirectional, no mask)
    the unbiased forward (the tower is frozen); the conditioner's is cuDNN at 16 visual keys and XLA at 9 (odd)."""
    even = _cudnn_calls(tiny(scan=False, image_size=32))
    odd = _cudnn_calls(tiny(scan=False, image_size=24))
    packed_cfg = tiny(scan=False, image_size=24)
    packed_cfg.data.packing = True
    packed = _cudnn_calls(packed_cfg)
    layers, vit = 4, 3  # the tiny config: 4 decoder layers, each with 2 modulated norms (2 conditioners); 3 ViT layers
    assert odd["__cudnn$fmhaSoftmax"] == even["__cudnn$fmhaSoftmax"] == vit
    assert even["__cudnn$fmhaScaleBiasSoftmaxBackward"] == 3 * layers  # decoder + conditioners
    assert odd["__cudnn$fmhaScaleBiasSoftmaxBackward"] == layers  # decoder only: the conditioners fell back to XLA
    assert odd["__cudnn$fmhaScaleBiasSoftmax"] == 2 * layers  # forward and its full-remat recomputation
    assert packed == odd
    xla = tiny(scan=False)
    xla.model.attention = "xla"
    assert _cudnn_calls(xla) == {}


@pytest.mark.slow
def test_odd_lengths_compile_with_the_xla_fallback():
    """concat splices 16 visual tokens for 1 placeholder: 143 tokens, odd, so its decoder falls back to XLA (cuDNN
    would refuse to train); its ViT keeps the kernel. Without the fallback this compile raises NotImplementedError."""
    calls = _cudnn_calls(tiny("concat", scan=False, image_size=32))
    assert calls == {"__cudnn$fmhaSoftmax": 3}


@pytest.mark.slow
def test_train_py_exits_3_when_the_step_does_not_fit_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.00001"  # ~0.8 MiB of an H100: the tiny step's ~3 MiB do not fit
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/lavi_qwen2_7b_siglip.py:tiny"),
           "--workdir", str(tmp_path / "wd"), "--config.dry_run_topology=h100:1x1x8", "--config.mesh.fsdp=8"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "DOES NOT FIT" in out.stdout and "GPU slice h100:1x1x8" in out.stdout
    assert json.load(open(tmp_path / "wd" / "dry_run.json"))["fits"] is False
    bad = subprocess.run(cmd[:-1] + ["--config.mesh.fsdp=3"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "does not divide GPU slice h100:1x1x8 (8 GPUs)" in bad.stderr
