"""LaVi-HD vs concat at the token counts LLaVA-OneVision-7B uses for real inputs.

Inputs: a 1024x768 photo, a 2048x512 (4:1) panorama and a 32-frame video,
under OneVision's geometry (SigLIP 384 px / patch 14 = 729 tokens per tile,
``image_grid_pinpoints`` of ``llava-onevision-qwen2-7b-ov-hf``, ``anyres_max_9``).

* Tiles: the whole image plus its crops (HF ``select_best_resolution``); a
  video is 32 frames.
* Concat visual tokens: Hugging Face's own count,
  ``LlavaOnevisionProcessor._get_num_multimodal_tokens`` (unpadded crop
  features, one newline per row, ``anyres_max_9`` downsampling; videos pooled
  2x2 plus one newline), run on the processor's attributes.
* FLOPs per sample (64-token prompt, 32 new tokens, XLA cost analysis of
  lowered or compiled programs on abstract shapes, as :mod:`benchmarks.flops`):
  LaVi-HD is the 7B LaVi config with anyres on (``tile_embedding="grid"``) run
  through ``Generator`` at the input's own tile count, and at the static
  ``1 + max_crops`` = 37 frames a padded batch carries. Concat is the vision
  tower + projector on the same tiles plus the 7B LLM over the prompt with
  HF's visual-token count spliced in (prefill and 31 decode steps); the
  splice, unpadding and interpolation are data movement and left out.
* Memory: weights, the LLM's KV cache and LaVi's visual cache (the
  conditioners' visual keys/values), exact sizes from the abstract state;
  compiled runs add XLA's peak of the generation programs (``peak_bytes``).
* Per-request cache (:func:`measure_cache`): LaVi-HD's text KV cache plus its
  visual cache for each ``conditioner.kv_share`` option (``KV_SHARE``), and for the
  video also with ``projector.video_pool=2`` (frames pooled to 14x14 as OneVision
  pools its video tokens), against concat's KV cache, exact sizes of the prefill
  state's abstract shapes (``python -m benchmarks.hd_geometry`` prints them and writes
  ``results/hd_cache.json``).
* Latency (``--sections`` ``hd``, CPU): the same token counts at the scaled-down
  geometry of :mod:`benchmarks.latency`, medians of interleaved runs.
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from lavi_jax import config as C
from lavi_jax import sharding
from lavi_jax.data.anyres import grid_shape
from lavi_jax.generate import Generator
from lavi_jax.models.lavi import LaVi

INPUTS = {  # name -> ("image", (height, width)) | ("video", frames)
    "1024x768 photo": ("image", (768, 1024)),
    "2048x512 panorama (4:1)": ("image", (512, 2048)),
    "32-frame video": ("video", 32),
}
ASPECT = "anyres_max_9"
KV_SHARE = ("none", "4", "all")  # conditioner.kv_share options measured by measure_cache


def hf_visual_tokens(kind: str, value, pinpoints, tile: int = 384, tile_tokens: int = common.TILE_TOKENS) -> int:
    """LLaVA-OneVision's placeholder count for one image (h, w) or video (frames), by HF's own code."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    cls = LlavaOnevisionProcessor
    proc = types.SimpleNamespace(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                        image_grid_pinpoints=[list(p) for p in pinpoints]),
        num_image_tokens=tile_tokens, vision_aspect_ratio=ASPECT, vision_feature_select_strategy="full",
        _merge_kwargs=lambda **kw: {"images_kwargs": {}})
    proc._get_number_of_features = types.MethodType(cls._get_number_of_features, proc)
    proc._get_unpadded_features = types.MethodType(cls._get_unpadded_features, proc)
    if kind == "video":
        return int(cls._get_num_multimodal_tokens(proc, video_sizes=[(value, tile, tile)])["num_video_tokens"][0])
    return int(cls._get_num_multimodal_tokens(proc, image_sizes=[value])["num_image_tokens"][0])


def geometry(pinpoints, tile: int = 384) -> dict[str, dict]:
    """Per input: tiles (frames of the LaVi-HD item), crop grid, HF concat tokens, LaVi visual tokens."""
    out = {}
    for name, (kind, value) in INPUTS.items():
        if kind == "video":
            tiles, grid, size = value, None, (0, 0)
        else:
            grid = grid_shape(value, pinpoints, tile)
            tiles, size = 1 + grid[0] * grid[1], value
        out[name] = {"kind": kind, "tiles": tiles, "grid": grid, "image_size": size,
                     "concat_tokens": hf_visual_tokens(kind, value, pinpoints, tile),
                     "lavi_visual_tokens": tiles * common.TILE_TOKENS}
    return out


def hd_config(scaled: bool = False, dtype: str | None = None, kv_share: str = "none", video_pool: int = 1) -> C.ConfigDict:
    """The 7B LaVi config with OneVision's anyres geometry (LaVi-HD); ``video_pool`` > 1: the same model for
    videos with their frames pooled (anyres off: a video uses no tiles, and pooling reads several frames as one video)."""
    m = common.model_config("modulation", scaled=scaled, dtype=dtype)
    m.conditioner.kv_share = kv_share
    m.anyres.update(enabled=video_pool == 1, pinpoints=C.ONEVISION_PINPOINTS, max_crops=36, aspect=ASPECT,
                    tile_embedding="grid")
    m.projector.video_pool = video_pool
    return m


def _llm_config(scaled: bool = False, dtype: str | None = None) -> C.ConfigDict:
    m = common.model_config("concat", scaled=scaled, dtype=dtype)
    m.fusion = "none"
    return m


def _decode_step(model, reuse: bool):
    def step(params, visual_cache, cache, tok, mask, position, index):
        variables = {"params": params, "visual_cache": visual_cache} if reuse else {"params": params}
        out = model.apply(variables, tok, attention_mask=mask, position_ids=position, cache=cache, cache_index=index,
                          use_visual_cache=reuse, method=LaVi.forward)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    return step


def _generation_cost(model, params, args, compiled: bool) -> dict:
    """Prefill + 31 decode steps of ``Generator`` on abstract ``args``: FLOPs and cache bytes."""
    gen = Generator(model, max_new_tokens=common.NEW_TOKENS, buckets=None)  # the exact prompt length
    steps = common.NEW_TOKENS - 1
    prefill = jax.jit(gen.prefill).lower(params, *args)
    state = jax.eval_shape(gen.prefill, params, *args)
    B = state["mask"].shape[0]
    reuse = bool(state["visual_cache"])
    scalar, tok = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((B, 1), jnp.int32)
    step = jax.jit(_decode_step(model, reuse), donate_argnums=(2,)).lower(
        params, state["visual_cache"], state["cache"], tok, state["mask"], tok, scalar)
    if compiled:
        prefill, step = prefill.compile(), step.compile()
    f_pre, f_step = common.flops_of(prefill), common.flops_of(step)
    out = {"prefill_flops": f_pre, "decode_step_flops": f_step, "total_flops": f_pre + steps * f_step,
           "llm_sequence": state["mask"].shape[1] - steps, "kv_cache_bytes": common.tree_bytes(state["cache"]),
           "visual_cache_bytes": common.tree_bytes(state["visual_cache"])}
    if compiled:  # XLA's peak of the two programs (weights, caches and activations)
        out["peak_bytes"] = max(common.peak_bytes(prefill), common.peak_bytes(step))
    return out


def _abstract_pixels(m, frames: int, size):
    s = m.vision.image_size
    return (jax.ShapeDtypeStruct((1, 1, frames, s, s, 3), jnp.float32), jax.ShapeDtypeStruct((1, 1, frames), jnp.bool_),
            jax.ShapeDtypeStruct((1, 1, 2), jnp.int32))


def _encode_flops(model, params, frames: int, compiled: bool) -> float:
    s = model.config.vision.image_size
    pix = jax.ShapeDtypeStruct((1, 1, frames, s, s, 3), jnp.float32)
    lowered = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LaVi.encode)).lower(params, pix)
    return common.flops_of(lowered.compile() if compiled else lowered)


def measure_flops(geo: dict, compiled: bool = False, log=print) -> dict:
    """FLOPs and memory per input at 7B geometry (see the module docstring)."""
    lavi_m, concat_m, llm_m = hd_config(), common.model_config("concat"), _llm_config()
    lavi, concat, llm = LaVi(lavi_m), LaVi(concat_m), LaVi(llm_m)
    probe = jnp.zeros((1, 8), jnp.int32)
    lavi_p, _ = sharding.abstract_params(lavi, probe)
    concat_p, _ = sharding.abstract_params(concat, probe)
    llm_p, _ = sharding.abstract_params(llm, probe)
    ids = jax.ShapeDtypeStruct((1, common.PROMPT_LEN), jnp.int32)
    out = {}
    for name, g in geo.items():
        t0 = time.time()
        row = {**g}
        for label, frames in (("lavi_hd", g["tiles"]), ("lavi_hd_static", 1 + int(lavi_m.anyres.max_crops))):
            if label == "lavi_hd_static" and g["kind"] == "video":
                continue  # a video item is its frames; the static crop maximum applies to images
            pix, mask, sizes = _abstract_pixels(lavi_m, frames, g["image_size"])
            args = (ids, ids, pix, mask, sizes)  # a video's image_sizes are (0, 0)
            row[label] = _generation_cost(lavi, lavi_p, args, compiled)
            row[label]["params_bytes"] = common.tree_bytes(lavi_p)
        text_len = common.PROMPT_LEN - 1 + g["concat_tokens"]
        text = jax.ShapeDtypeStruct((1, text_len), jnp.int32)
        llm_cost = _generation_cost(llm, llm_p, (text, text), compiled)
        enc = _encode_flops(concat, concat_p, g["tiles"], compiled)
        row["concat"] = dict(llm_cost, encode_flops=enc, prefill_flops=llm_cost["prefill_flops"] + enc,
                             total_flops=llm_cost["total_flops"] + enc, params_bytes=common.tree_bytes(concat_p))
        lv, cc = row["lavi_hd"], row["concat"]
        row["reduction_pct"] = 100.0 * (1.0 - lv["total_flops"] / cc["total_flops"])
        if "lavi_hd_static" in row:
            row["reduction_pct_static"] = 100.0 * (1.0 - row["lavi_hd_static"]["total_flops"] / cc["total_flops"])
        row["cache_ratio"] = (lv["kv_cache_bytes"] + lv["visual_cache_bytes"]) / cc["kv_cache_bytes"]
        row["seconds"] = round(time.time() - t0, 1)
        out[name] = row
        log(f"  hd {name:>24}: {g['tiles']:>2} tiles, concat {g['concat_tokens']} tokens; LaVi-HD "
            f"{lv['total_flops'] / 1e12:.2f} vs concat {cc['total_flops'] / 1e12:.2f} TFLOP (-{row['reduction_pct']:.1f} %)"
            f" in {row['seconds']} s")
    return out


def measure_cache(geo: dict, options=KV_SHARE, log=print) -> dict:
    """Per-request cache bytes at 7B geometry: LaVi-HD (text KV + visual cache) per ``kv_share`` option vs concat."""
    ids = jax.ShapeDtypeStruct((1, common.PROMPT_LEN), jnp.int32)
    llm = LaVi(_llm_config())
    llm_p, _ = sharding.abstract_params(llm, jnp.zeros((1, 8), jnp.int32))
    llm_gen = Generator(llm, max_new_tokens=common.NEW_TOKENS, buckets=None)
    pooled = {f"{o}, video_pool=2": o for o in options}  # videos only: frames pooled as OneVision pools them
    models = {o: LaVi(hd_config(kv_share=o)) for o in options}
    models.update({k: LaVi(hd_config(kv_share=o, video_pool=2)) for k, o in pooled.items()})
    params = {o: sharding.abstract_params(m, jnp.zeros((1, 8), jnp.int32))[0] for o, m in models.items()}
    out = {}
    for name, g in geo.items():
        text = jax.ShapeDtypeStruct((1, common.PROMPT_LEN - 1 + g["concat_tokens"]), jnp.int32)
        concat = common.tree_bytes(jax.eval_shape(llm_gen.prefill, llm_p, text, text)["cache"])
        row = {"tiles": g["tiles"], "concat_kv_bytes": concat}
        for o, model in models.items():
            if o in pooled and g["kind"] != "video":
                continue
            pix, mask, sizes = _abstract_pixels(model.config, g["tiles"], g["image_size"])
            args = (ids, ids, pix, mask, sizes)  # a video's image_sizes are (0, 0)
            gen = Generator(model, max_new_tokens=common.NEW_TOKENS, buckets=None)
            state = jax.eval_shape(gen.prefill, params[o], *args)
            kv, vis = common.tree_bytes(state["cache"]), common.tree_bytes(state["visual_cache"])
            row[o] = {"kv_cache_bytes": kv, "visual_cache_bytes": vis, "ratio": (kv + vis) / concat}
        out[name] = row
        log(f"  hd cache {name:>24}: concat {concat / 2**20:.1f} MiB; LaVi-HD " + ", ".join(
            f"kv_share={o} {(r['kv_cache_bytes'] + r['visual_cache_bytes']) / 2**20:.1f} MiB ({r['ratio']:.2f}x)"
            for o, r in ((o, row[o]) for o in models if o in row)))
    return out


def measure_latency(geo: dict, reps: int = 3, log=print) -> dict:
    """CPU latency at the scaled-down geometry with the real token counts (prefill + 31 decode steps)."""
    lavi_m, concat_m, llm_m = hd_config(scaled=True), common.model_config("concat", scaled=True), _llm_config(scaled=True)
    models = {k: LaVi(m) for k, m in (("lavi", lavi_m), ("concat", concat_m), ("llm", llm_m))}
    probe = jnp.asarray(common.prompt_ids(lavi_m, length=8))
    params = {k: sharding.init_params(mod, jax.random.key(0), probe) for k, mod in models.items()}
    gens = {k: Generator(models[k], max_new_tokens=common.NEW_TOKENS, buckets=None) for k in ("lavi", "llm")}
    encode = jax.jit(lambda p, x: models["concat"].apply({"params": p}, x, method=LaVi.encode))
    out = {}
    for name, g in geo.items():
        ids = jnp.asarray(common.prompt_ids(lavi_m))
        pix, mask = common.pixels(lavi_m, g["tiles"])
        sizes = jnp.asarray(np.asarray(g["image_size"], np.int32).reshape(1, 1, 2))
        lavi_args = (ids, jnp.ones_like(ids), pix, mask) + ((sizes,) if g["kind"] == "image" else ())
        text = jnp.asarray(common.prompt_ids(llm_m, length=common.PROMPT_LEN - 1 + g["concat_tokens"], image=False))

        def lavi_once():
            t0 = time.perf_counter()
            state = jax.block_until_ready(gens["lavi"].prefill(params["lavi"], *lavi_args))
            t1 = time.perf_counter()
            jax.block_until_ready(gens["lavi"].decode(params["lavi"], state))
            return {"prefill_s": t1 - t0, "e2e_s": time.perf_counter() - t0}

        def concat_once():
            t0 = time.perf_counter()
            jax.block_until_ready(encode(params["concat"], pix))
            state = jax.block_until_ready(gens["llm"].prefill(params["llm"], text, jnp.ones_like(text)))
            t1 = time.perf_counter()
            jax.block_until_ready(gens["llm"].decode(params["llm"], state))
            return {"prefill_s": t1 - t0, "e2e_s": time.perf_counter() - t0}

        times = common.interleaved({"lavi_hd": lavi_once, "concat": concat_once}, reps=reps)
        row = {"tiles": g["tiles"], "concat_tokens": g["concat_tokens"], "load_average": common.load_average(), **times}
        row["speedup"] = {k: times["concat"][k] / times["lavi_hd"][k] for k in ("prefill_s", "e2e_s")}
        out[name] = row
        log(f"  hd latency {name:>24}: e2e LaVi-HD {times['lavi_hd']['e2e_s']:.3f} s, concat "
            f"{times['concat']['e2e_s']:.3f} s -> {row['speedup']['e2e_s']:.2f}x")
    return out


def run(compiled: bool = False, latency: bool = True, reps: int = 3, log=print) -> dict:
    geo = geometry(C.ONEVISION_PINPOINTS)
    out = {"method": "compiled" if compiled else "lowered", "aspect": ASPECT, "max_crops": 36,
           "prompt_tokens": common.PROMPT_LEN, "new_tokens": common.NEW_TOKENS,
           "config": {"lavi_hd": common.describe(hd_config()), "concat": common.describe(common.model_config("concat"))},
           "settings": measure_flops(geo, compiled, log), "cache": measure_cache(geo, log=log)}
    if latency:
        out["latency"] = measure_latency(geo, reps, log)
        out["latency_config"] = common.describe(hd_config(scaled=True))
    return out


if __name__ == "__main__":  # the per-request cache rows alone (abstract shapes: about a minute)
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hd_cache.json")
    with open(path, "w") as f:
        json.dump({"command": "python -m benchmarks.hd_geometry", "dtype": "float32",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "cache": measure_cache(geometry(C.ONEVISION_PINPOINTS))}, f, indent=1)
    print(f"wrote {path}")
