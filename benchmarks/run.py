"""Reproduces LaVi's efficiency claims with this code and measures it against Hugging Face PyTorch.

    python benchmarks/run.py [--quick] [--gpu] [--threads 2] [--name NAME] [--sections flops,latency,vs_torch,train]
    python benchmarks/run.py --sections tpu     # the TPU compiler's view (needs libtpu, no TPU; ~1 h on 2 cores)
    python benchmarks/run.py --sections gpu_compile  # the GPU compiler's view (needs jax[cuda12], no GPU; ~30 min)

Sections (CPU run; ``--gpu`` runs only the GPU sections):

1. FLOPs per sample at 7B geometry (LaVi vs LLaVA-OV-style concat) from XLA's cost analysis on
   abstract shapes, for 729 / 2,916 / 7,290 visual tokens and a 32-frame video (``benchmarks/flops.py``);
2. generation latency and peak memory, LaVi vs concat, at a scaled-down geometry with the same
   visual-token counts (``benchmarks/latency.py``);
3. lavi_jax vs Hugging Face PyTorch on the same Qwen2 weights, float32, same threads (``benchmarks/vs_torch.py``);
4. a train step's achieved FLOP/s against a matmul peak measured in the same run (``benchmarks/train_efficiency.py``);
   ``hd``: LaVi-HD vs concat at LLaVA-OneVision-7B's real token counts (a 1024x768 photo, a 4:1 panorama,
   a 32-frame video; ``benchmarks/hd_geometry.py``): 7B FLOPs and cache memory, CPU latency at the scaled geometry;
4b. packed vs bucketed training batches on LLaVA-665k-like lengths: pad fraction, real tokens/s on CPU models
   the 7B FLOPs bound and, with libtpu, the 7B step's per-chip memory on v5e:8x8 (``benchmarks/packing.py``;
   ``--quick``: the pipeline and Qwen2-7B's FLOPs only);
5. ``--gpu``: MFU of a Qwen2-0.5B-shaped train step and LaVi vs concat latency at 7B geometry in bf16;
6. ``--sections tpu`` (not in the default run): LaVi vs concat at 7B compiled for TPU v5e / v5p slices
   (``benchmarks/tpu.py``): per-chip memory, FLOPs, step-time bounds, the largest batch, generation;
7. ``--sections gpu_compile`` (not in the default run): the same at 7B compiled by XLA's GPU compiler for H100 hosts
   (1x1x8, 1x2x8; ``benchmarks/gpu_compile.py``): per-GPU memory, the largest stage-2 batch, cuDNN vs XLA attention.
   ``--gpu`` compares the deviceless compile's prediction with what it measures on the GPU.
8. ``--sections serve`` (not in the default run): the OpenAI-compatible server driven by 1, 4, 16 and 64 closed-loop
   clients, LaVi vs concat on the demo-sized model (``benchmarks/serve.py``): output tokens/s, TTFT, latency.

Prints one table, writes ``benchmarks/results/<name>.json`` and ``<name>.png`` and rebuilds
``BENCHMARKS.md`` from every result file of this suite. ``--quick`` reads the FLOPs from the lowered
programs (compiled ones in the full run), measures two visual-token counts and fewer repetitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CPU_SECTIONS = ("flops", "latency", "vs_torch", "train", "packing", "hd")
EXTRA_SECTIONS = ("tpu", "gpu_compile", "serve")  # run only when named


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer settings and repetitions (under 15 minutes on 2 cores)")
    p.add_argument("--gpu", action="store_true", help="the GPU sections (needs a GPU visible to jax)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for XLA and PyTorch alike (CPU run)")
    p.add_argument("--name", default=None, help="result name (default: cpu[-quick] or gpu[-quick])")
    p.add_argument("--no-markdown", action="store_true", help="do not rebuild BENCHMARKS.md")
    p.add_argument("--resume", action="store_true",
                   help="tpu section: keep what the part files of an earlier run measured, run only the rest")
    p.add_argument("--sections", default=",".join(CPU_SECTIONS),
                   help=f"comma-separated CPU sections to run (default: all of {', '.join(CPU_SECTIONS)})")
    args = p.parse_args(argv)
    unknown = {x.strip() for x in args.sections.split(",") if x.strip()} - set(CPU_SECTIONS + EXTRA_SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)} (known: {', '.join(CPU_SECTIONS + EXTRA_SECTIONS)})")
    return args


def configure_environment(args) -> None:
    """Threads and platform, before jax or torch is imported."""
    if args.gpu:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # the CPU sections measure the CPU even where a GPU is present
    # Same thread count on both sides: pin the process to `threads` cores (XLA sizes its pool from the
    # schedulable cores) and tell Eigen and torch the same number.
    cores = sorted(os.sched_getaffinity(0))
    if args.threads < len(cores):
        os.sched_setaffinity(0, cores[: args.threads])
    # One CPU device (a forced host device count would split the cores into several devices).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags += ["--xla_cpu_multi_thread_eigen=true", f"intra_op_parallelism_threads={args.threads}"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    # OpenMP threads that sleep when idle instead of spinning: on a shared machine spinning threads wait for
    # preempted peers at every barrier and make PyTorch several times slower than its work warrants.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    d = jax.devices()[0]
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": _memory_gib(), "platform": d.platform,
            "device": getattr(d, "device_kind", str(d)), "python": platform.python_version(), "jax": jax.__version__}
    for mod in ("flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return float("nan")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the runs


def run_cpu(args) -> dict:
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    out = {}
    if "tpu" in sections:
        from benchmarks import tpu

        log("[tpu] 7B programs compiled for TPU slices (two processes side by side)")
        out["tpu"] = tpu.run(resume=args.resume)
    if "gpu_compile" in sections:
        from benchmarks import gpu_compile

        log("[gpu_compile] 7B programs compiled for H100 hosts by XLA's GPU compiler (no GPU)")
        out["gpu_compile"] = gpu_compile.run(resume=args.resume)
    if "serve" in sections:
        from benchmarks import serve

        log("[serve] the OpenAI server under 1/4/16/64 closed-loop clients, LaVi vs concat (demo model)")
        out["serve"] = serve.run(requests=32 if args.quick else 64, log=log)
    if not set(sections) & set(CPU_SECTIONS):
        return out
    import torch

    from benchmarks import common, flops, latency, train_efficiency, vs_torch

    torch.set_num_threads(args.threads)
    quick = args.quick
    if "flops" in sections:
        flop_settings = dict((k, common.SETTINGS[k]) for k in (common.HEADLINE_SETTINGS if quick else common.SETTINGS))
        log(f"[flops] FLOPs per sample at 7B geometry ({'lowered' if quick else 'compiled'} programs)")
        out["flops"] = flops.run(flop_settings, compiled=not quick, log=log)
    if "latency" in sections:
        log("[latency] generation latency and memory, scaled-down geometry")
        lat = {k: common.SETTINGS[k] for k in (("1 tile", "4 tiles") if quick else ("1 tile", "4 tiles", "10 tiles"))}
        configs = {f: common.model_config(f, scaled=True) for f in ("modulation", "concat")}
        out["latency"] = latency.run(configs, lat, reps=3 if quick else 5, log=log)
    if "vs_torch" in sections:
        log("[vs_torch] lavi_jax vs Hugging Face PyTorch")
        out["vs_torch"] = vs_torch.run(reps=5 if quick else 9, log=log)
    if "packing" in sections:
        from benchmarks import packing

        log("[packing] packed vs bucketed training batches, LLaVA-665k-like lengths")
        slice_ = "v5e:8x8" if importlib.util.find_spec("libtpu") else ""  # the 7B step's per-chip memory, packed
        out["packing"] = (packing.run(batches=100, reps=2, models=(), configs_7b=("7B",), log=log) if quick
                          else packing.run(topology=slice_, log=log))
    if "hd" in sections:
        from benchmarks import hd_geometry

        log(f"[hd] LaVi-HD vs concat at LLaVA-OneVision-7B's token counts ({'lowered' if quick else 'compiled'} programs)")
        out["hd"] = hd_geometry.run(compiled=not quick, reps=3 if quick else 5, log=log)
    if "train" in sections:
        log("[train] train step efficiency")
        out["train"] = train_efficiency.run(common.model_config("modulation", scaled=True), batch=4, seq=128, frames=1,
                                            reps=3 if quick else 5, log=log)
    return out


# The GPU run (one call, under 8 minutes on one H100/H200-class GPU): its geometry, in one place.
GPU_TRAIN = dict(batch=8, seq=1024, matmul_n=8192)  # Qwen2-0.5B-shaped, text only
GPU_LATENCY = ("1 tile", "4 tiles", "10 tiles")  # 7B geometry, one visual item of that many 729-token tiles


def gpu_model_configs():
    """LaVi and concat at 7B geometry for the GPU run: bf16 params and compute, cuDNN attention where it applies,
    scanned layers (a few seconds to compile instead of minutes)."""
    from benchmarks import common

    configs = {f: common.model_config(f, dtype="bfloat16") for f in ("modulation", "concat")}
    for m in configs.values():
        m.update(attention="cudnn", scan_layers=True)
    return configs


def run_gpu(args) -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp

    from benchmarks import common, latency, train_efficiency
    from lavi_jax import config as C

    # The latency section compiles each program twice (its memory reading and its timed call): a compilation
    # cache turns the second compile into a lookup.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="lavi_jax_xla_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    quick = args.quick
    out = {}
    log("[1/3] MFU of a Qwen2-0.5B-shaped train step (bf16 compute, f32 params, cuDNN attention)")
    m = C.model(fusion="none", llm=C.llm(**common.QWEN2_05B), dtype="bfloat16", param_dtype="float32", attention="cudnn")
    out["train"] = train_efficiency.run(m, batch=GPU_TRAIN["batch"], seq=GPU_TRAIN["seq"], frames=0,
                                        reps=5 if quick else 10, matmul_n=GPU_TRAIN["matmul_n"],
                                        matmul_dtype=jnp.bfloat16, log=log)
    train_stats = dict(jax.devices()[0].memory_stats() or {})  # the allocator's peak after the train step (and matmul)
    log("[2/3] LaVi vs concat generation latency and memory at 7B geometry, bf16, cuDNN attention")
    names = GPU_LATENCY[:2] if quick else GPU_LATENCY
    out["latency"] = latency.run(gpu_model_configs(), {k: common.SETTINGS[k] for k in names}, reps=3 if quick else 5,
                                 log=log)
    stats = jax.devices()[0].memory_stats() or {}
    out["device_memory_gib"] = round(stats.get("bytes_limit", 0) / 2**30, 1)
    log("[3/3] the deviceless GPU compile's prediction for the train step of [1/3] vs what [1/3] measured")
    try:
        from benchmarks import gpu_compile

        out["predicted_vs_measured"] = gpu_compile.predicted_vs_measured(
            m, batch=GPU_TRAIN["batch"], seq=GPU_TRAIN["seq"], log=log,
            measured={"step_s": out["train"]["step_s"], "peak_bytes_in_use": train_stats.get("peak_bytes_in_use"),
                      "bytes_limit": train_stats.get("bytes_limit")})
    except Exception as e:  # noqa: BLE001  (the GPU figures above are kept whatever happens here)
        out["predicted_vs_measured"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"  failed: {out['predicted_vs_measured']['error']}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_environment(args)
    sys.path.insert(0, ROOT)
    import jax

    if args.gpu and jax.devices()[0].platform != "gpu":
        print(f"--gpu: no GPU visible to jax (devices: {jax.devices()}). Run it on a machine with an NVIDIA GPU "
              "and a CUDA-enabled jax (see jax's installation guide), or run without --gpu.", file=sys.stderr)
        return 2
    from benchmarks import report

    only = args.sections.replace(" ", "") if not args.gpu else ""
    name = args.name or ({"tpu": "tpu", "gpu_compile": "gpu-compile"}.get(only)
                         or ("gpu" if args.gpu else "cpu") + ("-quick" if args.quick else ""))
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load0 = os.getloadavg()[0]
    sections = run_gpu(args) if args.gpu else run_cpu(args)
    result = {
        "suite": report.SUITE, "name": name, "date": started, "command": command, "quick": args.quick,
        "threads": None if args.gpu else args.threads, "machine": machine(), "elapsed_s": round(time.time() - t0, 1),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)], **sections,
    }
    result["rows"] = report.rows(result)
    os.makedirs(RESULTS, exist_ok=True)
    path = report.write_json(result, RESULTS)
    plot = report.plot(result, RESULTS)
    print(report.table(result["rows"]))
    log(f"wrote {os.path.relpath(path, ROOT)}" + (f" and {os.path.relpath(plot, ROOT)}" if plot else ""))
    if not args.no_markdown:
        md = report.write_markdown(RESULTS, os.path.join(ROOT, "BENCHMARKS.md"))
        log(f"rebuilt {os.path.relpath(md, ROOT)}")
    log(f"done in {result['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
