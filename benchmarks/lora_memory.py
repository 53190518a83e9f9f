"""7B LaVi stage 2: the largest global batch of 2048-token rows that fits, LoRA vs QLoRA vs full fine-tuning (TPU compiler).

    python -m benchmarks.lora_memory                      # every row, resuming benchmarks/results/lora_memory.json
    python -m benchmarks.lora_memory --rows qlora-int4@v5e:2x2
    python -m benchmarks.lora_memory --rows qlora-int4@v5e:2x2/loss_chunk=128     # another loss chunk
    python -m benchmarks.lora_memory --rows qlora-int4@v5e:2x2/remat=offload      # layer inputs in host memory
    python -m benchmarks.lora_memory --rows full@v5e:2x4 --batches 8           # only these compiles

``configs/lavi_qwen2_7b_siglip.py``, bf16 params (``set_precision(model, "bf16")``), scanned layers, full
remat, one 729-token image per row, mesh fsdp over every chip, the LM head and loss over 256 positions at a time
(``train.loss_chunk``); LoRA: ``rank=16, alpha=32, targets="llm"``
with projector + conditioners trained fully; full fine-tuning: ``projector+conditioners+llm``. The train step
is compiled by libtpu for the topology's abstract chips (:func:`lavi_jax.train.dry_run.train_program`, memory
only). Peak memory per chip is linear in the batch: each row compiles two batches, extrapolates the largest
batch (a multiple of the chip count) under the chip's HBM, then bisects with compiles between the largest batch
that fits and the smallest that does not, to within 1/32. Every compile is written to the JSON as soon as it finishes, so a killed run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "benchmarks", "results", "lora_memory.json")
METHODS = {"lora": "none", "qlora-int8": "int8", "qlora-int4": "int4", "full": None}
ROWS = ("lora@v5e:2x4", "qlora-int4@v5e:2x2", "qlora-int4@v5e:2x2/loss_chunk=128", "qlora-int4@v5e:2x2/remat=offload",
        "lora@v5e:2x4/remat=offload", "full@v5e:2x4",
        "qlora-int8@v5e:2x2", "qlora-int4@v5e:2x4",
        "qlora-int8@v5e:2x4", "lora@v5p:2x2x1", "full@v5p:2x2x1", "qlora-int4@v5p:2x2x1", "qlora-int8@v5p:2x2x1")
LOSS_CHUNK = 256  # train.loss_chunk: the f32 logits of whole rows (152k vocabulary) would take ~5 GB per v5e chip
PROBES = (8, 16)  # batches per chip... times the chip count: the two compiles of the linear fit
SEQ = 2048


def parse_row(row: str) -> tuple[str, str, dict]:
    """``METHOD@TOPOLOGY[/loss_chunk=N][/remat=POLICY]`` -> (method, topology, options)."""
    spec, *opts = row.split("/")
    method, topology = spec.split("@")
    options = {"loss_chunk": LOSS_CHUNK, "remat": "full"}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in options:
            raise ValueError(f"row {row!r}: unknown option {k!r} (expected {', '.join(options)})")
        options[k] = type(options[k])(v)
    return method, topology, options


def config_for(method: str, topology: str, batch: int, loss_chunk: int = LOSS_CHUNK, remat: str = "full"):
    from benchmarks import tpu
    from lavi_jax import config as C
    from lavi_jax.train import topology as topo

    chips = topo.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, topology).size
    cfg = tpu.train_config("modulation", "stage 2", batch=batch, mesh={"data": 1, "fsdp": chips, "tensor": 1})
    C.set_precision(cfg.model, "bf16")
    cfg.model.remat_policy = remat
    cfg.train.loss_chunk = loss_chunk
    if METHODS[method] is None:
        cfg.train.trainable = "projector+conditioners+llm"
    else:
        cfg.train.trainable = "projector+conditioners"
        cfg.train.lora.update(rank=16, alpha=32, targets="llm", quantize=METHODS[method])
    return cfg, chips


def compile_one(method: str, topology: str, batch: int, **options) -> dict:
    import importlib

    from lavi_jax.train import topology as topo

    dr = importlib.import_module("lavi_jax.train.dry_run")  # the package exports a function of the same name

    cfg, _ = config_for(method, topology, batch, **options)
    mesh = topo.make_mesh(cfg.mesh.to_dict(), topology)
    t0 = time.time()
    r = dr.train_program(cfg, mesh, topo.chip_of(mesh), flops=False)
    b = r.get("bytes_per_device", {})
    return {"batch": batch, "fits": bool(r["fits"]), "peak": b.get("peak"), "params": b.get("params"),
            "opt_state": b.get("opt_state"), "host": b.get("host_temp"), "hbm": r["hbm_bytes"],
            "seconds": round(time.time() - t0, 1)}


def load(path: str = OUT) -> dict:
    return json.load(open(path)) if os.path.exists(path) else {}


def save(data: dict, path: str = OUT) -> None:
    """Writes ``data`` whole, atomically (a killed run leaves the previous file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def measure(data: dict, row: str, batch: int) -> dict:
    runs = data.setdefault(row, {}).setdefault("compiles", {})
    if str(batch) not in runs:
        print(f"{row}: compiling batch {batch}", file=sys.stderr, flush=True)
        method, topology, options = parse_row(row)
        runs[str(batch)] = compile_one(method, topology, batch, **options)
        save(data)
    return runs[str(batch)]


def largest(data: dict, row: str) -> dict:
    method, topology, _ = parse_row(row)
    _, chips = config_for(method, topology, 8)
    a, b = (measure(data, row, p * chips // 8) for p in PROBES)
    if a["peak"] is None or b["peak"] is None:  # refused by the compiler: the fit needs peaks
        data[row]["largest"] = None
        return data[row]
    slope = (b["peak"] - a["peak"]) / (b["batch"] - a["batch"])
    fixed = a["peak"] - slope * a["batch"]
    guess = max(chips, int((a["hbm"] - fixed) / slope) // chips * chips) if slope > 0 else b["batch"]
    data[row].update(fixed_bytes=fixed, bytes_per_row=slope, predicted=guess)
    data[row]["largest"] = bisect(lambda n: measure(data, row, n)["fits"], guess, chips,
                                  [int(k) for k, r in data[row]["compiles"].items() if r["fits"]])
    save(data)
    return data[row]


def bisect(fits, guess: int, step: int, known_fit=()) -> int:
    """The largest multiple of ``step`` that ``fits``, to within 1/32 (the peak is only roughly linear near the
    HBM): from ``guess`` up by eighths while it fits, then bisection between the largest fit and the smallest
    refusal. Returns the largest fit found."""
    lo, hi, n = max([0, *known_fit]), None, guess
    while hi is None:
        if fits(n):
            lo, n = n, n + max(step, n // 8 // step * step)
        else:
            hi = n
    while hi - lo > max(step, lo // 32):
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def table(data: dict) -> str:
    gib = lambda x: "-" if x is None else f"{x / 2**30:.2f}"
    lines = ["| Row | Largest global batch x 2048 | Peak GiB at it | Params GiB | Optimizer GiB | GiB / row |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        d = data.get(row)
        if not d or "largest" not in d:
            lines.append(f"| {row} | not measured | | | | |")
            continue
        r = d["compiles"].get(str(d["largest"]), {})
        lines.append(f"| {row} | {d['largest']} | {gib(r.get('peak'))} | {gib(r.get('params'))} | "
                     f"{gib(r.get('opt_state'))} | {gib(d.get('bytes_per_row'))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated METHOD@TOPOLOGY[/loss_chunk=N]")
    p.add_argument("--batches", default="", help="compile only these global batches (comma-separated) for each row")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    batches = [int(b) for b in args.batches.split(",") if b]
    for row in rows:  # before any compile: a batch must divide by the row's chips
        method, topology, _ = parse_row(row)
        chips = config_for(method, topology, 8)[1]
        if bad := [b for b in batches if b % chips]:
            p.error(f"--batches {bad} for {row}: a global batch must be a multiple of its {chips} chips")
    data = load()
    for row in rows:
        if batches:
            for b in batches:
                r = measure(data, row, b)
                print(f"{row} batch {b}: fits {r['fits']}, peak {r['peak']}", file=sys.stderr)
        else:
            largest(data, row)
    print(table(data))


if __name__ == "__main__":
    main()
