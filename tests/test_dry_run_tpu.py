"""The dry run for a named TPU topology: libtpu compiles for abstract chips on this CPU host (no TPU needed).

The tiny config's compiles take seconds; the 7B ones (minutes each) are marked slow.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

import lavi_jax
from lavi_jax import sharding
from lavi_jax.train import TopologyError, dry_run, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dry_run_module = sys.modules["lavi_jax.train.dry_run"]


def tiny(scan=True, **train):
    config = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py:tiny")
    config.model.update(scan_layers=scan, remat_policy="full", dtype="bfloat16")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.update(batch_size=8, trainable="projector+conditioners+llm", **train)
    config.data.seq_buckets = (128,)
    config.evals.update(batch_size=8, max_new_tokens=5)
    return config


def test_tiny_dry_run_on_a_v5e_slice(tmp_path):
    config = tiny(grad_accum=2)
    path = tmp_path / "report.json"
    r = dry_run(config, topology="v5e:2x4", programs="train,prefill,decode", report_path=str(path))
    assert r["devices"] == 8 and r["device_kind"] == "TPU v5 lite" and r["chip"]["hbm_bytes"] == 15.75 * 2**30
    assert r["fits"] is True and json.load(open(path))["programs"].keys() == {"train", "prefill", "decode"}
    for name, p in r["programs"].items():
        b = p["bytes_per_device"]
        assert 0 < b["params"] <= b["arguments"] and b["peak"] == b["arguments"] + b["outputs"] + b["temp"] - b["donated"]
        assert p["headroom_bytes"] == 15.75 * 2**30 - b["peak"] and p["fits"]
        assert p["seconds_lower_bound"] == pytest.approx(p["flops_per_device"] / 197e12)
    train = r["programs"]["train"]
    assert train["tokens"] == 8 * 128 and train["tokens_per_second_upper_bound"] == pytest.approx(
        train["tokens"] / train["seconds_lower_bound"])
    assert train["compiler_seconds_estimate"] is None  # the scanned step has loops: no estimate
    assert r["programs"]["decode"]["steps"] == 4
    decode = r["programs"]["decode"]  # one step's traffic beside reading the decoder, KV and visual caches once
    parts = decode["read_once_parts"]
    assert decode["read_once_bytes_per_step"] == sum(parts.values()) and parts["kv_cache"] > 0
    assert decode["bytes_accessed_per_step"] >= parts["kv_cache"] + parts["decoder_params"]  # reads them at least once
    assert decode["bytes_accessed_over_read_once"] == pytest.approx(decode["bytes_accessed_per_step"] / sum(parts.values()))
    assert decode["seconds_per_step_bandwidth_bound"] == pytest.approx(decode["bytes_accessed_per_step"] / 819e9)

    # Every layer and micro-batch counted: the unrolled, un-accumulated step compiled for one CPU device.
    unrolled = tiny(scan=False)
    unrolled.model.attention = "xla"  # the count's convention (a splash kernel's FLOPs are not XLA's to count)
    one_device = dry_run_module._cost(dry_run_module._train_lowered(unrolled, dry_run_module._cpu_mesh())[0].compile())
    assert train["flops"] == pytest.approx(one_device["flops"], rel=0.06)  # measured: the lowered count 4.8 % lower
    assert train["compiler_flops_per_device_loops_once"] * 8 < 0.6 * train["flops"]  # what a scanned count misses


def test_splash_kernel_is_compiled_for_the_topology():
    """attention="auto" resolves to splash for TPU chips even though this host's backend is the CPU."""
    config = tiny()
    mesh = topology.make_mesh(config.mesh.to_dict(), "v5e:2x4")
    hlo = dry_run_module._train_lowered(config, mesh)[0].as_text()
    assert "tpu_custom_call" in hlo
    config.model.attention = "xla"
    assert "tpu_custom_call" not in dry_run_module._train_lowered(config, mesh)[0].as_text()


@pytest.mark.parametrize("name", sorted(topology.CHIPS))
def test_usable_hbm_is_the_tpu_compilers(name):
    """The chip table's usable HBM against libtpu itself: a program whose output is 64 MiB over it is refused,
    naming that figure; one 256 MiB under it compiles."""
    import re

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    chip = topology.CHIPS[name]
    device = topology.devices(f"{name}:2x2" + ("x1" if chip.per_core else ""))[0]
    one = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    x = jax.ShapeDtypeStruct((1024,), "float32", sharding=one)

    def compile_output(nbytes):
        return jax.jit(lambda v: jax.numpy.broadcast_to(v, (nbytes // 4096, 1024)) + 1.0, out_shardings=one).lower(x).compile()

    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
        compile_output(chip.hbm_bytes + 2**26)
    available = re.search(r"available HBM \(([\d.]+)G\)", str(e.value))
    assert available and float(available.group(1)) == pytest.approx(chip.hbm_bytes / 2**30, abs=0.006)
    assert compile_output(chip.hbm_bytes - 2**28).memory_analysis().output_size_in_bytes >= chip.hbm_bytes - 2**28


def test_bad_topologies_fail_in_one_line(monkeypatch):
    with pytest.raises(TopologyError, match=r"unknown TPU topology 'v9:2x2': known chips v4, v5e, v5p, v6e"):
        topology.devices("v9:2x2")
    with pytest.raises(TopologyError, match=r"unknown TPU topology 'v5e'"):
        topology.devices("v5e")
    with pytest.raises(TopologyError, match=r"mesh \{.*'fsdp': 3.*\} does not divide TPU topology v5e:2x2 \(4 chips\)"):
        topology.make_mesh({"data": -1, "fsdp": 3, "tensor": 1}, "v5e:2x2")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(TopologyError, match=r'needs the TPU compiler \(libtpu\): pip install "jax\[tpu\]==' + jax.__version__):
        topology.devices("v5e:2x2")


def _train_py(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/lavi_qwen2_7b_siglip.py:tiny"),
           "--workdir", str(tmp_path / "wd"), *flags]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_train_py_bad_topology_is_one_line_and_writes_nothing(tmp_path):
    out = _train_py(tmp_path, "--config.dry_run_topology=v5e:2x2", "--config.mesh.tensor=8")
    assert out.returncode == 1 and not os.path.exists(tmp_path / "wd")
    assert out.stderr.strip().splitlines() == [
        "dry run: mesh {'data': -1, 'fsdp': 1, 'tensor': 8} does not divide TPU topology v5e:2x2 (4 chips): "
        "mesh: 4 devices are not divisible by {'data': -1, 'fsdp': 1, 'tensor': 8}"]


def test_train_py_exits_3_when_the_step_does_not_fit(tmp_path):
    """A 16M-token vocabulary trained whole on 4 replicas: ~8 GiB of f32 embedding + head, x3 with AdamW > 16 GiB."""
    out = _train_py(tmp_path, "--config.dry_run_topology=v5e:2x2", "--config.model.llm.vocab_size=16777216",
                    "--config.train.trainable=all", "--config.train.batch_size=4", "--config.data.seq_buckets=(32,)")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "DOES NOT FIT 15.75 GiB HBM per the TPU compiler" in out.stdout
    report = json.load(open(tmp_path / "wd" / "dry_run.json"))
    assert report["fits"] is False and report["programs"]["train"]["fits"] is False
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def _7b(attention):
    config = lavi_jax.configs.get("configs/lavi_qwen2_7b_siglip.py")
    config.model.update(dtype="bfloat16", scan_layers=True, remat_policy="full", attention=attention)
    config.mesh.update(data=1, fsdp=16, tensor=4)
    config.train.update(batch_size=64)
    config.data.seq_buckets = (2048,)
    return config


@pytest.mark.slow
def test_7b_step_on_v5e_64_with_splash_and_xla():
    """The 7B stage-1 step at 64 x 2048 on v5e:8x8: splash is compiled in and its temp reported next to xla's."""
    reports = {a: dry_run(_7b(a), topology="v5e:8x8") for a in ("splash", "xla")}
    for r in reports.values():
        assert r["fits"] and r["programs"]["train"]["flops"] > 5e15  # ~6 x 7.6e9 x 131072 tokens, less the frozen grads
    mesh = topology.make_mesh(_7b("splash").mesh.to_dict(), "v5e:8x8")
    assert "tpu_custom_call" in dry_run_module._train_lowered(_7b("splash"), mesh)[0].as_text()
    print({a: r["temp_bytes_per_device"] / 2**30 for a, r in reports.items()})


def test_generation_is_sized_for_anyres_items():
    """LaVi-HD's generation programs take 1 + max_crops frames per image (the base image and its crops)."""
    from lavi_jax import configs
    from lavi_jax.train.dry_run import generation_frames
    hd = configs.get("configs/lavi_qwen2_7b_siglip.py:hd")
    assert generation_frames(hd.model, hd.data) == 1 + hd.model.anyres.max_crops == 37
    plain = configs.get("configs/lavi_qwen2_7b_siglip.py")
    assert generation_frames(plain.model, plain.data) == plain.data.num_frames
