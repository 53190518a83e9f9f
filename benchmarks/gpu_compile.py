"""LaVi vs LLaVA-OV-style concat at 7B as XLA's GPU compiler sees them: AOT compiles for H100 slices, no GPU needed.

    python benchmarks/run.py --sections gpu_compile           # all parts, in order (hours on 2 cores; resumable)
    python benchmarks/run.py --sections gpu_compile --resume  # finish / reassemble from the part file of an earlier run
    python -m benchmarks.gpu_compile --part train --out /tmp/gpu-train.json --resume   # one part

Needs jax's CUDA plugin (``pip install "jax[cuda12]==<jax version>"``, ~5.5 GB)
and, on a host without GPUs, ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (set here).
Every figure comes from :func:`lavi_jax.train.dry_run` pieces on the abstract
GPUs of :mod:`lavi_jax.train.topology`: XLA's memory analysis per GPU (peak =
arguments + outputs + temp - donated) against the share of the GPU's memory a
jax process gets (``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75), FLOPs
with every layer counted (the programs lowered unrolled with XLA attention;
the GPU compiler has no cost analysis), the step-time lower bound at the GPU's
dense bf16 peak.

* ``train``: ``configs/lavi_qwen2_7b_siglip.py`` vs ``configs/llava_ov_7b_concat.py``,
  stage 2 (projector + conditioners + LLM trainable), the training preset
  (``mixed``), scanned layers, full remat, fsdp over every GPU, 2048 text tokens
  per row with one 729-token image, attention ``auto`` (cuDNN where its
  constraints hold). In this order, so that a run cut short keeps the goal's
  figures: batch 64 on one host (h100:1x1x8), both fusions, FLOPs counted; the
  largest global batch that fits there (doubling from 64 while it fits, up to
  :data:`MAX_BATCH`, then bisected to :data:`BATCH_STEP` rows; memory only); cuDNN vs XLA attention temp at batch 64;
  batch 64 on two hosts (h100:1x2x8).
* ``generation``: Generator's prefill of a 64-token prompt with one visual item
  of 1 / 4 / 10 tiles, then 32 decode steps, batch 1, bf16 params, one host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.tpu import FUSIONS, Recorder, _compile, log  # noqa: E402  (the same machinery as the TPU section)

SLICES = ("h100:1x1x8", "h100:1x2x8")
MESH = {"data": 1, "fsdp": -1, "tensor": 1}
TRAIN_BATCH, TRAIN_SEQ = 64, 2048
MAX_BATCH = 1024
BATCH_STEP = 16  # the batch search's resolution (rows; a multiple of the 8 or 16 GPUs)
GEN_TILES, PROMPT, DECODE_STEPS = (1, 4, 10), 64, 32
PARTS = ("train", "generation")


def train_config(fusion: str, batch: int = TRAIN_BATCH, attention: str = "auto"):
    from benchmarks import tpu

    return tpu.train_config(fusion, "stage 2", batch=batch, attention=attention, mesh=MESH)


def _dr():
    from lavi_jax.train import dry_run as _  # noqa: F401  (the module, not the function of the same name)

    return sys.modules["lavi_jax.train.dry_run"]


def run_train(rec: Recorder, only: str = "") -> None:
    from lavi_jax.train import topology

    dr = _dr()
    meshes = {s: topology.make_mesh(MESH, s) for s in SLICES}
    chips = {s: topology.chip_of(m) for s, m in meshes.items()}
    one = SLICES[0]

    def base(slice_, fusion):
        if not rec.has(("runs", slice_, fusion)):
            cfg = train_config(fusion)
            rec.put(("runs", slice_, fusion),
                    _compile(lambda: dr.train_program(cfg, meshes[slice_], chips[slice_]), f"train {slice_} {fusion}"))

    def search(fusion):
        key = ("batch_search", one, fusion)

        def fits(batch):
            if batch == TRAIN_BATCH and rec.has(("runs", one, fusion)):
                r = rec.get(("runs", one, fusion))
                return bool(r.get("fits"))
            if not rec.has(key + ("tried", str(batch))):
                cfg = train_config(fusion, batch=batch)
                r = _compile(lambda: dr.train_program(cfg, meshes[one], chips[one], flops=False),
                             f"batch search {one} {fusion} batch {batch}")
                rec.put(key + ("tried", str(batch)), {k: r[k] for k in ("fits", "bytes_per_device", "compiler_error",
                                                                         "error") if k in r})
            return bool(rec.get(key + ("tried", str(batch))).get("fits"))

        batch, largest = TRAIN_BATCH, None
        while batch <= MAX_BATCH and fits(batch):
            largest, batch = batch, batch * 2
        if largest is not None and batch <= MAX_BATCH:  # bisect (largest, batch) down to steps of BATCH_STEP rows
            low, high = largest, batch
            while high - low > BATCH_STEP:
                mid = (low + high) // 2 // BATCH_STEP * BATCH_STEP
                low, high = (mid, high) if fits(mid) else (low, mid)
            largest = low
        rec.put(key + ("largest",), largest)

    def xla(fusion):  # cuDNN (auto on GPU) vs XLA attention: the temp
        if not rec.has(("xla_attention", one, fusion)):
            cfg = train_config(fusion, attention="xla")
            rec.put(("xla_attention", one, fusion), _compile(
                lambda: dr.train_program(cfg, meshes[one], chips[one], flops=False), f"train {one} {fusion} xla"))

    steps = [("base", lambda f: base(one, f)), ("search", search), ("xla", xla), ("hosts2", lambda f: base(SLICES[1], f))]
    for name, step in steps:
        if only and name != only:
            continue
        for fusion in FUSIONS:
            step(fusion)


def run_generation(rec: Recorder, only: str = "") -> None:
    from benchmarks import tpu
    from lavi_jax.train import topology

    dr = _dr()
    slice_ = SLICES[0]
    mesh = topology.make_mesh(MESH, slice_)
    chip = topology.chip_of(mesh)
    for tiles in sorted(GEN_TILES, key=lambda t: t != 4):
        for fusion in FUSIONS:
            key = ("runs", slice_, "batch 1", f"{tiles} tiles", fusion)
            if rec.has(key):
                continue
            cfg = tpu.generation_config(fusion)
            cfg.mesh.update(MESH)
            rec.put(key, _compile(lambda: dr.generation_programs(cfg, mesh, chip, batch=1, prompt_len=PROMPT, frames=tiles,
                                                                 new_tokens=DECODE_STEPS + 1),
                                  f"generation {slice_} batch 1 {tiles} tile(s) {fusion}"))


def run(parts=PARTS, out_dir: str | None = None, resume: bool = False) -> dict:
    """Runs ``parts`` one after the other in subprocesses (2 cores: side by side would only slow both), each resuming
    an interrupted part file, and returns the section's result."""
    import json
    import subprocess

    out_dir = out_dir or os.path.join(ROOT, "benchmarks", "results")
    t0 = time.time()
    out = {"slices": list(SLICES), "mesh": MESH, "stage": "stage 2", "train_batch": TRAIN_BATCH, "train_seq": TRAIN_SEQ,
           "prompt": PROMPT, "decode_steps": DECODE_STEPS}
    for part in parts:
        path = os.path.join(out_dir, f".gpu_compile-{part}.json")
        keep = os.path.exists(path) and (resume or "finished" not in json.load(open(path)))
        rc = subprocess.call([sys.executable, "-m", "benchmarks.gpu_compile", "--part", part, "--out", path]
                             + (["--resume"] if keep else []), cwd=ROOT)
        with open(path) as f:
            out[part] = json.load(f)
        if rc:
            out[part]["returncode"] = rc
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--out", required=True, help="JSON file, rewritten after every compile")
    p.add_argument("--resume", action="store_true", help="keep the measurements already in --out, run the rest")
    p.add_argument("--only", default="", help="train: one step of base, search, xla, hosts2")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin still compiles; no version check at cuInit
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    rec = Recorder(args.out, resume=args.resume)
    rec.data.setdefault("started", time.strftime("%Y-%m-%d %H:%M %Z"))
    (run_train if args.part == "train" else run_generation)(rec, args.only)
    if not args.only:
        rec.put(("finished",), time.strftime("%Y-%m-%d %H:%M %Z"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- on a real GPU: prediction vs measurement


def predicted_vs_measured(m, *, batch: int, seq: int, measured: dict, log=log) -> dict:
    """``run.py --gpu``: the train step that ``benchmarks/train_efficiency.py`` timed (model config ``m``, every
    parameter trainable, the state donated), compiled once more for the same GPU kind's abstract device (the deviceless
    path of the dry run), against what the run measured: XLA's peak for the program on this GPU and the allocator's
    peak in use (``measured["peak_bytes_in_use"]``, the process's peak so far), and the step time
    (``measured["step_s"]``) against the dry run's lower bound (FLOPs with every layer counted at the dense bf16 peak)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from benchmarks import train_efficiency
    from lavi_jax import config as C, train as training
    from lavi_jax.models.lavi import LaVi
    from lavi_jax.train import topology

    dr = _dr()
    real = jax.devices()[0]
    chip = topology.chip_of(Mesh([real], ("x",)))
    if chip is None or chip.platform != "gpu":
        return {"skipped": f"no deviceless target for {getattr(real, 'device_kind', real)} (known: {', '.join(topology.GPUS)})"}
    model = LaVi(m)
    c = C.train(trainable="all", batch_size=batch, warmup_steps=1, num_steps=100)
    tx = training.make_optimizer(c)
    patterns = training.trainable_patterns(c.trainable)
    data = jax.eval_shape(lambda: train_efficiency.make_batch(m, batch, seq, 0))

    def init():
        from lavi_jax import sharding

        params = sharding.init_params(model, jax.random.key(0), jnp.zeros((batch, 8), jnp.int32))
        return training.TrainState(step=jnp.int32(0), params=params, opt_state=training.init_opt_state(tx, params, patterns),
                                   nonfinite=jnp.int32(0))

    state = jax.eval_shape(init)
    step = jax.jit(training.make_train_step(model, tx, c), donate_argnums=(0,))

    def on(device, tree):
        sh = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)

    def peak(compiled):
        return dr._memory(compiled)["peak"]

    abstract = topology.devices(f"{chip.name}:1x1x1")[0]
    t0 = time.time()
    predicted = step.lower(on(abstract, state), on(abstract, data)).compile(
        compiler_options=topology.compiler_options(chip, abstract))
    t_pred = time.time() - t0
    on_gpu = step.lower(on(real, state), on(real, data)).compile()
    cpu = jax.devices("cpu")[0]
    flops = float(dr._cost(step.lower(on(cpu, state), on(cpu, data))).get("flops", 0.0))
    bound = flops / chip.peak_bf16_flops
    out = {"gpu": chip.name, "device_kind": real.device_kind, "batch": batch, "seq": seq,
           "predicted_peak_bytes": peak(predicted), "compiled_on_gpu_peak_bytes": peak(on_gpu),
           "measured_peak_bytes_in_use": measured.get("peak_bytes_in_use"), "usable_bytes_predicted": chip.hbm_bytes,
           "bytes_limit_measured": measured.get("bytes_limit"), "flops": flops,
           "seconds_lower_bound": bound, "measured_step_s": measured.get("step_s"),
           "deviceless_compile_s": round(t_pred, 1)}
    if out["measured_step_s"]:
        out["measured_over_bound"] = out["measured_step_s"] / bound if bound else None
    log(f"  deviceless {chip.name} peak {out['predicted_peak_bytes'] / 2**30:.2f} GiB, compiled on this GPU "
        f"{out['compiled_on_gpu_peak_bytes'] / 2**30:.2f} GiB, allocator peak "
        f"{(out['measured_peak_bytes_in_use'] or 0) / 2**30:.2f} GiB; step {out['measured_step_s'] or float('nan'):.3f} s "
        f"vs bound {bound:.3f} s")
    return out


# ----------------------------------------------------------------------------- the report's rows


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def rows(g: dict) -> list[tuple[str, ...]]:
    """Table rows of the section (for benchmarks/report.py: ``if "gpu_compile" in r: out += gpu_compile.rows(...)``)."""
    out = []
    train = g.get("train", {})
    for slice_, runs in train.get("runs", {}).items():
        lv, cc = runs.get("modulation", {}), runs.get("concat", {})
        if "bytes_per_device" in lv and "bytes_per_device" in cc:
            out.append((f"Stage-2 step, 7B, {slice_} (GPU compiler)", f"batch {lv['global_batch']} x {g['train_seq']} text tokens",
                        f"LaVi {_gib(lv['bytes_per_device']['peak'])}/GPU, >= {lv['seconds_lower_bound']:.2f} s",
                        f"concat {_gib(cc['bytes_per_device']['peak'])}/GPU, >= {cc['seconds_lower_bound']:.2f} s",
                        f"FLOPs {cc['flops'] / lv['flops']:.2f}x", f"of {_gib(lv['hbm_bytes'])} usable"))
    for slice_, by in train.get("batch_search", {}).items():
        lv, cc = by.get("modulation", {}), by.get("concat", {})
        out.append((f"Largest stage-2 global batch, 7B, {slice_}", f"{g['train_seq']}-token rows, fsdp over all GPUs",
                    f"LaVi {lv.get('largest')}", f"concat {cc.get('largest')}", "", "GPU compiler"))
    for slice_, by in train.get("xla_attention", {}).items():
        for fusion, r in by.items():
            base = train.get("runs", {}).get(slice_, {}).get(fusion, {})
            if "bytes_per_device" in r and "bytes_per_device" in base:
                out.append((f"Attention temp, 7B stage 2, {slice_}", f"{fusion}, batch {TRAIN_BATCH}",
                            f"cuDNN {_gib(base['bytes_per_device']['temp'])}", f"XLA {_gib(r['bytes_per_device']['temp'])}",
                            f"peak {_gib(base['bytes_per_device']['peak'])} vs {_gib(r['bytes_per_device']['peak'])}", ""))
    for slice_, by_batch in g.get("generation", {}).get("runs", {}).items():
        for batch, by_tiles in by_batch.items():
            for tiles, by in by_tiles.items():
                lv, cc = by.get("modulation", {}), by.get("concat", {})
                if all("prefill" in x and "bytes_per_device" in x["prefill"] for x in (lv, cc)):
                    fl = lambda x: x["prefill"]["flops"] + x.get("decode", {}).get("flops", 0.0)
                    out.append((f"Generation, 7B bf16, {slice_} (GPU compiler)", f"{batch}, {tiles}, {g['decode_steps']} new tokens",
                                f"LaVi {_gib(lv['prefill']['bytes_per_device']['peak'])}/GPU",
                                f"concat {_gib(cc['prefill']['bytes_per_device']['peak'])}/GPU",
                                f"FLOPs {fl(cc) / fl(lv):.2f}x", "prefill peak"))
    return out
