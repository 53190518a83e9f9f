"""lavi_jax against Hugging Face PyTorch: the same Qwen2-shaped model and weights, float32, same thread count.

A random ``Qwen2ForCausalLM`` (transformers, every weight random as in the
parity tests) is saved with ``save_pretrained`` and imported with
:func:`lavi_jax.hf.import_hf`, so both sides hold identical weights.
Rows: a full-sequence forward returning logits at every position (B=1, T=512
and B=8, T=128) and greedy generation of 64 tokens from a 128-token prompt
(HF ``generate(do_sample=False)`` with its default KV cache vs
:class:`lavi_jax.generate.Generator`, neither stopping early). Forward rows also give
the work (XLA's FLOP count of the JAX forward) per second on each side. Both sides'
outputs are compared (max logit difference, share of equal generated tokens)
so a faster side cannot be a wrong one.
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

from benchmarks import common

GEOMETRY = dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
FORWARD_SHAPES = ((1, 512), (8, 128))
GEN_PROMPT, GEN_TOKENS = 128, 64


def build(directory: str):
    """(hf_model, jax_model, jax_params) with the same random weights."""
    import transformers

    from conversions.random_hf import randomize
    from lavi_jax.hf import import_hf
    from lavi_jax.models.lavi import LaVi

    transformers.utils.logging.disable_progress_bar()
    hf = randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**GEOMETRY)), seed=0)
    hf.save_pretrained(directory, safe_serialization=True)
    cfg, params = import_hf(directory)
    return hf, LaVi(cfg), params


def run(reps: int, warmup: int = 1, log=print) -> dict:
    import torch

    from lavi_jax.generate import Generator

    with tempfile.TemporaryDirectory() as d:
        hf, model, params = build(d)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    rows = {}
    rng = np.random.RandomState(0)
    for B, T in FORWARD_SHAPES:
        ids = rng.randint(0, GEOMETRY["vocab_size"], (B, T)).astype(np.int32)
        tids = torch.from_numpy(ids.astype(np.int64))

        def torch_fwd():
            with torch.inference_mode():
                return hf(tids).logits

        j = lambda: {"s": common.timed(lambda: forward(params, ids))}
        t = lambda: {"s": common.timed(torch_fwd)}
        diff = float(np.abs(np.asarray(forward(params, ids)) - torch_fwd().numpy()).max())
        flops = common.flops_of(forward.lower(params, ids).compile())
        load = common.load_average()
        times = common.interleaved({"jax": j, "torch": t}, reps=reps, warmup=warmup)
        rows[f"forward B={B} T={T}"] = _row(times, load, max_abs_logit_diff=diff, flops=flops,
                                            jax_flops_per_s=flops / times["jax"]["s"],
                                            torch_flops_per_s=flops / times["torch"]["s"])
        log(f"  vs torch forward B={B} T={T}: jax {times['jax']['s']:.3f} s, torch {times['torch']['s']:.3f} s")

    ids = rng.randint(0, GEOMETRY["vocab_size"], (1, GEN_PROMPT)).astype(np.int32)
    tids = torch.from_numpy(ids.astype(np.int64))
    gen = Generator(model, max_new_tokens=GEN_TOKENS)

    def torch_gen():
        with torch.inference_mode():
            out = hf.generate(tids, attention_mask=torch.ones_like(tids), do_sample=False, max_new_tokens=GEN_TOKENS,
                              min_new_tokens=GEN_TOKENS, eos_token_id=None, pad_token_id=0)
        return out[:, GEN_PROMPT:]

    same = float((np.asarray(gen(params, ids)[0]) == torch_gen().numpy()).mean())
    load = common.load_average()
    times = common.interleaved({"jax": lambda: {"s": common.timed(lambda: gen(params, ids))},
                                "torch": lambda: {"s": common.timed(torch_gen)}}, reps=reps, warmup=warmup)
    rows[f"greedy generate {GEN_TOKENS} tokens (B=1, prompt {GEN_PROMPT})"] = _row(times, load, same_tokens=same)
    log(f"  vs torch generate: jax {times['jax']['s']:.3f} s, torch {times['torch']['s']:.3f} s")
    return {"geometry": GEOMETRY, "threads": torch.get_num_threads(), "reps": reps, "warmup": warmup, "rows": rows}


def _row(times: dict, load: float, **check) -> dict:
    return {"jax_s": times["jax"]["s"], "torch_s": times["torch"]["s"], "ratio": times["jax"]["s"] / times["torch"]["s"],
            "samples": {k: times[k]["samples"]["s"] for k in times}, "load_average": load, **check}
