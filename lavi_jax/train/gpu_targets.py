"""What the GPU compiler needs to know of a GPU it cannot see: one table row per GPU kind, one text proto from it.

    text = gpu_targets.target_config("h100")     # a stream_executor.GpuTargetConfigProto in text format
    topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x8")

XLA's GPU compiler picks kernels, tiles and fusions from these figures (SM
count, clock, shared memory and registers per SM, memory size and bandwidth,
compute capability, cuDNN version); it never touches a device. The rows are
the figures the CUDA runtime reports for each GPU as XLA itself records them
in its target-config specs (openxla/xla ``xla/backends/gpu/target_config/specs/``:
``h100_sxm.txtpb``, ``h200.txtpb``, ``a100_sxm_80.txtpb``, ``b200.txtpb``), the
fields that jaxlib 0.10.2's proto knows. cuDNN is the version the
``jax[cuda12]`` wheels install (9.x); the CUDA toolkit is 12.8.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str  # as in dry_run_topology: h100
    device_kind: str  # the device description the CUDA runtime gives (jax's device_kind)
    compute_capability: tuple[int, int]
    core_count: int  # SMs
    fpus_per_core: int
    clock_rate_ghz: float
    memory_bytes: int  # device memory as the CUDA runtime reports it
    memory_bandwidth: int  # bytes/s
    l2_cache_size: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int


TARGETS = {t.name: t for t in (
    GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 84942979072, 3352320000000, 52428800,
              233472, 232448),
    GpuTarget("h200", "NVIDIA H200", (9, 0), 132, 128, 1.98, 151397597184, 4800000000000, 52428800, 233472, 232448),
    GpuTarget("a100", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 85100068864, 2039040000000, 41943040,
              167936, 166912),
    GpuTarget("b200", "NVIDIA B200", (10, 0), 148, 128, 1.965, 191514411008, 7672320000000, 132644864, 233472,
              232448),
)}
DNN_VERSION = (9, 8, 0)  # cuDNN of the jax[cuda12] wheels: nvidia-cudnn-cu12>=9.8


def target_config(name: str) -> str:
    """The GpuTargetConfigProto text of GPU ``name`` (a key of :data:`TARGETS`)."""
    t = TARGETS[name]
    major, minor = t.compute_capability
    dnn = ".".join(map(str, DNN_VERSION))
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {t.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {t.core_count}
  fpus_per_core: {t.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {t.memory_bandwidth}
  l2_cache_size: {t.l2_cache_size}
  clock_rate_ghz: {t.clock_rate_ghz}
  device_memory_size: {t.memory_bytes}
  shared_memory_per_block_optin: {t.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  dnn_version: "{dnn}"
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {DNN_VERSION[0]}
  minor: {DNN_VERSION[1]}
  patch: {DNN_VERSION[2]}
}}
device_description_str: "{t.device_kind}"
"""
