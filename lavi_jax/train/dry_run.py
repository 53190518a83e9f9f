"""Sizing a run without running it: compile its programs on abstract inputs, report memory, FLOPs and time bounds.

    report = dry_run(config)                                  # config.mesh over the devices at hand
    report = dry_run(config, topology="v5e:8x8",              # for a TPU slice, from a CPU host
                     programs=("train", "prefill", "decode"))

Programs (``config.dry_run_programs``):

* ``train``: the train step for the global batch ``config.train.batch_size`` at
  the largest ``config.data.seq_buckets`` bucket (one batch of ``max_images``
  items of ``num_frames`` frames per row);
* ``prefill`` / ``decode``: :class:`lavi_jax.generate.Generator`'s prefill of a
  prompt of that bucket length at the eval batch size (``config.evals.batch_size``,
  0: the train batch) and one cached decode step at the final cache length
  (``config.evals.max_new_tokens`` new tokens), counted ``max_new_tokens - 1`` times.

Per program and chip: parameters, optimizer state, XLA's temp / argument /
output sizes and their peak (arguments + outputs + temp - donated), against
the chip's HBM for a TPU topology (:mod:`lavi_jax.train.topology`); what
``remat_policy="offload"`` keeps in host memory is ``host_temp``, outside the peak.

FLOPs: XLA counts a loop body once, so the compiled program's own figure
misses ``n - 1`` of the n scanned layer blocks and micro-batches. The reported
FLOPs are XLA's cost analysis of the same program lowered for one CPU device
with every loop unrolled (``scan_layers=False``, ``grad_accum=1``) and
``attention="xla"`` (a splash kernel skips masked blocks, so the figure counts
the full attention score matrix), divided evenly over the chips; on the tiny
config it is 4.8 % below the compiled unrolled program's count. The step-time
lower bound is those FLOPs at the chip's nominal bf16 peak; the compiler's own
time estimate (``optimal_seconds``) is kept only for a program without loops.
"""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax import sharding, storage
from lavi_jax.data.batch import BatchSpec
from lavi_jax.generate import Generator
from lavi_jax.models import anyres
from lavi_jax.models.lavi import LaVi
from lavi_jax.train import hlo_traffic, topology as topo
from lavi_jax.train.step import jit_train_step

PROGRAMS = ("train", "prefill", "decode")
MEMORY_KEYS = ("params", "opt_state", "arguments", "outputs", "temp", "peak")


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)


def _cost(stage) -> dict:
    """XLA's cost analysis ({} where the backend gives none: the GPU compiler's programs)."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without a cost model)
        return {}
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def _memory(compiled, **known) -> dict:
    """Per-device bytes of a compiled program; ``known`` adds breakdowns of its arguments (params, opt_state)."""
    m = compiled.memory_analysis()
    out = dict(known, arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               temp=int(m.temp_size_in_bytes), donated=int(m.alias_size_in_bytes),
               host_temp=int(getattr(m, "host_temp_size_in_bytes", 0) or 0))  # remat_policy "offload"
    out["peak"] = out["arguments"] + out["outputs"] + out["temp"] - out["donated"]
    return out


def _measured(compiled, seconds: float, flops_total: float, devices: int, chip, **memory) -> dict:
    """One program's report: memory, FLOPs, the time bounds."""
    cost = _cost(compiled)
    r = {"bytes_per_device": _memory(compiled, **memory), "compile_seconds": round(seconds, 1),
         "flops": flops_total, "flops_per_device": flops_total / devices,
         "compiler_flops_per_device_loops_once": float(cost.get("flops", 0.0))}
    estimate = float(cost.get("optimal_seconds", -1.0))
    has_loop = re.search(r"\bwhile\(", compiled.as_text() or "") is not None
    r["compiler_seconds_estimate"] = estimate if estimate > 0 and not has_loop else None
    if chip is not None:
        fit_against(r, chip)
        r["seconds_lower_bound"] = r["flops_per_device"] / chip.peak_bf16_flops
    return r


def fit_against(r: dict, chip) -> dict:
    """Sets a program report's ``hbm_bytes``, ``fits`` and ``headroom_bytes`` from its peak and ``chip``'s usable HBM."""
    r["hbm_bytes"] = chip.hbm_bytes
    r["fits"] = r["bytes_per_device"]["peak"] <= chip.hbm_bytes
    r["headroom_bytes"] = chip.hbm_bytes - r["bytes_per_device"]["peak"]
    return r


def _unrolled(config):
    """A copy of ``config`` whose programs have no loops (for counting FLOPs) and XLA attention."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.update(scan_layers=False, attention="xla")
        c.train.grad_accum = 1
    return c


def _cpu_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])


# ----------------------------------------------------------------------------- train


def _train_lowered(config, mesh):
    program = jit_train_step(config, mesh)
    spec = BatchSpec.from_config(config, config.train.batch_size)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(program.mesh, len(shape)))
             for k, (shape, dt) in spec.shapes().items()}
    state = _with_shardings(program.abstract, program.shardings)
    with sharding.use_mesh(program.mesh):
        return program.fn.lower(state, batch), state, spec


def _compile(lowered, chip, device=None):
    """``(compiled, None)``, or ``(None, report)`` when the TPU compiler refuses a program too large for HBM."""
    try:
        return lowered.compile(compiler_options=topo.compiler_options(chip, device)), None
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED ... Ran out of memory in memory space hbm ...
        msg = " ".join(str(e).split())
        if chip is None or "RESOURCE_EXHAUSTED" not in msg:
            raise
        return None, {"fits": False, "compiler_error": msg[:600], "hbm_bytes": chip.hbm_bytes}


def train_program(config, mesh, chip, *, flops: bool = True) -> dict:
    """The train step's report (``flops=False``: memory only, skipping the unrolled lowering)."""
    t0 = time.time()
    lowered, state, spec = _train_lowered(config, mesh)
    compiled, refused = _compile(lowered, chip, mesh.devices.flat[0])
    setting = dict(global_batch=int(config.train.batch_size), seq_len=spec.seq_len,
                   grad_accum=int(config.train.grad_accum), tokens=int(config.train.batch_size) * spec.seq_len)
    if refused:
        return dict(refused, compile_seconds=round(time.time() - t0, 1), **setting)
    seconds = time.time() - t0
    total = float(_cost(_train_lowered(_unrolled(config), _cpu_mesh())[0]).get("flops", 0.0)) if flops else float("nan")
    r = _measured(compiled, seconds, total, mesh.size, chip, params=bytes_per_device(state.params),
                  opt_state=bytes_per_device(state.opt_state))
    r.update(setting)
    if "seconds_lower_bound" in r:
        r["tokens_per_second_upper_bound"] = r["tokens"] / r["seconds_lower_bound"]
    return r


# ----------------------------------------------------------------------------- generation


def _generation_inputs(config, mesh, batch: int, prompt_len: int, frames: int):
    """Abstract (params, ids, mask, pixels, item_mask[, image_sizes]), the batch sharded where it divides over the
    mesh; image_sizes [B, N, 2] for an anyres model."""
    m, d = config.model, config.data
    model = LaVi(m)
    shapes, specs = sharding.abstract_params(model, jnp.zeros((1, 8), jnp.int32))
    params = _with_shardings(shapes, sharding.logical_to_sharding(specs, mesh, shapes))
    rows = mesh.shape["data"] * mesh.shape["fsdp"]

    def arr(shape, dt):
        sh = sharding.batch_sharding(mesh, len(shape)) if shape[0] % rows == 0 else sharding.replicated(mesh)
        return jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    ids, mask = arr((batch, prompt_len), jnp.int32), arr((batch, prompt_len), jnp.int32)
    pix = im = None
    if m.fusion != "none":
        s = m.vision.image_size
        pix = arr((batch, int(d.max_images), frames, s, s, 3), jnp.float32)
        im = arr((batch, int(d.max_images), frames), jnp.bool_)
    sizes = (arr((batch, int(d.max_images), 2), jnp.int32),) if m.fusion != "none" and anyres.enabled(m) else ()
    return model, params, (ids, mask, pix, im) + sizes


def _generation_lowered(config, mesh, batch, prompt_len, frames, new_tokens):
    """(prefill lowered, decode-step lowering function of the prefill's compiled outputs)."""
    model, params, inputs = _generation_inputs(config, mesh, batch, prompt_len, frames)
    gen = Generator(model, max_new_tokens=new_tokens)
    with sharding.use_mesh(mesh):
        prefill = jax.jit(gen.prefill).lower(params, *inputs)

    def step(state):  # the decode step Generator.stream runs, at the final cache length
        cache, rest = state["cache"], {k: v for k, v in state.items() if k != "cache"}
        rep = sharding.replicated(mesh)
        vec = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
        fn = jax.jit(gen._step_fn, static_argnames=("greedy", "top_k", "nucleus"), donate_argnames=("cache",))
        with sharding.use_mesh(mesh):
            return fn.lower(params, cache, rest, vec, jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rep), rng,
                            scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32), greedy=True, top_k=0,
                            nucleus=False)

    return prefill, step, params


def generation_programs(config, mesh, chip, *, batch: int, prompt_len: int, frames: int, new_tokens: int,
                        programs=("prefill", "decode")) -> dict:
    """Reports of Generator's prefill and ``new_tokens - 1`` decode steps (one compiled step, its FLOPs
    counted that many times) for ``batch`` prompts of ``prompt_len`` tokens with ``frames`` frames per item."""
    t0 = time.time()
    prefill, step, params = _generation_lowered(config, mesh, batch, prompt_len, frames, new_tokens)
    prefill_c, refused = _compile(prefill, chip, mesh.devices.flat[0])
    t_prefill = time.time() - t0
    setting = dict(batch=batch, prompt_len=prompt_len, frames_per_item=frames, new_tokens=new_tokens)
    if refused:
        return {p: dict(refused, compile_seconds=round(t_prefill, 1), **setting) for p in programs}
    f_pre, f_step_fn, _ = _generation_lowered(_unrolled(config), _cpu_mesh(), batch, prompt_len, frames, new_tokens)
    f_state = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), f_pre.out_info)
    out = {}
    if "prefill" in programs:
        out["prefill"] = dict(_measured(prefill_c, t_prefill, float(_cost(f_pre).get("flops", 0.0)), mesh.size, chip,
                                        params=bytes_per_device(params)), **setting)
    if "decode" in programs:
        t0 = time.time()
        step_c, refused = _compile(step(prefill_c.out_info), chip, mesh.devices.flat[0])
        steps = new_tokens - 1
        if refused:
            out["decode"] = dict(refused, compile_seconds=round(time.time() - t0, 1), steps=steps, **setting)
            return out
        f_step = float(_cost(f_step_fn(f_state)).get("flops", 0.0))
        r = _measured(step_c, time.time() - t0, f_step * steps, mesh.size, chip, params=bytes_per_device(params))
        r["steps"] = steps
        r.update(decode_traffic(config, mesh, chip, batch=batch, prompt_len=prompt_len, frames=frames,
                                new_tokens=new_tokens, state=prefill_c.out_info))
        if r["compiler_seconds_estimate"] is not None:
            r["compiler_seconds_estimate"] *= steps
        if "seconds_lower_bound" in r:
            r["seconds_lower_bound_per_step"] = r["seconds_lower_bound"] / max(steps, 1)
        out["decode"] = dict(r, **setting)
    return out


def decode_loop_lowered(gen: Generator, params, state, mesh):
    """Generator's whole decode loop (the program eval and ``predict`` run) lowered for a prefill's outputs."""
    rest = {k: v for k, v in state.items() if k != "cache"}
    rep = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    with sharding.use_mesh(mesh):
        return gen._decode.lower(params, state["cache"], rest, rng, scalar, scalar, greedy=True, top_k=0, nucleus=False)


def decode_traffic(config, mesh, chip, *, batch: int, prompt_len: int, frames: int, new_tokens: int,
                   state=None) -> dict:
    """One decode step's memory traffic per device: the compiler's bytes accessed beside the read-once floor (the
    decoder's weights, the KV cache and the visual cache read once each) and their ratio.

    Counted on Generator's decode loop with unrolled layers, on ``mesh``: XLA counts a loop body once, so the
    figure is one token's step plus what the program does once per generation (the first token's sampling, layout
    changes of the cache on entry and exit). ``state``: the prefill's compiled outputs when ``config`` is already
    unrolled. It also counts the chip's on-chip copies of weights (prefetches into
    faster memory), so it bounds the HBM traffic from above. ``hbm_bytes_per_step``: the HBM bytes one iteration of
    the compiled loop reads and writes (operands and results in memory space 0 only, on-chip copies not counted:
    :mod:`lavi_jax.train.hlo_traffic`), for the TPU compiler's programs."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.scan_layers = False
    model, params, inputs = _generation_inputs(c, mesh, batch, prompt_len, frames)
    gen = Generator(model, max_new_tokens=new_tokens)
    if state is None or config.model.scan_layers:  # the prefill's outputs as the unrolled model lays them out
        with sharding.use_mesh(mesh):
            prefill, refused = _compile(jax.jit(gen.prefill).lower(params, *inputs), chip, mesh.devices.flat[0])
        if refused:
            return {}
        state = prefill.out_info
    compiled, refused = _compile(decode_loop_lowered(gen, params, state, mesh), chip, mesh.devices.flat[0])
    if refused:
        return {}
    accessed = float(_cost(compiled).get("bytes accessed", 0.0))
    if accessed <= 0:  # the GPU compiler has no cost model
        return {}
    parts = {"decoder_params": bytes_per_device(params["llm"]), "kv_cache": bytes_per_device(state["cache"]),
             "visual_cache": bytes_per_device(state["visual_cache"])}
    floor = sum(parts.values())
    out = {"bytes_accessed_per_step": accessed, "read_once_bytes_per_step": floor, "read_once_parts": parts,
           "bytes_accessed_over_read_once": accessed / floor}
    if chip is not None and chip.hbm_bytes_per_second:
        out["seconds_per_step_bandwidth_bound"] = accessed / chip.hbm_bytes_per_second
    if chip is not None and chip.platform == "tpu":  # memory spaces are the TPU compiler's layouts
        hbm = hlo_traffic.loop_hbm_traffic(compiled.as_text())
        out.update(hbm_bytes_per_step=hbm["bytes"], hbm_read_bytes_per_step=hbm["read"],
                   hbm_written_bytes_per_step=hbm["written"], hbm_bytes_over_read_once=hbm["bytes"] / floor)
        if chip.hbm_bytes_per_second:
            out["seconds_per_step_hbm_bound"] = hbm["bytes"] / chip.hbm_bytes_per_second
    return out


# ----------------------------------------------------------------------------- the dry run


def generation_frames(model_cfg, data_cfg) -> int:
    """Frames per visual item the generation programs are sized for: an anyres image is 1 + ``max_crops`` frames
    (the base image and its crops), a video ``data.num_frames``."""
    frames = int(data_cfg.num_frames)
    if model_cfg.fusion != "none" and anyres.enabled(model_cfg):
        frames = max(frames, 1 + int(model_cfg.anyres.max_crops))
    return frames


def parse_programs(value) -> tuple[str, ...]:
    names = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip())
    bad = [x for x in names if x not in PROGRAMS]
    if bad or not names:
        raise ValueError(f"dry_run_programs={value!r}: expected a comma-separated subset of {', '.join(PROGRAMS)}")
    return names


def dry_run(config, mesh=None, *, topology: str | None = None, programs=None, report_path: str | None = None) -> dict:
    """Compiles ``config``'s programs (default ``config.dry_run_programs``) on ``mesh`` (default: ``config.mesh``
    over the chips of ``topology``, default ``config.dry_run_topology``, or over the devices at hand); prints
    and returns the report and writes it as JSON to ``report_path`` when given. Nothing is allocated.

    Raises :class:`lavi_jax.train.topology.TopologyError` (one-line message) for an unknown topology,
    missing libtpu or a mesh that does not divide the topology."""
    topology = config.get("dry_run_topology", "") if topology is None else topology
    programs = parse_programs(config.get("dry_run_programs", "train") if programs is None else programs)
    if mesh is None:
        mesh = topo.make_mesh(config.mesh.to_dict(), topology) if topology else sharding.make_mesh(config.mesh.to_dict())
    chip = topo.chip_of(mesh)
    m = config.model
    report = {"topology": topology or None, "devices": int(mesh.size), "mesh": dict(mesh.shape),
              "device_kind": getattr(mesh.devices.flat[0], "device_kind", ""),
              "dtype": m.dtype, "param_dtype": m.param_dtype, "attention": m.get("attention", "auto"),
              "scan_layers": bool(m.scan_layers), "remat_policy": m.remat_policy, "programs": {}}
    if chip is not None:
        report["chip"] = {"name": chip.name, "platform": chip.platform, "hbm_bytes": chip.hbm_bytes,
                          "spec_hbm_bytes": chip.spec_hbm_bytes, "peak_bf16_flops": chip.peak_bf16_flops}
        if chip.platform == "gpu":
            report["chip"]["memory_fraction"] = topo.GPU_MEMORY_FRACTION
    if "train" in programs:
        report["programs"]["train"] = train_program(config, mesh, chip)
    gen = [p for p in programs if p != "train"]
    if gen:
        ev = config.evals
        report["programs"].update(generation_programs(
            config, mesh, chip, batch=int(ev.batch_size or config.train.batch_size),
            prompt_len=int(max(config.data.seq_buckets)), frames=generation_frames(m, config.data),
            new_tokens=int(ev.max_new_tokens), programs=gen))
    fits = [r["fits"] for r in report["programs"].values() if "fits" in r]
    report["fits"] = all(fits) if fits else None
    if "bytes_per_device" in report["programs"].get("train", {}):  # the train step's figures at the top level
        t = report["programs"]["train"]
        b = t["bytes_per_device"]
        report.update({f"{k}_bytes_per_device": b[k] for k in ("params", "opt_state", "temp")},
                      argument_bytes_per_device=b["arguments"], output_bytes_per_device=b["outputs"],
                      global_batch=t["global_batch"], seq_len=t["seq_len"], flops_per_step=t["flops"],
                      flops_per_step_per_device=t["flops_per_device"], compile_seconds=t["compile_seconds"])
    if jax.process_index() == 0:
        print(format_report(report))
        if report_path:
            storage.write_text(report_path, json.dumps(report, indent=1) + "\n")  # local or a URI, written whole
            print(f"  report: {report_path}")
    return report


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / 2**20:.1f} MiB" if abs(b) < 2**30 else f"{b / 2**30:.2f} GiB"
    gpu = r.get("chip", {}).get("platform") == "gpu"
    slice_ = "GPU slice" if gpu else "TPU topology"
    where = f"{slice_} {r['topology']} ({r['device_kind']})" if r["topology"] else f"{r['device_kind'] or 'devices'}"
    lines = [f"dry run: {where}, {r['devices']} devices, mesh {r['mesh']}, compute {r['dtype']}, params "
             f"{r['param_dtype']}, attention {r['attention']}"]
    if "chip" in r:
        c = r["chip"]
        usable = (f"per GPU {gib(c['hbm_bytes']).strip()} usable ({c['memory_fraction']:g} of "
                  f"{gib(c['spec_hbm_bytes']).strip()}: XLA_PYTHON_CLIENT_MEM_FRACTION)" if gpu else
                  f"per chip {gib(c['hbm_bytes']).strip()} HBM usable (of {gib(c['spec_hbm_bytes']).strip()})")
        lines[0] += f"; {usable}, {c['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16"
    compiler = "GPU" if gpu else "TPU"
    for name, p in r["programs"].items():
        what = (f"global batch {p['global_batch']} x {p['seq_len']} tokens" if name == "train" else
                f"batch {p['batch']}, prompt {p['prompt_len']}, {p['frames_per_item']} frame(s) per item"
                + (f", {p['steps']} steps" if name == "decode" else ""))
        lines.append(f"  {name}: {what} (compiled in {p['compile_seconds']} s)")
        if "compiler_error" in p:
            lines.append(f"    DOES NOT FIT {gib(p['hbm_bytes']).strip()} HBM per the {compiler} compiler: {p['compiler_error'][:300]}")
            continue
        b = p["bytes_per_device"]
        lines.append("    per device: " + ", ".join(f"{k} {gib(b[k]).strip()}" for k in MEMORY_KEYS if k in b)
                     + (f"; host memory {gib(b['host_temp']).strip()} (offloaded)" if b.get("host_temp") else ""))
        if "fits" in p:
            lines.append(f"    {'fits' if p['fits'] else 'DOES NOT FIT'}: peak {gib(b['peak']).strip()} of "
                         f"{gib(p['hbm_bytes']).strip()} HBM, headroom {gib(p['headroom_bytes']).strip()}")
        lines.append(f"    FLOPs {p['flops']:.3e} ({p['flops_per_device']:.3e} per device, every layer counted)")
        if "seconds_lower_bound" in p:
            extra = (f", {p['tokens_per_second_upper_bound']:,.0f} tokens/s at most"
                     if "tokens_per_second_upper_bound" in p else "")
            lines.append(f"    time at peak >= {p['seconds_lower_bound'] * 1e3:.3g} ms{extra}")
        if p["compiler_seconds_estimate"] is not None:
            lines.append(f"    compiler's estimate {p['compiler_seconds_estimate'] * 1e3:.3g} ms")
        if "bytes_accessed_per_step" in p:
            bound = (f", >= {p['seconds_per_step_bandwidth_bound'] * 1e3:.3g} ms at HBM bandwidth"
                     if "seconds_per_step_bandwidth_bound" in p else "")
            lines.append(f"    one step accesses {gib(p['bytes_accessed_per_step']).strip()} per device, "
                         f"{p['bytes_accessed_over_read_once']:.2f}x the read-once floor "
                         f"{gib(p['read_once_bytes_per_step']).strip()} (decoder weights, KV and visual caches){bound}")
        if "hbm_bytes_per_step" in p:
            lines.append(f"    of which HBM (on-chip copies not counted): {gib(p['hbm_bytes_per_step']).strip()}, "
                         f"{p['hbm_bytes_over_read_once']:.2f}x the floor")
    return "\n".join(lines)
