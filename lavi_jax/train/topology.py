"""Compiling for a named TPU or GPU slice from a host without either: abstract devices and their figures.

    devices = topology.devices("v5e:8x8")            # 64 abstract TPU v5e chips (needs libtpu, not a TPU)
    devices = topology.devices("h100:1x1x8")         # one host of 8 abstract H100s (needs jax's CUDA plugin)
    mesh = topology.make_mesh(config.mesh.to_dict(), "v5e:8x8")
    chip = topology.chip_of(mesh)                    # memory per chip / GPU, nominal dense bf16 peak

A TPU topology is ``<chip>:<shape>`` as libtpu names it: ``v4:2x2x1``, ``v5e:8x8``,
``v5p:4x4x4``, ``v6e:16x16``. The TPU compiler comes with libtpu,
``pip install "jax[tpu]==<jax version>"``. A GPU slice is ``<gpu>:<hosts>x<gpus per host>``
or ``<gpu>:<slices>x<hosts>x<gpus per host>`` (``h100:1x8``, ``h100:1x1x8``, ``h100:1x2x8``) for
the GPUs of :data:`GPUS`; XLA's GPU compiler comes with jax's CUDA plugin,
``pip install "jax[cuda12]==<jax version>"`` (~5.5 GB), and compiles for the GPU that
:mod:`lavi_jax.train.gpu_targets` describes. Programs compiled for such devices can be
inspected (memory, cost analysis) but not run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from lavi_jax import sharding

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as in topology names: v5e
    device_kind: str  # as libtpu reports it: "TPU v5 lite"
    hbm_bytes: int  # what the TPU compiler lets one program use per device: "fits" is judged against this
    spec_hbm_bytes: int  # HBM per chip on the spec sheet
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip (a multiply-add is 2 FLOPs)
    accelerator_type: str  # Cloud TPU's accelerator-type prefix, e.g. v5litepod (-<chips>)
    per_core: bool = False  # accelerator types count TensorCores (2 per chip), not chips
    platform: str = "tpu"  # "tpu" | "gpu"
    hbm_bytes_per_second: float = 0.0  # spec-sheet HBM bandwidth per chip (the decode step's time bound)


# Spec-sheet HBM and peak bf16 compute per chip from Google Cloud's TPU system-architecture pages
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): v4 32 GiB, 275 TFLOP/s; v5e 16 GB,
# 197 TFLOP/s; v5p 95 GB, 459 TFLOP/s; v6e 32 GB, 918 TFLOP/s; HBM bandwidth v4 1,228 GB/s, v5e 819 GB/s,
# v5p 2,765 GB/s, v6e 1,640 GB/s. The usable HBM is libtpu 0.0.42.1's own
# figure, read off its out-of-memory error for an oversized program ("available HBM (15.75G)" on v5e):
# the runtime keeps the rest (tests/test_dry_run_tpu.py checks every chip's figure against the compiler).
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", int(15.25 * GiB), 32 * GiB, 275e12, "v4", per_core=True, hbm_bytes_per_second=1228e9),
    Chip("v5e", "TPU v5 lite", int(15.75 * GiB), 16 * GiB, 197e12, "v5litepod", hbm_bytes_per_second=819e9),
    Chip("v5p", "TPU v5", int(95.74 * GiB), 95 * GiB, 459e12, "v5p", per_core=True, hbm_bytes_per_second=2765e9),
    Chip("v6e", "TPU v6 lite", int(31.25 * GiB), 32 * GiB, 918e12, "v6e", hbm_bytes_per_second=1640e9),
)}
EXAMPLES = ("v4:2x2x1", "v5e:8x8", "v5p:4x4x4", "v6e:8x8")

# GPUs. Memory: the device memory the CUDA runtime reports (lavi_jax.train.gpu_targets, from XLA's target-config
# specs: H100 80 GB 79.1 GiB, H200 141 GB 141.0 GiB, A100 80 GB 79.3 GiB, B200 178.4 GiB). A jax process's allocator
# gets a fraction of it, XLA_PYTHON_CLIENT_MEM_FRACTION (jax's default 0.75; "fits" is judged against that share,
# read from the environment when this module is imported). Dense (not 2:4 sparse) bf16 tensor-core peak per GPU from
# NVIDIA's data sheets (H100 SXM5 and H200 SXM: 989 TFLOP/s; A100 SXM4: 312 TFLOP/s; HGX B200: 2.25 PFLOP/s), and
# their HBM bandwidth (3.35, 4.8, 2.039 and 8 TB/s).
GPU_MEMORY_FRACTION = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def _gpu(name: str, peak: float, bandwidth: float) -> Chip:
    from lavi_jax.train import gpu_targets

    t = gpu_targets.TARGETS[name]
    return Chip(name, t.device_kind, int(GPU_MEMORY_FRACTION * t.memory_bytes), t.memory_bytes, peak, "", platform="gpu",
                hbm_bytes_per_second=bandwidth)


GPUS = {c.name: c for c in (_gpu("h100", 989e12, 3.35e12), _gpu("h200", 989e12, 4.8e12), _gpu("a100", 312e12, 2.039e12),
                             _gpu("b200", 2250e12, 8e12))}
GPU_EXAMPLES = ("h100:1x8", "h100:1x2x8", "h200:1x1x8", "a100:1x1x8", "b200:1x1x8")


class TopologyError(ValueError):
    """A topology that cannot be used; the message is one line for the command line."""


def known() -> str:
    return (f"known chips {', '.join(CHIPS)} as <chip>:<shape>, e.g. {', '.join(EXAMPLES)}; known GPUs "
            f"{', '.join(GPUS)} as <gpu>:[<slices>x]<hosts>x<gpus per host>, e.g. {', '.join(GPU_EXAMPLES)}")


def install_command(platform: str = "tpu") -> str:
    return f'pip install "jax[{"cuda12" if platform == "gpu" else "tpu"}]=={jax.__version__}"'


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5e:8x8"`` -> (the v5e chip, (8, 8)); ``"h100:1x8"`` -> (the H100, (1, 1, 8)) (slices x hosts x GPUs per
    host); a TopologyError naming the known ones otherwise."""
    m = re.fullmatch(r"(\w+):(\d+(?:x\d+)+)", name.strip())
    chip = m and (CHIPS.get(m.group(1)) or GPUS.get(m.group(1)))
    if not chip:
        what = "GPU slice" if re.match(r"[a-uw-z]", name.strip()) else "TPU topology"  # TPU chips are v<n>...
        raise TopologyError(f"unknown {what} {name!r}: {known()}")
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if chip.platform == "gpu":
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise TopologyError(f"GPU slice {name!r}: expected <gpu>:[<slices>x]<hosts>x<gpus per host>; {known()}")
        dims = (1,) * (3 - len(dims)) + dims
    return chip, dims


def _quiet_runtime(chip: Chip, chips: int) -> None:
    """Environment for libtpu on a host without TPU chips, before it first loads: no worker discovery (its
    warnings), and no host-wide lock file (another jax process holding it must not block compiling)."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
            return  # a real TPU host: libtpu configures itself
    except (ImportError, AttributeError):
        pass
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.accelerator_type}-{chips * (2 if chip.per_core else 1)}")


def _gpu_devices(name: str, chip: Chip, dims: tuple[int, ...]) -> list:
    """The abstract GPUs of slice ``name``, compiled for by XLA's GPU compiler from jax's CUDA plugin."""
    from lavi_jax.train import gpu_targets

    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise TopologyError(f"dry_run_topology={name!r} needs the GPU compiler (jax's CUDA plugin): "
                            f"{install_command('gpu')}, and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a host without GPUs")
    if not os.path.exists("/dev/nvidiactl"):  # no driver: the plugin's version check would stop at cuInit
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # read when jax first loads its plugins
    from jax.experimental import topologies

    shape = "x".join(map(str, dims))
    try:
        return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_targets.target_config(chip.name),
                                                 topology=shape).devices)
    except NotImplementedError:  # the plugin was loaded before the variable was set, and refused the host
        raise TopologyError(f"dry_run_topology={name!r}: jax's CUDA plugin did not load on this host without GPUs; "
                            "set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (or JAX_PLATFORMS=cpu) before starting") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"GPU slice {name!r} rejected by the GPU compiler ({first}); {known()}") from None


def devices(name: str) -> list:
    """The abstract devices of topology ``name`` (compile-only; no TPU or GPU needed, libtpu or the CUDA plugin is)."""
    chip, dims = parse(name)
    if chip.platform == "gpu":
        return _gpu_devices(name, chip, dims)
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(f"dry_run_topology={name!r} needs the TPU compiler (libtpu): {install_command()}")
    _quiet_runtime(chip, math.prod(dims))
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name.strip(), platform="tpu").devices)
    except Exception as e:  # libtpu rejects the shape (e.g. an odd one for the chip)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"TPU topology {name!r} rejected by libtpu ({first}); {known()}") from None


def make_mesh(shape: dict, name: str):
    """``config.mesh`` over the chips of topology ``name``; a TopologyError naming both when it does not divide."""
    devs = devices(name)
    try:
        return sharding.make_mesh(shape, devices=devs)
    except ValueError as e:
        what, unit = ("GPU slice", "GPUs") if parse(name)[0].platform == "gpu" else ("TPU topology", "chips")
        raise TopologyError(f"mesh {dict(shape)} does not divide {what} {name} ({len(devs)} {unit}): {e}") from None


def compile_only(device) -> bool:
    """True for an abstract device of :func:`devices` (compile-only), False for one that runs programs."""
    return type(getattr(device, "client", None)).__name__ == "CompileOnlyPyClient"


def compiler_options(chip: Chip | None, device=None) -> dict | None:
    """XLA options for compiling for ``chip``'s abstract ``device``. The GPU compiler picks Triton GEMM tiles by
    autotuning on a device; without one, its fallback finds no tiling for some of the 7B step's fusions ("Couldn't find
    output tile sizes", e.g. the conditioner's v_proj gradient), so deviceless GPU compiles use cuBLAS GEMMs throughout
    (a compile for real GPUs keeps XLA's defaults)."""
    if chip is not None and chip.platform == "gpu" and (device is None or compile_only(device)):
        return {"xla_gpu_enable_triton_gemm": False}
    return None


def chip_of(mesh) -> Chip | None:
    """The chip or GPU of a mesh's devices (None when they are not one of :data:`CHIPS` / :data:`GPUS`). A real
    GPU matches by its device kind's model (``"NVIDIA H100 80GB HBM3"`` and ``"NVIDIA H100"`` alike)."""
    kind = getattr(mesh.devices.flat[0], "device_kind", "")
    exact = next((c for c in (*CHIPS.values(), *GPUS.values()) if c.device_kind == kind), None)
    model = lambda k: " ".join(k.split()[:2])  # "NVIDIA H100"
    return exact or next((c for c in GPUS.values() if kind.startswith("NVIDIA") and model(c.device_kind) == model(kind)), None)
