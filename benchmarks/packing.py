"""Packed vs bucketed training batches: pad fraction and real tokens per second, side by side in one run.

    python -m benchmarks.packing [--batch 4] [--batches 200] [--max-images 10] [--models demo,scaled] [--no-7b]

Data: synthetic conversations with a length distribution like LLaVA-1.5's
665k mix. The text-only share is the paper's (ShareGPT's 40K of the 665K
records, "Improved Baselines with Visual Instruction Tuning", Table 7); every
other record has one image. Text tokens per conversation are assumed, not
fitted to the file (no per-record length statistics are published):
log-normal, median 150, sigma 0.9 (mean ~225, a long tail from the multi-turn
LLaVA-Instruct, ShareGPT and merged VQA records), clipped to [16, 2047]. LaVi's
sequences hold only text (an image is one placeholder token), so these are the
sequence lengths. The examples are made directly (no decoding).

* bucketed: ``Collator`` with buckets (512, 1024, 2048), B samples per batch, one
  item per row, the smallest bucket that fits the batch's longest sample;
* packed: ``PackIterator`` rows of 2048 tokens and ``max_images`` items, B rows per batch.

Both have B rows of at most 2048 tokens (the same step shape). Pad fraction =
1 - real tokens / (B x T); item pad = 1 - real items / item slots.

Real tokens per second, measured: the jitted train step of ``lavi_jax.train``
(``jit_train_step``, one device, AdamW, stage 2: ``projector+conditioners+llm``
trainable, the vision tower frozen as when training on the 665k mix), timed
per batch shape (medians of interleaved repetitions) and weighted by each
shape's share of the sampled batches. Two CPU geometries:

* ``demo``: the demo config's model (LLM d=64): attention over 2048 tokens
  dominates its step, the case least favourable to packing;
* ``scaled``: an LLM of d=384, 4 layers with a ViT of d=256, 5 layers (64
  patches per image): the LLM's FLOPs per conversation are ~18x the tower's per
  image, as Qwen2-7B's (6 x 7.6B x 225) are ~18x SigLIP-so400m's forward per
  image (2 x 0.4B x 729). Its attention share at 2048 tokens is still far
  above 7B's (d=384 vs 3584), and XLA's CPU attention computes the full T x T
  scores, so this figure is a lower bound on what packing gives at 7B.

7B (``configs/lavi_qwen2_7b_siglip.py`` and ``configs/lavi_vicuna7b_clip336.py``): FLOPs per train step as
``lavi_jax.train.dry_run`` counts them (XLA's cost analysis of the step lowered
for one CPU device with every loop unrolled and XLA attention, which counts
the full score matrix; a splash kernel skips the masked blocks), per batch
shape; tokens/s bound = real tokens per step / (FLOPs / peak) per chip at the
TPU v5p nominal bf16 peak. The packed/bucketed ratio does not depend on the peak.
``--topology v5e:8x8`` also compiles the 7B step at the training preset of
``benchmarks/tpu.py`` for that slice (``lavi_jax.train.dry_run``, needs libtpu):
per-chip memory and fit of a packed batch against a bucketed one of 2048 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grain
import jax
import numpy as np

from benchmarks import common, report
from lavi_jax import config as C
from lavi_jax.data.collate import Collator
from lavi_jax.data.packing import PackIterator, RowLayout, stack_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BUCKETS = (512, 1024, 2048)
MEDIAN, SIGMA, TEXT_ONLY = 150.0, 0.9, 40 / 665
STAGE = "projector+conditioners+llm"
V5P_PEAK = 459e12  # TPU v5p nominal bf16 FLOP/s per chip (lavi_jax.train.topology)
CONFIGS_7B = {"7B": "configs/lavi_qwen2_7b_siglip.py", "7B vicuna": "configs/lavi_vicuna7b_clip336.py"}
CONFIG_7B = CONFIGS_7B["7B"]
PRESET_MESH, PRESET_BATCH = {"data": 1, "fsdp": 16, "tensor": 4}, 64  # the 7B training preset of benchmarks/tpu.py


class _Synthetic:
    """Index -> a synthetic example (seeded per index) of the assumed LLaVA-665k length distribution."""

    def __init__(self, image_size: int, image_token_id: int, vocab: int, seed: int = 0):
        self.image_size, self.image_token_id, self.vocab, self.seed = image_size, image_token_id, vocab, seed

    def __call__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        n = int(np.clip(rng.lognormal(np.log(MEDIAN), SIGMA), 16, max(BUCKETS) - 1))
        ids = rng.integers(1, min(self.image_token_id, self.vocab), n).astype(np.int32)
        items = 0 if rng.random() < TEXT_ONLY else 1
        if items:
            ids[1] = self.image_token_id
        loss = np.zeros(n, np.int32)
        loss[n // 3:] = 1
        s = self.image_size
        pixels = rng.normal(size=(items, 1, s, s, 3)).astype(np.float32)
        return {"input_ids": ids, "loss_mask": loss, "index": index, "pixel_values": pixels,
                "item_mask": np.ones((items, 1), bool)}


def _stream(make):
    return grain.MapDataset.range(10**9).map(make).to_iter_dataset()


def pipelines(make, batch: int, max_items: int, window: int, pad_id: int = 0):
    """(bucketed, packed) endless batch iterators over the same example stream."""
    s = make.image_size
    collate = Collator(BUCKETS, 1, 1, (s, s), pad_id)
    bucketed = iter(_stream(make).batch(batch, drop_remainder=True, batch_fn=collate))
    layout = RowLayout(max(BUCKETS), max_items, 1, (s, s), pad_id)
    rows = PackIterator(iter(_stream(make)), layout, window, make)
    packed = (stack_rows([next(rows) for _ in range(batch)]) for _ in iter(int, 1))
    return bucketed, packed


def measure_pipeline(it, batches: int) -> dict:
    real = slots = items = item_slots = 0
    shapes: dict[int, int] = {}
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += int(b["attention_mask"].sum())
        slots += b["attention_mask"].size
        items += int(b["item_mask"].any(-1).sum())
        item_slots += b["item_mask"].shape[0] * b["item_mask"].shape[1]
        shapes[b["input_ids"].shape[1]] = shapes.get(b["input_ids"].shape[1], 0) + 1
    seconds = time.perf_counter() - start
    rows = batches * b["input_ids"].shape[0]
    return {"pad_fraction": 1 - real / slots, "item_pad_fraction": 1 - items / item_slots,
            "real_tokens_per_batch": real / batches, "rows_per_s": rows / seconds, "batches_per_s": batches / seconds,
            "seq_len_counts": shapes, "item_slots_per_row": b["item_mask"].shape[1]}


# ----------------------------------------------------------------------------- models


def scaled_model() -> C.ConfigDict:
    """The ``scaled`` CPU geometry (module docstring): byte vocabulary, LLM/vision FLOP ratio as at 7B."""
    from configs.demo import get_config

    m = get_config().model
    m.llm.update(hidden_size=384, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=96,
                 max_position_embeddings=2048)
    m.vision.update(hidden_size=256, intermediate_size=1024, num_layers=5, num_heads=4, image_size=128, patch_size=16)
    m.conditioner.update(width=128, num_heads=4)
    return m


def model_geometry(name: str) -> C.ConfigDict:
    if name == "demo":
        from configs.demo import get_config

        return get_config().model
    if name == "scaled":
        return scaled_model()
    raise ValueError(f"unknown model geometry {name!r} (demo | scaled)")


def _run_config(model_cfg, packed: bool, max_items: int, batch: int, seq_buckets=BUCKETS, unrolled: bool = False):
    config = C.experiment(model_cfg.copy_and_resolve_references())
    config.data.update(packing=packed, max_images=1, pack_max_images=max_items, num_frames=1, seq_buckets=seq_buckets,
                       image_size=model_cfg.vision.image_size)
    config.train.update(batch_size=batch, grad_accum=1, trainable=STAGE, learning_rate=1e-5, warmup_steps=0)
    if unrolled:  # FLOPs as the dry run counts them
        config.model.update(scan_layers=False, attention="xla")
    return config


def _one_device():
    from lavi_jax import sharding

    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])


def _abstract(program):
    from lavi_jax import sharding

    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), program.abstract,
                         program.shardings)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(program.mesh, len(shape)))
             for k, (shape, dt) in program.batch.shapes().items()}
    return state, batch


def step_flops(program) -> float:
    """XLA's FLOPs of the lowered train step (unoptimised HLO; one loop body counted once)."""
    from lavi_jax import sharding

    state, batch = _abstract(program)
    with sharding.use_mesh(program.mesh):
        cost = program.fn.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def vision_flops(model_cfg, frames: int) -> float:
    """FLOPs of the tower + projector forward on ``frames`` frames (frozen in stage 2: no backward)."""
    import flax.linen as nn

    from lavi_jax.models.lavi import LaVi

    model = LaVi(model_cfg)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]))
    s = model_cfg.vision.image_size
    pixels = jax.ShapeDtypeStruct((1, frames, 1, s, s, 3), np.float32)
    cost = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LaVi.encode)).lower(params, pixels).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _bucketed_mean(per_shape: dict, counts: dict) -> float:
    total = sum(counts.values())
    return sum(per_shape[t] * c / total for t, c in counts.items())


def measure_model(name: str, samples: dict, stats: dict, batch: int, max_items: int, reps: int, log=print) -> dict:
    """Real tokens/s of the train step on ``samples`` ({"bucketed T=..": batch, "packed": batch})."""
    from lavi_jax import sharding, train as training
    from lavi_jax.models.lavi import LaVi

    m = model_geometry(name)
    mesh = _one_device()
    programs = {False: training.jit_train_step(_run_config(m, False, max_items, batch), mesh),
                True: training.jit_train_step(_run_config(m, True, max_items, batch), mesh)}
    model = LaVi(m)
    params = sharding.init_params(model, jax.random.key(0), np.zeros((1, 8), np.int32), mesh=mesh)
    p = programs[False]
    holder = {"state": training.create_state(params, p.tx, p.patterns, p.shardings)}  # one state, every shape
    flops, fns = {}, {}
    for key, b in samples.items():
        program = programs[key == "packed"]
        data = sharding.to_global({k: b[k] for k in program.batch.shapes()}, mesh)

        def call(fn=program.fn, data=data):
            holder["state"], metrics = fn(holder["state"], data)
            return metrics["loss"]

        t0 = time.perf_counter()
        jax.block_until_ready(call())
        log(f"  [{name}] {key}: compiled and ran in {time.perf_counter() - t0:.1f} s")
        shaped = training.jit_train_step(_run_config(m, key == "packed", max_items, batch,
                                                     (b["input_ids"].shape[1],)), mesh)
        flops[key] = step_flops(shaped)
        fns[key] = lambda call=call: {"s": common.timed(call)}
    # one untimed round: a shape's first call after another shape's may still compile for the state's new layout
    times = common.interleaved(fns, reps=reps, warmup=1)
    step_s = {k: times[k]["s"] for k in times}
    counts = stats["bucketed"]["seq_len_counts"]
    bucket_s = _bucketed_mean({t: step_s[f"bucketed T={t}"] for t in counts}, counts)
    bucket_flops = _bucketed_mean({t: flops[f"bucketed T={t}"] for t in counts}, counts)
    out = {"config": common.describe(m), "trainable": STAGE, "step_s": step_s,
           "step_samples_s": {k: times[k]["samples"]["s"] for k in times}, "step_flops": flops,
           "vision_flops_share": {
               "bucketed": vision_flops(m, batch) / flops[f"bucketed T={min(counts)}"],
               "packed": vision_flops(m, batch * max_items) / flops["packed"]},
           "bucketed_real_tokens_per_s": stats["bucketed"]["real_tokens_per_batch"] / bucket_s,
           "packed_real_tokens_per_s": stats["packed"]["real_tokens_per_batch"] / step_s["packed"],
           "flops_per_real_token": {"bucketed": bucket_flops / stats["bucketed"]["real_tokens_per_batch"],
                                    "packed": flops["packed"] / stats["packed"]["real_tokens_per_batch"]}}
    out["speedup"] = out["packed_real_tokens_per_s"] / out["bucketed_real_tokens_per_s"]
    out["flops_speedup"] = out["flops_per_real_token"]["bucketed"] / out["flops_per_real_token"]["packed"]
    return out


def measure_7b(stats: dict, batch: int, max_items: int, path: str = CONFIG_7B, log=print) -> dict:
    """FLOPs-bound tokens/s of a 7B config's train step, packed vs bucketed (module docstring)."""
    from lavi_jax import train as training

    m = C.get(path).model
    mesh = _one_device()
    counts = stats["bucketed"]["seq_len_counts"]
    flops = {}
    for key, packed, T in [(f"bucketed T={t}", False, t) for t in sorted(counts)] + [("packed", True, max(BUCKETS))]:
        t0 = time.perf_counter()
        config = _run_config(m, packed, max_items, batch, (T,), unrolled=True)
        flops[key] = step_flops(training.jit_train_step(config, mesh))
        log(f"  [{path}] {key}: {flops[key] / 1e12:.1f} TFLOP per step (lowered in {time.perf_counter() - t0:.0f} s)")
    bucket_flops = _bucketed_mean({t: flops[f"bucketed T={t}"] for t in counts}, counts)
    out = {"config": f"{path}, " + common.describe(m), "trainable": STAGE,
           "method": "XLA cost analysis of the unrolled step lowered for one CPU device (as lavi_jax.train.dry_run)",
           "step_flops": flops, "peak_flops_per_s": V5P_PEAK, "chip": "TPU v5p (nominal bf16 peak)",
           "bucketed_real_tokens_per_s": stats["bucketed"]["real_tokens_per_batch"] * V5P_PEAK / bucket_flops,
           "packed_real_tokens_per_s": stats["packed"]["real_tokens_per_batch"] * V5P_PEAK / flops["packed"]}
    out["speedup"] = out["flops_speedup"] = out["packed_real_tokens_per_s"] / out["bucketed_real_tokens_per_s"]
    return out


def dry_run_7b(stats: dict, batch: int, max_items: int, topology: str, log=print) -> dict:
    """The 7B step at the training preset compiled for ``topology`` by ``lavi_jax.train.dry_run``: per-chip
    memory and fit of a packed batch against a bucketed one at the largest bucket (the same step shape)."""
    from lavi_jax import train as training

    out = {"topology": topology, "preset": f"bf16 compute, f32 params, scanned layers, full remat, mesh "
                                          f"{PRESET_MESH}, global batch {PRESET_BATCH} x 2048, {STAGE}"}
    for key, packed in (("bucketed T=2048", False), ("packed", True)):
        config = C.get(CONFIG_7B)
        config.model.update(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full")
        config.train.update(batch_size=PRESET_BATCH, trainable=STAGE, grad_accum=1)
        config.data.update(seq_buckets=(max(BUCKETS),), packing=packed, max_images=1, pack_max_images=max_items,
                           num_frames=1)
        config.mesh.update(PRESET_MESH)
        t0 = time.perf_counter()
        try:
            report_ = training.dry_run(config, topology=topology, programs=("train",))
        except Exception as e:  # no libtpu, or the compiler refuses a program that does not fit
            out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  [7B {topology}] {key}: {out[key]['error']}")
            continue
        r, chips = report_["programs"]["train"], report_["devices"]
        per_row = stats["packed" if packed else "bucketed"]["real_tokens_per_batch"] / batch
        out[key] = {"peak_bytes_per_chip": r["bytes_per_device"]["peak"], "hbm_bytes": r.get("hbm_bytes"),
                    "fits": r.get("fits"), "flops": r["flops"], "seconds_lower_bound": r.get("seconds_lower_bound")}
        if packed and r.get("seconds_lower_bound"):
            out[key]["real_tokens_per_s_per_chip_bound"] = per_row * PRESET_BATCH / r["seconds_lower_bound"] / chips
        log(f"  [7B {topology}] {key}: peak {r['bytes_per_device']['peak'] / 2**30:.2f} GiB per chip, fits "
            f"{r.get('fits')} ({time.perf_counter() - t0:.0f} s)")
    return out


def _samples(bucketed_it, packed_it, stats: dict) -> dict:
    """One sample batch per bucketed shape of the measured stream, plus a packed one."""
    samples = {}
    while len(samples) < len(stats["bucketed"]["seq_len_counts"]):
        b = next(bucketed_it)
        samples.setdefault(f"bucketed T={b['input_ids'].shape[1]}", b)
    samples["packed"] = next(packed_it)
    return dict(sorted(samples.items()))


def run(batch: int = 4, batches: int = 200, max_items: int = 10, window: int = 8, reps: int = 3,
        models=("demo", "scaled"), configs_7b=tuple(CONFIGS_7B), topology: str = "", log=print) -> dict:
    """Every measurement of the module docstring; ``models``: CPU geometries to time, ``configs_7b``: keys of
    ``CONFIGS_7B`` to cost, ``topology``: also compile the 7B step for that TPU slice."""
    result = {"batch": batch, "batches": batches, "max_images_per_row": max_items, "window": window,
              "buckets": BUCKETS, "lengths": f"lognormal(median={MEDIAN}, sigma={SIGMA}) clipped to [16, 2047], "
              f"{TEXT_ONLY:.1%} text-only (ShareGPT 40K of 665K), the rest one image", "pipeline": {}, "models": {}}
    for name in models:
        m = model_geometry(name)
        make = _Synthetic(image_size=m.vision.image_size, image_token_id=m.image_token_id, vocab=m.llm.vocab_size)
        bucketed, packed = pipelines(make, batch, max_items, window)
        stats = {"bucketed": measure_pipeline(bucketed, batches), "packed": measure_pipeline(packed, batches)}
        result["pipeline"] = stats  # lengths do not depend on the geometry: the same for every model
        log(f"[packing] {name}: pad {100 * stats['bucketed']['pad_fraction']:.1f} % bucketed, "
            f"{100 * stats['packed']['pad_fraction']:.1f} % packed")
        result["models"][name] = measure_model(name, _samples(bucketed, packed, stats), stats, batch, max_items, reps,
                                               log)
    if not models:
        make = _Synthetic(64, 259, 264)
        bucketed, packed = pipelines(make, batch, max_items, window)
        result["pipeline"] = {"bucketed": measure_pipeline(bucketed, batches), "packed": measure_pipeline(packed, batches)}
    for name in configs_7b:
        result["models"][name] = measure_7b(result["pipeline"], batch, max_items, CONFIGS_7B[name], log)
    if topology:
        result["dry_run_7b"] = dry_run_7b(result["pipeline"], batch, max_items, topology, log)
    return result


def table(r: dict) -> str:
    lines = [f"{'':10s} {'pad':>7s} {'item pad':>9s} {'real tok/batch':>15s} {'rows/s':>9s}  T"]
    for name, s in r["pipeline"].items():
        lines.append(f"{name:10s} {100 * s['pad_fraction']:6.1f}% {100 * s['item_pad_fraction']:8.1f}% "
                     f"{s['real_tokens_per_batch']:15.0f} {s['rows_per_s']:9.0f}  {s['seq_len_counts']}")
    lines.append("")
    lines.append(f"{'model':8s} {'bucketed tok/s':>15s} {'packed tok/s':>13s} {'speedup':>8s} {'FLOPs/token':>12s}  config")
    for name, m in r["models"].items():
        fl = f"{m['flops_speedup']:.2f}x" if "flops_speedup" in m else ""
        lines.append(f"{name:8s} {m['bucketed_real_tokens_per_s']:15.0f} {m['packed_real_tokens_per_s']:13.0f} "
                     f"{m['speedup']:7.2f}x {fl:>12s}  {m['config']}")
    if "dry_run_7b" in r:
        d = r["dry_run_7b"]
        lines.append(f"\n7B on {d['topology']} ({d['preset']}):")
        for k, x in d.items():
            if isinstance(x, dict) and "error" in x:
                lines.append(f"  {k:16s} {x['error']}")
            elif isinstance(x, dict):
                lines.append(f"  {k:16s} peak {x['peak_bytes_per_chip'] / 2**30:6.2f} GiB per chip of "
                             f"{(x['hbm_bytes'] or 0) / 2**30:.0f}, fits {x['fits']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="rows per batch (both layouts)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--max-images", type=int, default=10, help="visual items per packed row")
    p.add_argument("--window", type=int, default=8, help="open rows of the packer")
    p.add_argument("--model-reps", type=int, default=3)
    p.add_argument("--models", default="demo,scaled", help="CPU geometries to time (demo, scaled; empty: none)")
    p.add_argument("--no-7b", action="store_true", help="skip the 7B FLOPs rows")
    p.add_argument("--topology", default="", help="also compile the 7B step for this TPU topology (needs libtpu; "
                   "~10 min on 2 cores), e.g. v5e:8x8")
    a = p.parse_args(argv)
    command = "python -m benchmarks.packing" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    t0, load0 = time.time(), common.load_average()
    result = run(a.batch, a.batches, a.max_images, a.window, a.model_reps,
                 tuple(x.strip() for x in a.models.split(",") if x.strip()), () if a.no_7b else tuple(CONFIGS_7B), a.topology)
    result.update(name="packing", command=command, date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  elapsed_s=round(time.time() - t0, 1), load_average=[load0, common.load_average()])
    print(table(result))
    os.makedirs(RESULTS, exist_ok=True)
    print("wrote", report.write_json(result, RESULTS))


if __name__ == "__main__":
    main()
