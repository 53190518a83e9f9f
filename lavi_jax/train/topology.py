"""Compiling for a named TPU topology from a host without TPUs: libtpu's abstract devices and the chips' figures.

    devices = topology.devices("v5e:8x8")            # 64 abstract TPU v5e chips (needs libtpu, not a TPU)
    mesh = topology.make_mesh(config.mesh.to_dict(), "v5e:8x8")
    chip = topology.chip_of(mesh)                    # HBM per chip, nominal bf16 peak

A topology is ``<chip>:<shape>`` as libtpu names it: ``v4:2x2x1``, ``v5e:8x8``,
``v5p:4x4x4``, ``v6e:16x16``. The TPU compiler comes with libtpu,
``pip install "jax[tpu]==<jax version>"``; programs compiled for such devices
can be inspected (memory, cost analysis) but not run.
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


# Spec-sheet HBM and peak bf16 compute per chip from Google Cloud's TPU system-architecture pages
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): v4 32 GiB, 275 TFLOP/s; v5e 16 GB,
# 197 TFLOP/s; v5p 95 GB, 459 TFLOP/s; v6e 32 GB, 918 TFLOP/s. The usable HBM is libtpu 0.0.42.1's own
# figure, read off its out-of-memory error for an oversized program ("available HBM (15.75G)" on v5e):
# the runtime keeps the rest (tests/test_dry_run_tpu.py checks every chip's figure against the compiler).
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", int(15.25 * GiB), 32 * GiB, 275e12, "v4", per_core=True),
    Chip("v5e", "TPU v5 lite", int(15.75 * GiB), 16 * GiB, 197e12, "v5litepod"),
    Chip("v5p", "TPU v5", int(95.74 * GiB), 95 * GiB, 459e12, "v5p", per_core=True),
    Chip("v6e", "TPU v6 lite", int(31.25 * GiB), 32 * GiB, 918e12, "v6e"),
)}
EXAMPLES = ("v4:2x2x1", "v5e:8x8", "v5p:4x4x4", "v6e:8x8")


class TopologyError(ValueError):
    """A topology that cannot be used; the message is one line for the command line."""


def known() -> str:
    return f"known chips {', '.join(CHIPS)} as <chip>:<shape>, e.g. {', '.join(EXAMPLES)}"


def install_command() -> str:
    return f'pip install "jax[tpu]=={jax.__version__}"'


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5e:8x8"`` -> (the v5e chip, (8, 8)); a TopologyError naming the known ones otherwise."""
    m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", name.strip())
    if not m or m.group(1) not in CHIPS:
        raise TopologyError(f"unknown TPU topology {name!r}: {known()}")
    return CHIPS[m.group(1)], tuple(int(d) for d in m.group(2).split("x"))


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


def devices(name: str) -> list:
    """The abstract TPU devices of topology ``name`` (compile-only; no TPU needed, libtpu is)."""
    chip, dims = parse(name)
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
        raise TopologyError(f"mesh {dict(shape)} does not divide TPU topology {name} ({len(devs)} chips): {e}") from None


def chip_of(mesh) -> Chip | None:
    """The chip of a mesh's devices (None when they are not a TPU of :data:`CHIPS`)."""
    kind = getattr(mesh.devices.flat[0], "device_kind", "")
    return next((c for c in CHIPS.values() if c.device_kind == kind), None)
