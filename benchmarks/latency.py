"""Generation latency and peak memory, LaVi vs concat, at one geometry and several visual-token counts.

Both models are random (same init seed), built from the two 7B configs
(optionally shrunk, see :mod:`benchmarks.common`), and run through
:class:`lavi_jax.generate.Generator` with a 64-token prompt holding one visual
item and 32 new tokens (greedy, no stop token, so both always decode 31 steps).

* prefill: ``Generator.prefill`` (vision tower, projector, prompt, KV cache);
* decode: ``Generator.decode`` (31 cached steps in one compiled while loop);
* per-token decode = decode / 31; end-to-end = prefill + decode of the same run;
* peak memory: XLA's memory analysis of the two compiled programs, each
  ``arguments + outputs + temporaries - donated``; the generation's peak is the
  larger of the two (weights, pixels, KV cache and activations all included).

Timings are medians of interleaved repetitions after a warm-up (see
:func:`benchmarks.common.interleaved`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks import common
from lavi_jax import sharding
from lavi_jax.generate import Generator
from lavi_jax.models.lavi import LaVi


def _memory(gen: Generator, params, ids, mask, pix, item_mask) -> dict[str, int]:
    """XLA's peak bytes of the prefill and decode programs, lowered exactly as Generator calls them.

    Uses Generator's jitted ``_prefill`` / ``_decode`` so the decode program's cache donation is counted.
    """
    prefill = gen._prefill.lower(params, ids, mask, pix, item_mask).compile()
    state = gen.prefill(params, ids, mask, pix, item_mask)
    rest = {k: v for k, v in state.items() if k != "cache"}
    decode = gen._decode.lower(params, state["cache"], rest, jax.random.key(0), jnp.float32(1.0),
                               jnp.float32(1.0), greedy=True, top_k=0, nucleus=False).compile()
    p, d = common.peak_bytes(prefill), common.peak_bytes(decode)
    return {"prefill_peak_bytes": p, "decode_peak_bytes": d, "peak_bytes": max(p, d),
            "kv_cache_bytes": common.tree_bytes(state["cache"])}


def run(configs: dict, settings: dict[str, int], reps: int, warmup: int = 1, log=print) -> dict:
    """``configs``: fusion -> model config. Returns per-setting medians, ratios and memory."""
    models, params, gens = {}, {}, {}
    for fusion, m in configs.items():
        models[fusion] = LaVi(m)
        ids = jnp.asarray(common.prompt_ids(m, length=8))
        params[fusion] = sharding.init_params(models[fusion], jax.random.key(0), ids)
        gens[fusion] = Generator(models[fusion], max_new_tokens=common.NEW_TOKENS)
    steps = common.NEW_TOKENS - 1
    out = {}
    for name, frames in settings.items():
        inputs, mem = {}, {}
        try:
            for fusion, m in configs.items():
                ids = jnp.asarray(common.prompt_ids(m))
                pix, item_mask = common.pixels(m, frames, dtype=jnp.dtype(m.dtype))
                inputs[fusion] = (ids, jnp.ones_like(ids), pix, item_mask)
                mem[fusion] = _memory(gens[fusion], params[fusion], *inputs[fusion])

            def candidate(fusion):
                gen, p, args = gens[fusion], params[fusion], inputs[fusion]

                def once():
                    t0 = time.perf_counter()
                    state = jax.block_until_ready(gen.prefill(p, *args))
                    t1 = time.perf_counter()
                    jax.block_until_ready(gen.decode(p, state))
                    t2 = time.perf_counter()
                    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "e2e_s": t2 - t0}

                return once

            load = common.load_average()
            times = common.interleaved({f: candidate(f) for f in configs}, reps=reps, warmup=warmup)
        except Exception as e:  # e.g. out of memory at a large setting: record it, keep the rest
            error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            log(f"  latency {name}: failed: {error}")
            out[name] = {"frames": frames, "error": error}
            continue
        row = {"frames": frames, "visual_tokens": frames * common.TILE_TOKENS, "load_average": load}
        for fusion in configs:
            t = times[fusion]
            row[fusion] = dict(t, decode_per_token_s=t["decode_s"] / steps, params_bytes=common.tree_bytes(params[fusion]),
                               **mem[fusion])
        lv, cc = row["modulation"], row["concat"]
        row["speedup"] = {k: cc[k] / lv[k] for k in ("prefill_s", "decode_per_token_s", "e2e_s")}
        row["memory_ratio"] = lv["peak_bytes"] / cc["peak_bytes"]
        out[name] = row
        log(f"  latency {name:>15}: e2e LaVi {lv['e2e_s']:.3f} s, concat {cc['e2e_s']:.3f} s "
            f"-> {row['speedup']['e2e_s']:.2f}x; memory {row['memory_ratio']:.2f}x")
    return {"config": {f: common.describe(m) for f, m in configs.items()}, "reps": reps, "warmup": warmup,
            "settings": out}
