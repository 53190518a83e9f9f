"""FLOPs per sample at 7B geometry from XLA's cost analysis, on abstract shapes (no weights allocated).

A sample is one visual item (F frames of 729 tokens) in a 64-token prompt,
answered with 32 new tokens, run exactly as :class:`lavi_jax.generate.Generator`
runs it:

* prefill: ``Generator.prefill`` lowered on ``ShapeDtypeStruct`` params and
  inputs; its output is the first new token's logits (the LM head runs at the
  last prompt position only). It includes the vision tower and projector, and
  the KV cache of ``prefix + 31`` slots.
* decode: one cached decode step (the ``model.apply`` of Generator's decode loop,
  LaVi reading its conditioners' visual K/V from ``visual_cache``) lowered at
  the same cache length, times 31. Every step attends over the whole
  fixed-length cache (unwritten slots masked), so each of the 31 steps costs
  the same.

The programs are compiled (FLOPs of the optimised HLO, plus XLA's memory
analysis) or, faster, only lowered (FLOPs of the unoptimised HLO). XLA counts a
multiply-add as 2 FLOPs and also counts elementwise work.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks import common
from lavi_jax import sharding
from lavi_jax.generate import Generator
from lavi_jax.models.lavi import LaVi


def decode_step_fn(model, reuse_visual: bool):
    """One cached decode step as Generator's loop runs it (greedy token in, logits and cache out)."""

    def step(params, visual_cache, cache, tok, mask, position, index):
        variables = {"params": params}
        if reuse_visual:
            variables["visual_cache"] = visual_cache
        out = model.apply(variables, tok, attention_mask=mask, position_ids=position, cache=cache, cache_index=index,
                          use_visual_cache=reuse_visual, method=LaVi.forward)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    return step


def measure_fusion(fusion: str, frames_list, compiled: bool = True, log=print) -> dict[str, dict]:
    """Per setting: prefill / decode-step FLOPs and totals for ``fusion`` at 7B geometry.

    ``compiled=True`` reads the compiled programs (and adds XLA's memory analysis);
    ``compiled=False`` reads the lowered, unoptimised programs, several times faster
    (the FLOPs agree with the compiled ones to within 0.01 %).
    """
    m = common.model_config(fusion)
    model = LaVi(m)
    params, _ = sharding.abstract_params(model, jnp.zeros((1, 8), jnp.int32))
    gen = Generator(model, max_new_tokens=common.NEW_TOKENS)
    steps = common.NEW_TOKENS - 1
    out = {}
    for frames in frames_list:
        t0 = time.time()
        ids, mask, pix, item_mask = common.abstract_inputs(m, frames)
        prefill = jax.jit(gen.prefill).lower(params, ids, mask, pix, item_mask)
        state = jax.eval_shape(gen.prefill, params, ids, mask, pix, item_mask)
        B, S = state["mask"].shape
        reuse = bool(state["visual_cache"])
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
        step = jax.jit(decode_step_fn(model, reuse), donate_argnums=(2,)).lower(
            params, state["visual_cache"], state["cache"], tok, state["mask"], tok, scalar)
        if compiled:
            prefill, step = prefill.compile(), step.compile()
        f_pre, f_step = common.flops_of(prefill), common.flops_of(step)
        prefix = S - steps
        out[frames] = {
            "visual_tokens": frames * common.TILE_TOKENS,
            "llm_sequence": prefix,
            "prefill_flops": f_pre,
            "decode_step_flops": f_step,
            "decode_steps": steps,
            "total_flops": f_pre + steps * f_step,
            "params_bytes": common.tree_bytes(params),
            "kv_cache_bytes": common.tree_bytes(state["cache"]),
            "seconds": round(time.time() - t0, 1),
        }
        if compiled:  # the larger of the two: a decode step's program leaves out weights it never reads (vision)
            out[frames]["prefill_peak_bytes"] = common.peak_bytes(prefill)
            out[frames]["decode_step_peak_bytes"] = common.peak_bytes(step)
            out[frames]["peak_bytes"] = max(out[frames]["prefill_peak_bytes"], out[frames]["decode_step_peak_bytes"])
        log(f"  flops {common.LABEL[fusion]:>7} {frames:>2} frame(s): {out[frames]['total_flops'] / 1e12:8.2f} TFLOP "
            f"(prefill {f_pre / 1e12:.2f}, step {f_step / 1e9:.1f} G) in {out[frames]['seconds']} s")
    return out


def run(settings: dict[str, int], compiled: bool = True, log=print) -> dict:
    frames_list = sorted(set(settings.values()))
    per = {f: measure_fusion(f, frames_list, compiled, log) for f in ("modulation", "concat")}
    rows = {}
    for name, frames in settings.items():
        lavi, concat = per["modulation"][frames], per["concat"][frames]
        rows[name] = {
            "frames": frames,
            "visual_tokens": lavi["visual_tokens"],
            "lavi": lavi,
            "concat": concat,
            "reduction_pct": 100.0 * (1.0 - lavi["total_flops"] / concat["total_flops"]),
        }
        if compiled:
            rows[name]["memory_ratio"] = lavi["peak_bytes"] / concat["peak_bytes"]
            rows[name]["memory_ratio_beyond_weights"] = ((lavi["peak_bytes"] - lavi["params_bytes"])
                                                         / (concat["peak_bytes"] - concat["params_bytes"]))
    return {"config": {f: common.describe(common.model_config(f)) for f in ("modulation", "concat")},
            "method": "compiled" if compiled else "lowered", "prompt_tokens": common.PROMPT_LEN,
            "new_tokens": common.NEW_TOKENS, "settings": rows}
