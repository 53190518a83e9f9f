"""The benchmark table, result files and BENCHMARKS.md with its plots (rebuilt from every result file of the suite)."""

from __future__ import annotations

import glob
import json
import os
import sys

SUITE = "lavi_jax benchmarks"
PAPER = {"flops_reduction_pct": 94.0, "speedup": 3.1, "memory_ratio": 0.5}
HEADER = ("Metric", "Setting", "A", "B", "Ratio", "Paper / goal")


def _tokens(n: int) -> str:
    return f"{n:,} vis. tok."


def _s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _gb(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def rows(r: dict) -> list[tuple[str, ...]]:
    """The table's rows from a result dict (sections that are absent are skipped)."""
    out = []
    if "flops" in r:
        f = r["flops"]
        for name, s in f["settings"].items():
            out.append((f"FLOPs / sample, 7B ({f['method']})", f"{name}, {_tokens(s['visual_tokens'])}",
                        f"LaVi {s['lavi']['total_flops'] / 1e12:.2f} TFLOP", f"concat {s['concat']['total_flops'] / 1e12:.2f} TFLOP",
                        f"-{s['reduction_pct']:.1f} %", f"-{PAPER['flops_reduction_pct']} %"))
        for name, s in f["settings"].items():
            if "memory_ratio" in s:
                out.append(("Peak memory, 7B f32 (XLA)", f"{name}, {_tokens(s['visual_tokens'])}",
                            f"LaVi {_gb(s['lavi']['peak_bytes'])}", f"concat {_gb(s['concat']['peak_bytes'])}",
                            f"{s['memory_ratio']:.2f}x (beyond weights {s['memory_ratio_beyond_weights']:.2f}x)",
                            f"{PAPER['memory_ratio']}x"))
    if "latency" in r:
        where = "GPU, 7B bf16" if r["machine"]["platform"] == "gpu" else "CPU, scaled"
        for name, s in r["latency"]["settings"].items():
            if "error" in s:
                out.append((f"Generation ({where})", name, "failed", "", s["error"][:60].replace("|", "/"), ""))
                continue
            lv, cc, sp = s["modulation"], s["concat"], s["speedup"]
            setting = f"{name}, {_tokens(s['visual_tokens'])}"
            out.append((f"Prefill ({where})", setting, f"LaVi {_s(lv['prefill_s'])}", f"concat {_s(cc['prefill_s'])}",
                        f"{sp['prefill_s']:.2f}x faster", ""))
            out.append((f"Decode / token ({where})", setting, f"LaVi {_s(lv['decode_per_token_s'])}",
                        f"concat {_s(cc['decode_per_token_s'])}", f"{sp['decode_per_token_s']:.2f}x faster", ""))
            out.append((f"End-to-end, 32 new tokens ({where})", setting, f"LaVi {_s(lv['e2e_s'])}", f"concat {_s(cc['e2e_s'])}",
                        f"{sp['e2e_s']:.2f}x faster", f"{PAPER['speedup']}x faster"))
            out.append((f"Peak memory ({where}, XLA)", setting, f"LaVi {_gb(lv['peak_bytes'])}", f"concat {_gb(cc['peak_bytes'])}",
                        f"{s['memory_ratio']:.2f}x", f"{PAPER['memory_ratio']}x"))
    if "hd" in r:
        out += hd_rows(r["hd"], r["machine"]["platform"])
    if "vs_torch" in r:
        v = r["vs_torch"]
        g = v["geometry"]
        where = f"Qwen2 d={g['hidden_size']} L={g['num_hidden_layers']}, f32, {v['threads']} threads"
        for name, s in v["rows"].items():
            check = (f"max logit diff {s['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in s
                     else f"{100 * s['same_tokens']:.0f} % same tokens")
            out.append((f"JAX vs PyTorch: {name}", f"{where}; {check}", f"JAX {_s(s['jax_s'])}", f"PyTorch {_s(s['torch_s'])}",
                        f"JAX/PT {s['ratio']:.2f}", "JAX/PT < 1"))
    if "tpu" in r:
        out += tpu_rows(r["tpu"])
    if "serve" in r:
        out += serve_rows(r["serve"])
    if "gpu_compile" in r:
        from benchmarks import gpu_compile  # the GPU compiler's rows, kept beside the benchmark that makes them

        out += gpu_compile.rows(r["gpu_compile"])
    if "train" in r:
        t = r["train"]
        what = (f"{t['fusion']}, {t['params'] / 1e6:.0f}M params, B={t['batch']} T={t['seq']}"
                + (f" + {t['frames']} image(s)" if t["frames"] else ""))
        ratio = f"{100 * t['fraction_of_matmul_peak']:.1f} % of matmul"
        goal = ""
        if "mfu" in t:
            ratio += f"; MFU {100 * t['mfu']:.1f} %"
            goal = f"nominal {t['nominal_peak_flops_per_s'] / 1e12:.0f} TFLOP/s"
        out.append(("Train step FLOP/s vs matmul peak", what, f"step {t['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s",
                    f"{t['matmul_dtype']} matmul {t['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s", ratio, goal))
    if "packing" in r:
        p, s = r["packing"], r["packing"]["pipeline"]
        setting = (f"LLaVA-665k-like lengths, B={p['batch']} rows of <= {max(p['buckets']):,} tokens, "
                   f"{p['max_images_per_row']} items per packed row")
        out.append(("Pad fraction, packed vs bucketed", setting, f"packed {100 * s['packed']['pad_fraction']:.1f} %",
                    f"bucketed {100 * s['bucketed']['pad_fraction']:.1f} %", "", "packed < 5 %"))
        for name, m in p["models"].items():
            where = "CPU, measured" if "step_s" in m else "FLOPs bound at TPU v5p peak"
            out.append((f"Real tokens/s, packed vs bucketed ({name}, {where})", m["config"].split(";")[0].replace("|", "/"),
                        f"packed {m['packed_real_tokens_per_s']:,.0f}", f"bucketed {m['bucketed_real_tokens_per_s']:,.0f}",
                        f"{m['speedup']:.2f}x", ">= 1.8x"))
        d = p.get("dry_run_7b", {})
        pk, bk = d.get("packed", {}), d.get("bucketed T=2048", {})
        if "peak_bytes_per_chip" in pk and "peak_bytes_per_chip" in bk:
            out.append((f"7B step per chip on {d['topology']}, packed vs bucketed (TPU compiler)", d["preset"],
                        f"packed {_gib(pk['peak_bytes_per_chip'])}", f"bucketed {_gib(bk['peak_bytes_per_chip'])}",
                        _ratio(pk["peak_bytes_per_chip"], bk["peak_bytes_per_chip"]), "fits" if pk.get("fits") else ""))
    return out


def serve_rows(v: dict) -> list[tuple[str, ...]]:
    """The OpenAI server under closed-loop clients, LaVi vs concat (benchmarks/serve.py)."""
    out, st = [], v["settings"]
    lv = {row["clients"]: row for row in v.get("modulation", {}).get("rows", [])}
    cc = {row["clients"]: row for row in v.get("concat", {}).get("rows", [])}
    where = f"{st['requests']} requests, <= {st['max_tokens']} tokens, {st['slots']} slots"
    for c in sorted(set(lv) | set(cc)):
        a, b = lv.get(c, {}), cc.get(c, {})
        get = lambda row, k, f: f.format(row[k]) if k in row else "n/a"
        out.append(("Serving output tokens/s (CPU, demo model)", f"{c} clients; {where}",
                    f"LaVi {get(a, 'tokens_per_s', '{:.1f}')} ({get(a, 'speedup_vs_one_at_a_time', '{:.2f}x')})",
                    f"concat {get(b, 'tokens_per_s', '{:.1f}')} ({get(b, 'speedup_vs_one_at_a_time', '{:.2f}x')})",
                    "", ">= 4x at 16 clients"))
        out.append(("Serving time to first token p50 / p99", f"{c} clients",
                    f"LaVi {get(a, 'ttft_p50_s', '{:.3f}')} / {get(a, 'ttft_p99_s', '{:.3f}')} s",
                    f"concat {get(b, 'ttft_p50_s', '{:.3f}')} / {get(b, 'ttft_p99_s', '{:.3f}')} s",
                    _ratio(a.get("ttft_p50_s"), b.get("ttft_p50_s")), ""))
        out.append(("Serving latency p50 / p99", f"{c} clients",
                    f"LaVi {get(a, 'latency_p50_s', '{:.3f}')} / {get(a, 'latency_p99_s', '{:.3f}')} s",
                    f"concat {get(b, 'latency_p50_s', '{:.3f}')} / {get(b, 'latency_p99_s', '{:.3f}')} s", "", ""))
    return out


def hd_rows(h: dict, platform: str) -> list[tuple[str, ...]]:
    """LaVi-HD vs concat at LLaVA-OneVision-7B's token counts (benchmarks/hd_geometry.py)."""
    out = []
    for name, s in h["settings"].items():
        setting = f"{name}: {s['tiles']} tiles; concat {s['concat_tokens']:,} vis. tok. (HF count)"
        static = (f"; -{s['reduction_pct_static']:.1f} % at the static {h['max_crops'] + 1} tiles"
                  if "reduction_pct_static" in s else "")
        out.append((f"LaVi-HD FLOPs / sample, 7B OneVision geometry ({h['method']})", setting,
                    f"LaVi-HD {s['lavi_hd']['total_flops'] / 1e12:.2f} TFLOP",
                    f"concat {s['concat']['total_flops'] / 1e12:.2f} TFLOP", f"-{s['reduction_pct']:.1f} %{static}",
                    f"-{PAPER['flops_reduction_pct']} %"))
    for name, s in h["settings"].items():
        lv, cc = s["lavi_hd"], s["concat"]
        lv_total = lv["params_bytes"] + lv["kv_cache_bytes"] + lv["visual_cache_bytes"]
        cc_total = cc["params_bytes"] + cc["kv_cache_bytes"]
        out.append(("KV + visual cache, 7B f32", f"{name}: {s['tiles']} tiles",
                    f"LaVi-HD {_gb(lv['kv_cache_bytes'] + lv['visual_cache_bytes'])}", f"concat {_gb(cc['kv_cache_bytes'])}",
                    f"{s['cache_ratio']:.2f}x; with weights {_gb(lv_total)} vs {_gb(cc_total)} = {lv_total / cc_total:.2f}x",
                    f"{PAPER['memory_ratio']}x"))
    for name, row in h.get("cache", {}).items():  # per conditioner.kv_share option (and video_pool for the video)
        for opt, r in ((k, v) for k, v in row.items() if isinstance(v, dict)):
            out.append(("Per-request cache, 7B f32 (text KV + visual K/V vs concat's KV)", f"{name}: kv_share={opt}",
                        f"LaVi-HD {_gb(r['kv_cache_bytes'] + r['visual_cache_bytes'])}",
                        f"concat {_gb(row['concat_kv_bytes'])}", f"{r['ratio']:.2f}x", "<= 0.5x"))
    where = "GPU" if platform == "gpu" else "CPU, scaled"
    for name, s in h.get("latency", {}).items():
        out.append((f"End-to-end, 32 new tokens, OneVision geometry ({where})", f"{name}: {s['tiles']} tiles",
                    f"LaVi-HD {_s(s['lavi_hd']['e2e_s'])}", f"concat {_s(s['concat']['e2e_s'])}",
                    f"{s['speedup']['e2e_s']:.2f}x faster (prefill {s['speedup']['prefill_s']:.2f}x)",
                    f"{PAPER['speedup']}x faster"))
    return out


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def _peak(r: dict):
    return (r or {}).get("bytes_per_device", {}).get("peak")


def _ratio(a, b, fmt="{:.2f}x") -> str:
    return fmt.format(a / b) if a is not None and b else ""


def _fit(r: dict) -> str:
    if not r:
        return "not measured"
    if "error" in r:
        return "failed"
    if "compiler_error" in r:
        return "does not fit (compiler)"
    return f"{_gib(_peak(r))}{'' if r.get('fits', True) else ' (does not fit)'}"


def tpu_rows(t: dict) -> list[tuple[str, ...]]:
    """Rows of the TPU-compiler section (benchmarks/tpu.py)."""
    out, tr, gen = [], t.get("train", {}), t.get("generation", {})
    for topo, stages in tr.get("runs", {}).items():
        for stage, f in stages.items():
            lv, cc = f.get("modulation", {}), f.get("concat", {})
            where = f"{topo}, {stage}, {t['train_batch']} x {t['train_seq']} + 1 image"
            hbm = next((x["hbm_bytes"] for x in (lv, cc) if "hbm_bytes" in x), None)
            out.append(("Train step peak memory / chip (TPU compiler)", where, f"LaVi {_fit(lv)}", f"concat {_fit(cc)}",
                        _ratio(_peak(lv), _peak(cc)), f"HBM {_gib(hbm)}"))
            if "flops" in lv and "flops" in cc:
                out.append(("Train FLOPs / step", where, f"LaVi {lv['flops'] / 1e15:.2f} PFLOP",
                            f"concat {cc['flops'] / 1e15:.2f} PFLOP", _ratio(lv["flops"], cc["flops"]), ""))
            if "seconds_lower_bound" in lv and "seconds_lower_bound" in cc:
                out.append(("Train step time at peak (lower bound)", where, f"LaVi {_s(lv['seconds_lower_bound'])}",
                            f"concat {_s(cc['seconds_lower_bound'])}", _ratio(lv["seconds_lower_bound"], cc["seconds_lower_bound"]), ""))
    for topo, meshes in tr.get("batch_search", {}).items():
        for mesh, f in meshes.items():
            lv, cc = f.get("modulation", {}), f.get("concat", {})
            got = lambda x: "n/a" if "largest" not in x else (str(x["largest"]) if x["largest"] else "< 256")
            tried = lambda x: ", ".join(f"{b}{'' if v.get('fits') else ' no'}" for b, v in x.get("tried", {}).items())
            out.append(("Largest global batch, stage 2 (TPU compiler)", f"{topo}, mesh {mesh}; tried LaVi: {tried(lv)}"
                        + (f"; concat: {tried(cc)}" if cc else ""), f"LaVi {got(lv)}", f"concat {got(cc)}", "", ">= 256"))
    for topo, f in tr.get("xla_attention", {}).items():
        for fusion, x in f.items():
            splash = tr.get("runs", {}).get(topo, {}).get("stage 2", {}).get(fusion, {})
            temp = lambda r: (r or {}).get("bytes_per_device", {}).get("temp")
            out.append(("Train step temp / chip: splash vs xla", f"{topo}, stage 2, {LABEL_FUSION[fusion]}",
                        f"splash {_gib(temp(splash))}", f"xla {_gib(temp(x))}", _ratio(temp(splash), temp(x)),
                        "splash lower"))
    for topo, batches in gen.get("runs", {}).items():
        for batch, tiles in batches.items():
            for tile, f in tiles.items():
                lv, cc = f.get("modulation", {}), f.get("concat", {})
                where = f"{topo}, {batch}, {tile} (729 tok. each), {t['prompt']}-token prompt"
                tot = lambda x: x["prefill"]["flops"] + x["decode"]["flops"] if "flops" in x.get("prefill", {}) and "flops" in x.get("decode", {}) else None
                if tot(lv) and tot(cc):
                    out.append((f"Prefill + {t['decode_steps']} decode FLOPs (TPU compiler)", where, f"LaVi {tot(lv) / 1e12:.2f} TFLOP",
                                f"concat {tot(cc) / 1e12:.2f} TFLOP", _ratio(tot(lv), tot(cc)), "0.06x (paper: -94 %)"))
                pk = lambda x: max([p for p in (_peak(x.get("prefill")), _peak(x.get("decode"))) if p is not None], default=None)
                out.append(("Generation peak memory / chip", where, f"LaVi {_gib(pk(lv))}", f"concat {_gib(pk(cc))}",
                            _ratio(pk(lv), pk(cc)), f"{PAPER['memory_ratio']}x"))
                est = lambda x: (x.get("prefill", {}).get("compiler_seconds_estimate"), x.get("decode", {}).get("compiler_seconds_estimate"))
                if all(v is not None for v in est(lv) + est(cc)):
                    e = lambda x: sum(est(x))
                    out.append(("Generation time, compiler's estimate", where, f"LaVi {_s(e(lv))}", f"concat {_s(e(cc))}",
                                _ratio(e(cc), e(lv), "{:.2f}x faster"), f"{PAPER['speedup']}x faster"))
                lb = lambda x: (x.get("prefill", {}).get("seconds_lower_bound", 0) + x.get("decode", {}).get("seconds_lower_bound", 0)) or None
                if lb(lv) and lb(cc):
                    out.append(("Generation time at peak (FLOP bound)", where, f"LaVi {_s(lb(lv))}", f"concat {_s(lb(cc))}",
                                _ratio(lb(cc), lb(lv), "{:.2f}x faster"), f"{PAPER['speedup']}x faster"))
    return out


LABEL_FUSION = {"modulation": "LaVi", "concat": "concat"}


def table(rs: list) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rs]
    return "\n".join(lines)


def write_json(r: dict, directory: str) -> str:
    path = os.path.join(directory, f"{r['name']}.json")
    with open(path, "w") as f:
        json.dump(r, f, indent=1, default=float)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------- result files


def plot(r: dict, directory: str) -> str | None:
    """Writes ``<directory>/<name>.png`` (:mod:`benchmarks.plots`); -> its path, None when nothing is plotted."""
    from benchmarks import plots  # imports this module

    return plots.plot(r, directory)


def results(directory: str) -> list[dict]:
    """Every result file of the suite in ``directory``."""
    out = []
    for p in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(p) as f:
            try:
                r = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(r, dict) and r.get("suite") == SUITE:
            out.append(r)
    return out



# ----------------------------------------------------------------------------- BENCHMARKS.md

INTRO = """# Benchmarks

LaVi's efficiency claims (against LLaVA-OV-7B: -94.0 % FLOPs, 3.1x faster inference, half the memory) checked
with this code, and lavi_jax measured against Hugging Face PyTorch. Produced by

    python benchmarks/run.py [--quick] [--gpu]

which prints the table, writes `benchmarks/results/<name>.json` (every number, with the raw timing samples),
and rebuilds this file and the plots `benchmarks/results/<name>.png` from every result file
(`python -m benchmarks.report` rebuilds both without running anything). Do not edit it by hand.

## How it is measured

- **FLOPs per sample** (7B geometry: `configs/lavi_qwen2_7b_siglip.py` vs `configs/llava_ov_7b_concat.py`, vision
  tower included): XLA's cost analysis of the programs `Generator` runs, lowered on `ShapeDtypeStruct` params
  and inputs, so no weight is allocated. A sample is one visual item of F frames (tiles or video frames, 729
  tokens each) behind one `<image>` placeholder in a 64-token prompt, plus 32 new tokens: the prefill (it
  yields the first new token) plus 31 cached decode steps, each costed once at the final cache length (the
  decode step attends over the whole fixed-length cache, so every step costs the same). `--quick` reads the
  lowered programs, the full run the compiled ones (same FLOPs to within 0.01 %) and adds XLA's memory analysis.
- **Latency and memory**: both fusions built from the same two configs, shrunk in width and depth but keeping
  384 px / patch 14 (729 tokens per tile), random weights, greedy `Generator` without stop tokens. Prefill,
  decode (31 steps in one compiled loop), end-to-end = both; medians of interleaved repetitions after a
  warm-up. Peak memory is XLA's memory analysis of the compiled prefill and decode programs
  (arguments + outputs + temporaries - donated buffers; the larger of the two).
- **JAX vs PyTorch**: a random `Qwen2ForCausalLM` saved with `save_pretrained` and imported with
  `conversions.import_hf`, float32, both pinned to the same cores and thread count (`--threads`),
  PyTorch under `inference_mode` with `OMP_WAIT_POLICY=PASSIVE`; outputs compared so speed never hides a
  wrong answer. Ratio = JAX time / PyTorch time (below 1: JAX faster).
- **Training efficiency**: FLOPs of the compiled `lavi_jax.train.make_train_step` (forward, backward, AdamW) over
  its median step time, against a large square `jnp.dot` timed interleaved with it (on GPU also the
  vendor's dense bf16 peak: MFU).
- **Packing** (`benchmarks/packing.py`): synthetic conversations with LLaVA-665k-like lengths (assumed log-normal,
  median 150 text tokens; 6 % text-only as in the mix), bucketed (512 / 1,024 / 2,048) vs packed into 2,048-token rows,
  the same B rows per step; the jitted train step (stage 2) timed per batch shape and weighted by the shapes' shares;
  at 7B the FLOPs of the lowered step at the chip's peak.
- **OneVision geometry** (`benchmarks/hd_geometry.py`, `--sections hd`): a 1024x768 photo, a 2048x512
  panorama and a 32-frame video under LLaVA-OneVision-7B's pinpoints (`anyres_max_9`, 384-px tiles). Concat's
  visual tokens are HF's own count (`LlavaOnevisionProcessor`); its FLOPs are the tower and projector on the
  image's tiles plus the 7B LLM over the prompt with that many tokens. LaVi-HD runs the 7B LaVi config with
  anyres on at the image's own tile count and at the static 37 tiles a padded batch carries. Memory: exact KV
  and visual-cache sizes; latency: the scaled CPU geometry with the same token counts.
- The machine may be shared: every side-by-side pair runs interleaved in one process, and the load average
  is stored with each number.

## Reading the numbers

- The 7B FLOPs rows are the geometry-faithful comparison. The CPU latency rows keep the token counts but not
  the balance of work: at width 256 the quadratic attention weighs far more against the matmuls than at
  width 3,584, so the CPU speed-ups at many tiles overstate what a 7B model gains, and at batch 1 a decode
  step is bound by reading weights and caches, not by FLOPs.
- XLA's memory analysis on CPU includes the attention score matrices that XLA's unfused CPU attention
  materialises (the bulk of concat's 7B figure at long sequences); a fused attention kernel, as on GPU,
  would shrink concat's numbers there.
- JAX vs PyTorch forward: both sides spend most of the time in f32 matmuls of the same shapes. What differs
  is attention: XLA's CPU attention computes and stores the full masked T x T scores in f32, while PyTorch's
  SDPA runs a fused causal kernel that skips the masked half. This is what keeps the forward rows near
  parity instead of below 1.
"""


def findings(r: dict) -> list[str]:
    out = []
    if "tpu" in r:
        t = r["tpu"]
        out.append("Programs compiled by libtpu for the abstract chips of each topology on a CPU host (no TPU): memory is "
                   "XLA's analysis per chip (arguments + outputs + temp - donated) against the chip's HBM; FLOPs count "
                   "every layer (the programs lowered unrolled, with XLA attention, which counts the full score matrix); "
                   "time bounds are those FLOPs at the chip's nominal bf16 peak (v5e 197, v5p 459 TFLOP/s). Mesh "
                   f"{t['mesh']}; training preset mixed (bf16 compute, f32 params and AdamW state), scanned layers, "
                   "full remat; generation preset bf16.")
        out.append("HBM is what the TPU compiler lets a program use per chip (its own figure, below the spec sheet's: "
                   "v5e 15.75 of 16 GiB); its refusals are the 'does not fit (compiler)' entries.")
        for part in ("train", "generation"):
            p = t.get(part, {})
            if "finished" not in p:
                out.append(f"The {part} part did not finish (started {p.get('started', '?')}): the rows above are what it "
                           "had measured; the settings it did not reach are missing.")
    if "flops" in r:
        s = sorted(r["flops"]["settings"].values(), key=lambda x: x["visual_tokens"])
        out.append("FLOPs reduction: " + ", ".join(f"{x['reduction_pct']:.1f} % at {x['visual_tokens']:,}" for x in s)
                   + f" visual tokens (paper: {PAPER['flops_reduction_pct']} %).")
        if len(s) > 1:
            marginal = {k: [(b[k]["total_flops"] - a[k]["total_flops"]) / (b["visual_tokens"] - a["visual_tokens"]) / 1e9
                            for a, b in zip(s, s[1:])] for k in ("lavi", "concat")}
            out.append("Marginal cost of one more visual token between consecutive points: LaVi "
                       + ", ".join(f"{x:.2f}" for x in marginal["lavi"]) + " GFLOP (flat: vision tower and conditioner "
                       "keys/values grow linearly), concat " + ", ".join(f"{x:.1f}" for x in marginal["concat"])
                       + " GFLOP (rising: every visual token runs through the LLM, whose attention is quadratic).")
        if any("reduction_pct_if_text_logits_only" in x for x in s):  # results from before logits_at
            adj = ", ".join(f"{x['reduction_pct_if_text_logits_only']:.1f} %" for x in s)
            out.append("The concat prefill computes LM-head logits at the visual positions too and keeps only the text "
                       f"positions'; without that work the reductions would be {adj}.")
        mem = [x for x in s if "memory_ratio" in x]
        if mem:
            out.append("7B peak memory (f32, XLA) LaVi/concat: " + ", ".join(
                f"{x['memory_ratio']:.2f}x ({x['memory_ratio_beyond_weights']:.2f}x beyond weights) at {x['visual_tokens']:,}"
                for x in mem) + " visual tokens; the weights dominate at batch 1.")
    if "latency" in r:
        ok = [(n, x) for n, x in r["latency"]["settings"].items() if "error" not in x]
        if ok:
            out.append("Generation LaVi vs concat: " + "; ".join(
                f"{n}: {x['speedup']['e2e_s']:.2f}x faster end-to-end (prefill {x['speedup']['prefill_s']:.2f}x, "
                f"decode/token {x['speedup']['decode_per_token_s']:.2f}x), memory {x['memory_ratio']:.2f}x" for n, x in ok)
                + f" (paper: {PAPER['speedup']}x, {PAPER['memory_ratio']}x).")
    if "hd" in r:
        h = r["hd"]["settings"]
        out.append("LaVi-HD at LLaVA-OneVision-7B's geometry (anyres_max_9, 384-px tiles): " + "; ".join(
            f"{n}: {x['tiles']} tiles, concat {x['concat_tokens']:,} tokens, FLOPs -{x['reduction_pct']:.1f} %"
            + (f" (-{x['reduction_pct_static']:.1f} % when padded to {r['hd']['max_crops'] + 1} tiles)"
               if "reduction_pct_static" in x else "") for n, x in h.items())
            + f" (paper: -{PAPER['flops_reduction_pct']} %). Concat counts the tower on the same tiles plus the LLM "
            "over HF's token count; LaVi-HD runs the tower on every tile and its conditioners attend to all of them.")
    if "vs_torch" in r:
        v = r["vs_torch"]["rows"]
        slower = [n for n, x in v.items() if x["ratio"] >= 1]
        out.append("JAX/PyTorch time: " + ", ".join(f"{n} {x['ratio']:.2f}" for n, x in v.items())
                   + (f"; JAX is slower on: {', '.join(slower)}." if slower else "; JAX is faster on every row."))
    if "train" in r:
        t = r["train"]
        out.append(f"Train step: {t['flops_per_step'] / 1e9:.1f} GFLOP in {_s(t['step_s'])} = "
                   f"{100 * t['fraction_of_matmul_peak']:.1f} % of the measured {t['matmul_dtype']} matmul rate"
                   + (f", MFU {100 * t['mfu']:.1f} %." if "mfu" in t else "."))
    if "packing" in r:
        cpu = {n: m for n, m in r["packing"]["models"].items() if "step_s" in m}
        if cpu:
            out.append("Packing on CPU: " + "; ".join(
                f"{n} {m['speedup']:.2f}x measured vs {m['flops_speedup']:.2f}x fewer FLOPs per real token" for n, m in cpu.items())
                + ". The gap is the packed row's item slots (10 against a bucketed row's one): every conditioner "
                "attends over all slots' visual tokens, masked to the token's own segment, and on the CPU that "
                "softmax-heavy work runs far below matmul speed; segment ids and restarting positions cost nothing "
                "measurable. At 7B the conditioners are a few percent of the step, so the FLOPs ratio is the better "
                "guide there.")
    return out


def write_markdown(directory: str, path: str) -> str:
    from benchmarks import plots

    plots.write_plots(directory)
    found = results(directory)
    found.sort(key=lambda r: (r["machine"]["platform"] != "gpu", r["date"]), reverse=True)
    parts = [INTRO]
    for r in found:
        m = r["machine"]
        where = (f"{m['device']}" if m["platform"] == "gpu" else
                 f"{m['cpu']}, {r.get('threads')} of {m['cores']} cores, {m['memory_gib']} GiB")
        versions = ", ".join(f"{k} {m[k]}" for k in ("jax", "flax", "torch", "transformers") if k in m)
        title = (f"TPU compiler (AOT, no TPU needed): `{r['name']}`" if "tpu" in r else
                 f"GPU compiler (AOT, no GPU needed): `{r['name']}`" if "gpu_compile" in r else f"`{r['name']}`")
        parts.append(f"## {title}\n\n- Date: {r['date']}\n- Machine: {where}; {versions}\n"
                     f"- Command: `{r['command']}` ({r['elapsed_s'] / 60:.1f} min; load average "
                     f"{r['load_average'][0]} at start, {r['load_average'][1]} at end)\n")
        if r.get("note"):
            parts[-1] += f"- Note: {r['note']}\n"
        if "tpu" in r:  # parts resumed with --resume keep their earlier measurements: say when each ran
            spans = [f"{p} {r['tpu'][p]['started']} to {r['tpu'][p].get('finished', 'not finished')}"
                     for p in ("train", "generation") if "started" in r["tpu"].get(p, {})]
            parts[-1] += f"- Parts (a --resume run keeps the measurements it finds): {'; '.join(spans)}\n"
        parts.append(table(rows(r)) + "\n")
        parts.append("\n".join(f"- {x}" for x in findings(r)) + "\n")
        if os.path.exists(os.path.join(directory, f"{r['name']}.png")):
            parts.append(f"![{r['name']}](benchmarks/results/{r['name']}.png)\n")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def main(argv=None) -> int:
    """``python -m benchmarks.report [--plots-only]``: rebuilds the plots (and BENCHMARKS.md) from the result files."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--plots-only", action="store_true", help="rebuild the plots only, not BENCHMARKS.md")
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    directory = os.path.join(root, "benchmarks", "results")
    from benchmarks import plots

    for path in plots.write_plots(directory) if args.plots_only else []:
        print(f"wrote {os.path.relpath(path, root)}")
    if not args.plots_only:
        print(f"rebuilt {os.path.relpath(write_markdown(directory, os.path.join(root, 'BENCHMARKS.md')), root)} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
