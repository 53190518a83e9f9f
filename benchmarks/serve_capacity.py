"""How many concurrent requests of a OneVision photo one v5e-8 host serves at 7B: LaVi-HD vs concat (TPU compiler).

    python -m benchmarks.serve_capacity        # every row, resuming benchmarks/results/serve_capacity.json

The serving engine's two programs (:class:`lavi_jax.serve.slots.Slots`: ``insert``, one request's prefill written
into a slot, and ``step``, one decode step over every slot) compiled by libtpu for one v5e-8 host (v5e:2x4, mesh
data 2 x tensor 4: the slots split 2 ways, Qwen2-7B's 4 KV heads 4 ways), bf16 weights and caches. A request is
the 1024x768 photo under LLaVA-OneVision-7B's geometry (7 tiles of 729 tokens; concat splices HF's 4,725
visual tokens) behind a 64-token prompt, plus 32 new tokens. LaVi-HD (``hd_geometry.hd_config``) holds per slot
the text KV cache of 96 positions and the conditioners' visual keys / values of the 7 tiles, per
``conditioner.kv_share`` option; concat holds the KV cache of its 4,788-token prefix + 32 (its rows are the 7B
LLaVA-OV config, prompted with that many tokens: the tower's prefill activations on 7 tiles are left out).
A slot count fits when the programs' peaks (arguments + outputs + temp - donated, per chip, plus the params a
program leaves out: the step takes no vision tower, the server still holds it) fit the chip's HBM
(by default the step alone: ``--programs insert,step`` adds the insert, whose temp for one request's prefill
comes on top of the same state); peaks are linear in the slots: two compiles per row give the fit, then the
predicted count is confirmed by compiles (bisecting where it does not fit). Every compile is saved at once, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import lora_memory  # noqa: E402  (the same largest-fit search and resumable JSON)
from benchmarks.lora_memory import bisect  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "serve_capacity.json")
TOPOLOGY, MESH = "v5e:2x4", {"data": 2, "fsdp": 1, "tensor": 4}
TILES, CONCAT_TOKENS, IMAGE = 7, 4725, (768, 1024)  # the 1024x768 photo (benchmarks/hd_geometry.py)
ROWS = ("lavi-hd kv_share=all", "lavi-hd kv_share=none", "concat", "lavi-hd kv_share=4")
PROGRAMS = ("step",)  # --programs insert,step adds the insert program (its libtpu compile is slow on a loaded CPU)
PROBES = (8, 32)
STEP = MESH["data"]  # slot counts stay multiples of the data axis


def _setup(row: str, slots: int):
    import jax
    import jax.numpy as jnp

    from benchmarks import common, hd_geometry
    from lavi_jax import sharding
    from lavi_jax.models.lavi import LaVi
    from lavi_jax.serve.slots import Slots
    from lavi_jax.train import topology as topo

    dr = importlib.import_module("lavi_jax.train.dry_run")
    mesh = topo.make_mesh(MESH, TOPOLOGY)
    if row == "concat":
        m = common.model_config("concat", dtype="bfloat16")
        prompt, visual = common.PROMPT_LEN - 1 + CONCAT_TOKENS, None
    else:
        m = hd_geometry.hd_config(dtype="bfloat16", kv_share=row.split("=")[1])
        prompt, visual = common.PROMPT_LEN, (1, TILES, m.vision.image_size, m.vision.image_size)
    model = LaVi(m)
    shapes, specs = sharding.abstract_params(model, jnp.zeros((1, 8), jnp.int32))
    params = dr._with_shardings(shapes, sharding.logical_to_sharding(specs, mesh, shapes, uneven=None))
    engine = Slots(model, num_slots=slots, max_len=prompt + common.NEW_TOKENS, pad_id=0, visual_shape=visual,
                   anyres=visual is not None)
    rep = sharding.replicated(mesh)
    arr = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    with sharding.use_mesh(mesh):
        state = engine.state_shapes(params)
        engine._shardings = jax.tree.map(lambda x: x.sharding, state)
    media = (None, None, None)
    if visual is not None:
        media = (arr((1,) + visual + (3,), jnp.float32), arr((1, 1, TILES), jnp.bool_), arr((1, 1, 2), jnp.int32))
    ids = arr((1, prompt), jnp.int32)
    knobs = (arr((), jnp.uint32), arr((), jnp.float32), arr((), jnp.int32), arr((), jnp.float32))
    vec = lambda dt: arr((slots,), dt)
    return dr, mesh, engine, params, state, (arr((), jnp.int32), ids, ids) + media + knobs, (
        vec(jnp.int32), vec(jnp.int32), vec(jnp.int32), vec(jnp.uint32), vec(jnp.int32), vec(jnp.float32),
        vec(jnp.int32), vec(jnp.float32))


def compile_one(row: str, slots: int, programs=PROGRAMS) -> dict:
    from lavi_jax import sharding
    from lavi_jax.train import topology as topo

    dr, mesh, engine, params, (cache, mask, visual), insert_args, step_args = _setup(row, slots)
    chip = topo.chip_of(mesh)
    t0 = time.time()
    out = {"slots": slots, "hbm": chip.hbm_bytes, "state_bytes": dr.bytes_per_device((cache, mask, visual)),
           "params_bytes": dr.bytes_per_device(params)}
    with sharding.use_mesh(mesh):
        lowerings = {"insert": lambda: engine._prefill.lower(params, cache, mask, visual, *insert_args),
                     "step": lambda: engine._step.lower(params, cache, mask, visual, *step_args)}
        for name, lowered in ((p, lowerings[p]) for p in programs):
            compiled, refused = dr._compile(lowered(), chip, mesh.devices.flat[0])
            out[name] = refused if refused else dict(dr._memory(compiled), fits=None)
            if not refused:
                out[name]["fits"] = out[name]["peak"] <= chip.hbm_bytes
    out["fits"] = all(out[p]["fits"] for p in programs)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def load() -> dict:
    return lora_memory.load(OUT)


def save(data: dict) -> None:
    lora_memory.save(data, OUT)


def measure(data: dict, row: str, slots: int, programs=PROGRAMS) -> dict:
    key = f"{slots} {'+'.join(programs)}"
    runs = data.setdefault(row, {}).setdefault("compiles", {})
    if key not in runs:
        print(f"{row}: compiling {'+'.join(programs)} for {slots} slots", file=sys.stderr, flush=True)
        runs[key] = compile_one(row, slots, programs)
        save(data)
    return runs[key]


def _peak(r: dict) -> int | None:
    """The chip's peak while serving: the programs' peaks plus the params a program does not take (jit drops
    unused arguments: the step has no vision tower, but the server holds it for the next insert)."""
    peaks = []
    for p in ("insert", "step"):
        if p in r:
            m = r[p]
            if m.get("peak") is None:
                return None
            peaks.append(m["peak"] + max(0, r["params_bytes"] + r["state_bytes"] - m["arguments"]))
    return max(peaks)


def _fits(r: dict) -> bool:
    p = _peak(r)
    return p is not None and p <= r["hbm"]


def largest(data: dict, row: str, programs=PROGRAMS) -> dict:
    measure_ = lambda n: measure(data, row, n, programs)
    a, b = (measure_(n) for n in PROBES)
    pa, pb = _peak(a), _peak(b)
    if pa is None or pb is None:
        data[row]["largest"] = None  # refused at a probe: no fit to extrapolate
        save(data)
        return data[row]
    slope = (pb - pa) / (b["slots"] - a["slots"])
    fixed = pa - slope * a["slots"]
    guess = max(STEP, int((a["hbm"] - fixed) / slope) // STEP * STEP) if slope > 0 else b["slots"]
    data[row].update(fixed_bytes=fixed, bytes_per_slot=slope, predicted=guess, programs=list(programs))
    known = [r["slots"] for k, r in data[row]["compiles"].items() if _fits(r) and k.endswith("+".join(programs))]
    data[row]["largest"] = bisect(lambda n: _fits(measure_(n)), guess, STEP, known)
    save(data)
    return data[row]


def table(data: dict) -> str:
    gib = lambda x: "-" if x is None else f"{x / 2**30:.2f}"
    lines = ["| Row | Concurrent photo requests (v5e-8) | Peak GiB / chip at it | Params GiB / chip | "
             "MiB / slot / chip | vs concat |", "|---|---|---|---|---|---|"]
    base = (data.get("concat") or {}).get("largest")
    for row in ROWS:
        d = data.get(row)
        if not d or "largest" not in d:
            lines.append(f"| {row} | not measured | | | | |")
            continue
        r = d["compiles"].get(f"{d['largest']} {'+'.join(d.get('programs', PROGRAMS))}", {})
        ratio = f"{d['largest'] / base:.2f}x" if base and d["largest"] is not None else ""
        lines.append(f"| {row} | {d['largest']} | {gib(_peak(r) if r else None)} | {gib(r.get('params_bytes'))} | "
                     f"{(d.get('bytes_per_slot') or 0) / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated: insert, step")
    args = p.parse_args(argv)
    programs = tuple(x for x in args.programs.split(",") if x)
    if not programs or set(programs) - {"insert", "step"}:
        raise SystemExit(f"--programs: {args.programs!r} must name insert and / or step")
    data = load()
    for row in [r for r in args.rows.split(",") if r]:
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row!r} (one of {', '.join(ROWS)})")
        largest(data, row, programs)
    print(table(data))


if __name__ == "__main__":
    main()
