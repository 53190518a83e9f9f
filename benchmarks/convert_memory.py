"""Host memory added by the HF import, against the checkpoint's size on disk.

    python benchmarks/convert_memory.py [--size-gb 1.1] [--dtypes float32,bfloat16] [--layouts unrolled,scanned]
                                        [--sources local,gs]

Builds, per dtype, a random Qwen2-shaped HF checkpoint (sharded safetensors with an index,
a LLaMA-sized 32k vocabulary so no single tensor dominates) in a temp dir, then
imports it in a fresh subprocess per layer layout on one CPU device, exactly as
``python -m conversions.import_hf`` does (read + place, then the orbax save).
Memory added = peak RSS (``getrusage`` high-water mark) minus the RSS after
jax and the converter (with transformers, for the config defaults) are
imported, before any tensor is read. On a CPU the imported params themselves
live in host memory, so 1.0x is the floor; the target is at most 1.3x. Prints a table and writes
``benchmarks/results/convert_memory.json``.

``--sources local,gs`` also imports the same checkpoint from a ``gs://`` bucket: a
GCS-compatible server on 127.0.0.1 (``benchmarks.gcs.Emulator``, in memory, in its own
process, so its memory is not counted) is started, the checkpoint uploaded to it,
and the child reads every tensor with ranged requests from it; the table puts the
two side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 4, 32000


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def build_checkpoint(directory: str, size_gb: float, dtype: str) -> dict:
    """A random Qwen2ForCausalLM-shaped checkpoint of about ``size_gb`` GB; returns its config."""
    from lavi_jax.hf.safetensors_io import np_dtype, write_safetensors

    dt = np_dtype(dtype)
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    layer = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.q_proj.bias": (HIDDEN,),
        "self_attn.k_proj.weight": (kv, HIDDEN), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN), "mlp.down_proj.weight": (HIDDEN, INTER),
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
    }
    per_layer = sum(math.prod(s) for s in layer.values())
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, math.ceil((size_gb * 1e9 / dt.itemsize - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    rng = np.random.default_rng(0)

    def produce(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dt)

    write_safetensors(directory, [(n, s, dt, produce(s)) for n, s in shapes.items()], max_shard_bytes=400 * 10**6)
    config = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
                  intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, hidden_act="silu", dtype=dtype)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return config


BUCKET = "gs://convert-memory"


def upload(hf: str, uri: str) -> str:
    """The checkpoint directory ``hf`` copied to ``uri`` (in parts: never a whole file in memory); returns ``uri``."""
    from lavi_jax import storage

    for name in storage.listdir(hf):
        with storage.write_file(storage.join(uri, name)) as f, open(os.path.join(hf, name), "rb") as src:
            while chunk := src.read(64 * 2**20):
                f.write(chunk)
    return uri


def child(args: dict) -> None:
    """Runs in a fresh process: the import as the CLI does it, with RSS readings around it."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.pop("XLA_FLAGS", None)  # one CPU device: params are not replicated
    import jax

    from lavi_jax import checkpoint, sharding
    from lavi_jax.hf import config as hf_config
    from lavi_jax.hf import full_config, import_hf

    mesh = sharding.make_mesh({"data": 1})
    jax.devices()
    hf_config.with_defaults({"model_type": "qwen2"})  # imports transformers (and torch where installed): a fixed cost
    before = rss()
    t0 = time.time()
    cfg, params = import_hf(args["hf"], scan=args["scan"], dtype=args["dtype"], mesh=mesh)
    jax.block_until_ready(params)
    peak_import, t_import = peak_rss(), time.time() - t0
    checkpoint.save_params(args["out"], full_config(cfg), params)
    peak_total, t_total = peak_rss(), time.time() - t0
    print(json.dumps({"rss_before": before, "peak_import": peak_import, "peak_with_save": peak_total,
                      "seconds_import": t_import, "seconds_with_save": t_total}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.1)
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes on disk (and of the imported params)")
    p.add_argument("--layouts", default="unrolled,scanned")
    p.add_argument("--sources", default="local", help="where the import reads from: local (disk), gs (a bucket on "
                                                       "a GCS-compatible server on 127.0.0.1), or both")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "convert_memory.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return 0

    rows = []
    sources = a.sources.split(",")
    emulator = None
    if "gs" in sources:
        from benchmarks.gcs import Emulator, environment

        emulator = Emulator()
        os.environ.update(environment(emulator.url))  # the children inherit them
        emulator.create_bucket(BUCKET[len("gs://"):])
    try:
        return _run(a, argv, rows, sources, emulator)
    finally:
        if emulator is not None:
            emulator.stop()


def _run(a, argv, rows, sources, emulator) -> int:
    for dtype in a.dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = os.path.join(tmp, "hf")
            t0 = time.time()
            config = build_checkpoint(hf, a.size_gb, dtype)
            disk = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors"))
            files = len([f for f in os.listdir(hf) if f.endswith(".safetensors")])
            print(f"built {disk / 1e9:.2f} GB {dtype} checkpoint ({config['num_hidden_layers']} layers, {files} files) "
                  f"in {time.time() - t0:.0f}s")
            where = {"local": hf}
            if "gs" in sources:
                t0 = time.time()
                where["gs"] = upload(hf, f"{BUCKET}/{dtype}")
                print(f"uploaded it to {where['gs']} in {time.time() - t0:.0f}s")
            for source in sources:
                for layout in a.layouts.split(","):
                    out = os.path.join(tmp, f"ckpt-{source}-{layout}")
                    spec = json.dumps({"hf": where[source], "out": out, "scan": layout == "scanned", "dtype": dtype})
                    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec],
                                         capture_output=True, text=True, cwd=ROOT)
                    if res.returncode:
                        print(res.stderr[-4000:], file=sys.stderr)
                        return 1
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    row = dict(source=source, layout=layout, dtype=dtype, disk_bytes=disk,
                               added_import=r["peak_import"] - r["rss_before"],
                               added_with_save=r["peak_with_save"] - r["rss_before"], **r)
                    row.update(ratio_import=row["added_import"] / disk, ratio_with_save=row["added_with_save"] / disk)
                    row["meets_1_3x"] = row["ratio_import"] <= 1.3
                    rows.append(row)
            if "gs" in where:
                from lavi_jax import storage

                storage.remove(where["gs"])
    print(f"\n{'source':<7} {'layout':<10} {'dtype':<9} {'on disk':>9} {'added (import)':>15} {'ratio':>6} "
          f"{'added (+save)':>14} {'ratio':>6} {'import':>7} {'+save':>6}")
    for r in rows:
        print(f"{r['source']:<7} {r['layout']:<10} {r['dtype']:<9} {r['disk_bytes'] / 1e9:>7.2f}GB "
              f"{r['added_import'] / 1e9:>13.2f}GB {r['ratio_import']:>5.2f}x {r['added_with_save'] / 1e9:>12.2f}GB "
              f"{r['ratio_with_save']:>5.2f}x {r['seconds_import']:>6.0f}s {r['seconds_with_save']:>5.0f}s")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    import jax

    with open(a.out, "w") as f:
        json.dump({"command": "python benchmarks/convert_memory.py " + " ".join(argv or sys.argv[1:]),
                   "target_ratio": 1.3, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                    "jax": jax.__version__},
                   "rows": rows}, f, indent=2)
    print(f"\nwrote {a.out}")
    return 0 if all(r["meets_1_3x"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
