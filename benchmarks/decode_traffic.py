"""The 7B decode step's HBM traffic as the TPU compiler sees it, against the floor of reading everything once.

    python -m benchmarks.decode_traffic --out benchmarks/results/decode_traffic.json   # ~20 min on 2 cores
    PYTHONPATH=<older checkout> python -m benchmarks.decode_traffic --out before.json  # the same for older code

For ``configs/lavi_qwen2_7b_siglip.py`` (LaVi, bf16 weights and caches) on one v5e-8 host (v5e:2x4, mesh data 2 x
tensor 4: Qwen2-7B's 4 KV heads split 4 ways, the batch 2 ways) at batch 1, 32 and 64, a 2048-token prompt with
one 729-token image and 64 new tokens (a 2,111-slot cache): bytes accessed per chip by Generator's decode loop
compiled with unrolled layers (XLA counts a loop body once: one token's step, every layer counted, plus what runs
once per generation), the read-once floor (the chip's decoder weights + KV cache + visual cache shards) and their
ratio, that traffic's time at v5e's 819 GB/s, and the prefill's temp memory. Beside it, the HBM-only count of
:mod:`lavi_jax.train.hlo_traffic` (one loop iteration's operands and results in HBM, on-chip copies not counted);
``DECODE_TRAFFIC_HLO_DIR=<dir>`` keeps each compiled loop's HLO text there. Uses only :mod:`lavi_jax.train.dry_run` pieces that older checkouts have too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES, PROMPT, NEW_TOKENS, TOPOLOGY = (1, 32, 64), 2048, 64, "v5e:2x4"
MESH = {"data": 2, "fsdp": 1, "tensor": 4}


def hbm_summary(hlo_text: str) -> dict:
    """The HBM-only count of one decode step (:func:`lavi_jax.train.hlo_traffic.loop_hbm_traffic`) and, as its
    check, the loop-carried buffers (weights, caches) of 1 MiB or more: their bytes, the bytes read of them, and
    how many are read more than once."""
    from lavi_jax.train import hlo_traffic

    hbm = hlo_traffic.loop_hbm_traffic(hlo_text)
    carried = hlo_traffic.carried_reads(hlo_text)
    hbm["carried"] = {"buffers": len(carried), "bytes": sum(c["bytes"] for c in carried),
                      "read": sum(c["read"] for c in carried),
                      "read_more_than_once": sum(c["read"] > 1.01 * c["bytes"] for c in carried),
                      "read_in_part": [c for c in carried if c["read"] < 0.99 * c["bytes"]]}
    return hbm


def measure(batch: int) -> dict:
    import importlib

    import jax
    import jax.numpy as jnp
    from lavi_jax import config as C, sharding
    from lavi_jax.generate import Generator
    from lavi_jax.train import topology

    dr = importlib.import_module("lavi_jax.train.dry_run")
    cfg = C.get(os.path.join(ROOT, "configs/lavi_qwen2_7b_siglip.py"))
    C.set_precision(cfg.model, "bf16")
    cfg.model.update(scan_layers=False, attention="auto")
    cfg.data.update(max_images=1, num_frames=1)
    cfg.mesh.update(MESH)
    mesh = topology.make_mesh(MESH, TOPOLOGY)
    t0 = time.time()
    model, params, inputs = dr._generation_inputs(cfg, mesh, batch, PROMPT, 1)
    gen = Generator(model, max_new_tokens=NEW_TOKENS)
    rep = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    knobs = dict(greedy=True, top_k=0)
    if "nucleus" in inspect.signature(gen._decode_fn).parameters:  # older checkouts decide the nucleus per call
        knobs["nucleus"] = False
    with sharding.use_mesh(mesh):
        prefill_c = jax.jit(gen.prefill).lower(params, *inputs).compile()
        state = prefill_c.out_info
        rest = {k: v for k, v in state.items() if k != "cache"}
        loop_c = gen._decode.lower(params, state["cache"], rest, rng, scalar, scalar, **knobs).compile()
    accessed = float(dr._cost(loop_c).get("bytes accessed", 0.0))
    hbm = None
    try:  # HBM-only count (newer checkouts): operands and results in memory space 0
        from lavi_jax.train import hlo_traffic
        hbm = hbm_summary(loop_c.as_text())
        if os.environ.get("DECODE_TRAFFIC_HLO_DIR"):  # keep the compiled loop's HLO text for reading
            with open(os.path.join(os.environ["DECODE_TRAFFIC_HLO_DIR"], f"decode_loop_b{batch}.txt"), "w") as f:
                f.write(loop_c.as_text())
    except ImportError:
        pass
    parts = {"decoder_params": dr.bytes_per_device(params["llm"]), "kv_cache": dr.bytes_per_device(state["cache"]),
             "visual_cache": dr.bytes_per_device(state["visual_cache"])}
    floor = sum(parts.values())
    return {"batch": batch, "bytes_accessed_per_step": accessed, "read_once_bytes_per_step": floor,
            "read_once_parts": parts, "bytes_accessed_over_read_once": accessed / floor,
            "seconds_per_step_bandwidth_bound": accessed / 819e9,
            "prefill_temp_bytes": int(prefill_c.memory_analysis().temp_size_in_bytes),
            "decode_temp_bytes": int(loop_c.memory_analysis().temp_size_in_bytes),
            "compile_seconds": round(time.time() - t0, 1),
            **({} if hbm is None else {"hbm_bytes_per_step": hbm["bytes"], "hbm_read_bytes_per_step": hbm["read"],
                                       "hbm_written_bytes_per_step": hbm["written"],
                                       "hbm_bytes_over_read_once": hbm["bytes"] / floor,
                                       "hbm_by_kind": hbm["by_kind"], "hbm_carried": hbm["carried"]})}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON written after every batch (resumes from it)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = p.parse_args(argv)
    results = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f).get("batches", {})
    for b in (int(x) for x in args.batches.split(",")):
        if str(b) not in results:
            results[str(b)] = measure(b)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"topology": TOPOLOGY, "mesh": MESH, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                               "batches": results}, f, indent=1)
    gib = 2**30
    print(f"| batch | bytes accessed / step / chip | HBM bytes / step / chip | read-once floor (weights + KV + visual) "
          f"| ratio (accessed, HBM) | time at 819 GB/s (accessed, HBM) | prefill temp |")
    print("|---|---|---|---|---|---|---|")
    for b, r in results.items():
        parts = r["read_once_parts"]
        hbm = r.get("hbm_bytes_per_step")
        hbm_ratio = "-" if hbm is None else f"{hbm / r['read_once_bytes_per_step']:.2f}x"
        hbm_ms = "-" if hbm is None else f"{hbm / 819e9 * 1e3:.2f} ms"
        hbm_gib = "not measured" if hbm is None else f"{hbm / gib:.2f} GiB"
        print(f"| {b} | {r['bytes_accessed_per_step'] / gib:.2f} GiB | "
              f"{hbm_gib} | {r['read_once_bytes_per_step'] / gib:.2f} GiB "
              f"({parts['decoder_params'] / gib:.2f} + {parts['kv_cache'] / gib:.2f} + {parts['visual_cache'] / gib:.3f}) | "
              f"{r['bytes_accessed_over_read_once']:.2f}x, "
              f"{hbm_ratio} | {r['seconds_per_step_bandwidth_bound'] * 1e3:.2f} ms, {hbm_ms} | "
              f"{r['prefill_temp_bytes'] / gib:.2f} GiB |")


if __name__ == "__main__":
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # after PYTHONPATH, so an older checkout given there is the one measured
    main()
