"""Shared pieces of the benchmarks: geometries, inputs, interleaved timing, XLA cost and memory readings.

Timing rule for every side-by-side number: the candidates run in the same
process, interleaved (the order flips every repetition), and each reports the
median of its repetitions after warm-up, so a neighbour's load on a shared
machine falls on both sides alike.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax import config as C

LAVI_CONFIG = "configs/lavi_qwen2_7b_siglip.py"
CONCAT_CONFIG = "configs/llava_ov_7b_concat.py"
FUSION_CONFIGS = {"modulation": LAVI_CONFIG, "concat": CONCAT_CONFIG}
LABEL = {"modulation": "LaVi", "concat": "concat"}

TILE_TOKENS = 729  # SigLIP-so400m-patch14-384: 27 x 27 patches per tile or frame
PROMPT_LEN = 64
NEW_TOKENS = 32

# Visual inputs: (name, frames of one visual item). Tiles of an any-res image and video frames are both
# frames of one item (one <image> placeholder), 729 tokens each.
SETTINGS = {
    "1 tile": 1,
    "2 tiles": 2,
    "4 tiles": 4,
    "6 tiles": 6,
    "10 tiles": 10,
    "16-frame video": 16,
    "32-frame video": 32,
}
HEADLINE_SETTINGS = ("1 tile", "4 tiles", "10 tiles", "32-frame video")

# Scaled-down geometry for CPU latency: full-size token counts (384 px, patch 14), small widths and depths.
SCALED_LLM = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, max_position_embeddings=32768)
SCALED_VISION = dict(hidden_size=96, intermediate_size=384, num_layers=2, num_heads=4)
SCALED_CONDITIONER = dict(width=64, num_heads=4)

# Qwen2-0.5B geometry (GPU MFU).
QWEN2_05B = dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, tie_word_embeddings=True, attention_bias=True)


def model_config(fusion: str, *, scaled: bool = False, dtype: str | None = None) -> C.ConfigDict:
    """The 7B config of ``fusion`` (LaVi's or LLaVA-OV's), optionally shrunk to the CPU geometry."""
    m = C.get(FUSION_CONFIGS[fusion]).model
    if scaled:
        m.llm.update(SCALED_LLM)
        m.vision.update(SCALED_VISION)
        m.conditioner.update(SCALED_CONDITIONER)
        m.image_token_id = SCALED_LLM["vocab_size"] - 1
    if dtype:
        m.dtype = m.param_dtype = dtype
    return m


def describe(m: C.ConfigDict) -> str:
    l, v = m.llm, m.vision
    return (f"LLM d={l.hidden_size} L={l.num_layers} heads={l.num_heads}/{l.num_kv_heads} mlp={l.intermediate_size} "
            f"vocab={l.vocab_size}; ViT d={v.hidden_size} L={v.num_layers} {v.image_size}px/{v.patch_size}; "
            f"conditioner width={m.conditioner.width}; {m.dtype}")


# ----------------------------------------------------------------------------- inputs


def prompt_ids(m: C.ConfigDict, batch: int = 1, length: int = PROMPT_LEN, seed: int = 0, image: bool = True) -> np.ndarray:
    """Random prompt ids below ``image_token_id``, with one ``<image>`` placeholder at position 1."""
    ids = np.random.RandomState(seed).randint(1, min(m.image_token_id, m.llm.vocab_size), (batch, length)).astype(np.int32)
    if image:
        ids[:, 1] = m.image_token_id
    return ids


def pixels(m: C.ConfigDict, frames: int, batch: int = 1, dtype=jnp.float32, seed: int = 0):
    """(pixel_values [B, 1, F, H, W, 3], item_mask [B, 1, F]) of one visual item of ``frames`` frames."""
    s = m.vision.image_size
    pix = jax.random.normal(jax.random.key(seed), (batch, 1, frames, s, s, 3), dtype)
    return pix, jnp.ones((batch, 1, frames), jnp.bool_)


def abstract_inputs(m: C.ConfigDict, frames: int, batch: int = 1, length: int = PROMPT_LEN):
    s = m.vision.image_size
    return (jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, 1, frames, s, s, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, 1, frames), jnp.bool_))


# ----------------------------------------------------------------------------- XLA readings


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else float("nan")


def peak_bytes(compiled) -> int:
    """A program's live bytes at its peak per XLA: arguments + outputs + temporaries - donated (aliased)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], dict[str, float]]], reps: int, warmup: int = 1) -> dict[str, dict]:
    """Runs each candidate ``warmup + reps`` times, interleaved (order flips every repetition).

    A candidate returns a dict of durations in seconds. Returns, per candidate,
    the median of each duration over the ``reps`` timed runs and the raw samples.
    """
    names = list(candidates)
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(warmup + reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            out = candidates[n]()
            if r >= warmup:
                samples[n].append(out)
    result = {}
    for n in names:
        keys = samples[n][0].keys()
        result[n] = {k: statistics.median(s[k] for s in samples[n]) for k in keys}
        result[n]["samples"] = {k: [round(s[k], 6) for s in samples[n]] for k in keys}
    return result


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def matmul_rate(n: int, dtype=jnp.float32) -> Callable[[], dict[str, float]]:
    """A candidate for :func:`interleaved` timing one [n, n] @ [n, n] product (FLOP/s in ``rate``)."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, b))

    def run():
        t = timed(lambda: mm(a, b))
        return {"s": t, "rate": 2.0 * n**3 / t}

    return run


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")
