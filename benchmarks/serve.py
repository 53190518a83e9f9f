"""The OpenAI-compatible server under concurrent load: output tokens/s, time to first token and latency.

    python benchmarks/serve.py [--clients 1,4,16,64] [--requests 64] [--max-tokens 32] [--fusions modulation,concat]
    python benchmarks/serve.py --geometry onevision --clients 1,16 --requests 16 --slots 16   # 1024x768 photos
    python benchmarks/run.py --sections serve

For each fusion, a demo-sized model (configs/demo.py, random weights, byte tokenizer) is saved as a
checkpoint and served exactly as ``python -m lavi_jax.serve`` does (uvicorn on 127.0.0.1, ``--slots``
decode slots). ``c`` closed-loop clients (``openai.AsyncOpenAI``, streaming, greedy) each send their next
request when the previous answer ends, ``--requests`` requests in all: a one-sentence question about one
synthetic 64x64 image (a data: URL), ``max_tokens`` tokens at most. Reported per client count: output
tokens/s (completion tokens of all requests / wall time), time to first streamed chunk and request latency
(p50 / p99), and the speed-up over the 1-client row: the same server (same slots, same programs) with one
client sending the same ``--requests`` requests one after another.

``--geometry onevision`` serves LaVi-HD against LLaVA-OneVision's anyres concat at the scaled CPU geometry of
:mod:`benchmarks.hd_geometry` (384-px tiles of 729 tokens, OneVision's pinpoints, ``anyres_max_9``) with the
demo's tokenizer, and asks about 1024x768 photos (7 tiles; concat splices 4,725 visual tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _random_params(config):
    import jax
    import jax.numpy as jnp

    import lavi_jax
    from lavi_jax import sharding

    shapes, _ = sharding.abstract_params(lavi_jax.LaVi(config.model), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        std = 1.0 if len(s.shape) < 2 or "embed" in name else float(np.prod(s.shape[:-1])) ** -0.5
        return (std * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


GEOMETRIES = {  # name -> (image (width, height), description)
    "demo": ((64, 64), "configs/demo.py (random weights); one question + one 64x64 image"),
    "onevision": ((1024, 768), "the scaled OneVision-7B geometry of benchmarks/hd_geometry.py (384-px tiles of 729 "
                  "tokens, OneVision's pinpoints, anyres_max_9; random weights); one question + one 1024x768 photo "
                  "(7 tiles; concat 4,725 visual tokens)"),
}


def _onevision_model(fusion: str, demo_model):
    """LaVi-HD or OneVision's anyres concat at the scaled CPU geometry, with the demo tokenizer's vocabulary."""
    from benchmarks import common, hd_geometry
    from lavi_jax import config as C

    if fusion == "modulation":
        m = hd_geometry.hd_config(scaled=True)
    else:
        m = common.model_config("concat", scaled=True)
        m.anyres.update(enabled=True, pinpoints=C.ONEVISION_PINPOINTS, max_crops=36, aspect="anyres_max_9",
                        newline=True)  # as configs/llava_ov_7b_concat.py:anyres
        m.projector.temporal_embedding = False
    m.llm.vocab_size, m.image_token_id = demo_model.llm.vocab_size, demo_model.image_token_id
    return m


def _checkpoint(root: str, fusion: str, geometry: str = "demo") -> tuple[str, list[str]]:
    import lavi_jax
    from PIL import Image

    from lavi_jax import checkpoint
    from lavi_jax.demo.synthetic import write_synthetic_vqa

    paths = write_synthetic_vqa(os.path.join(root, "data"), num_train=1, num_eval=8, image_size=64)
    config = lavi_jax.configs.get("configs/demo.py")
    config.demo.enabled = False
    config.model.fusion = fusion
    config.data.update(train_json=paths["train_json"], eval_json=paths["eval_json"], image_root=paths["image_root"])
    images = [os.path.join(paths["image_root"], s["image"]) for s in json.load(open(paths["eval_json"]))]
    if geometry == "onevision":
        config.model = _onevision_model(fusion, config.model)
        config.data.update(image_size=config.model.vision.image_size, max_images=1)
        for k, path in enumerate(images):  # the same synthetic scenes, as 1024x768 photos
            images[k] = os.path.join(root, f"photo{k}.png")
            Image.open(path).convert("RGB").resize(GEOMETRIES[geometry][0]).save(images[k])
    return checkpoint.save_params(os.path.join(root, f"{fusion}-{geometry}"), config, _random_params(config)), images


class _Server:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(120)


async def _drive(url: str, clients: int, requests: int, urls: list[str], max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    todo = list(range(requests))
    ttft, latency, tokens = [], [], 0

    async def one_client():
        nonlocal tokens
        while todo:
            k = todo.pop()
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model="lavi", temperature=0, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": "What colour is the shape in the picture?"},
                    {"type": "image_url", "image_url": {"url": urls[k % len(urls)]}}]}])
            async for chunk in stream:
                if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            ttft.append(first if first is not None else time.perf_counter() - t0)
            latency.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    pct = lambda xs, q: float(np.percentile(xs, q))
    return {"clients": clients, "requests": requests, "completion_tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99)}


def run(fusions=("modulation", "concat"), clients=(1, 4, 16, 64), requests: int = 64, max_tokens: int = 32,
        slots: int = 64, geometry: str = "demo", log=print) -> dict:
    """-> {"settings", fusion: {"rows": [per client count], ...}}."""
    from lavi_jax.serve.__main__ import build, parse_args
    from lavi_jax.serve.server import create_app

    out = {"settings": {"requests": requests, "max_tokens": max_tokens, "slots": slots, "clients": list(clients),
                        "geometry": geometry, "model": GEOMETRIES[geometry][1]}}
    with tempfile.TemporaryDirectory() as root:
        for fusion in fusions:
            path, images = _checkpoint(root, fusion, geometry)
            urls = ["data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in images]
            max_len = 256 if geometry == "demo" or fusion != "concat" else 16384  # concat: the photo's spliced prefix
            args = parse_args(["--ckpt", path, "--slots", str(slots), "--max-len", str(max_len), "--buckets", "64,128",
                               "--max-waiting", str(max(clients) * 2)])
            engine, builder, fetcher = build(args)
            server = _Server(create_app(engine, builder, fetcher, model_name="lavi"))
            url = f"http://127.0.0.1:{server.port}/v1"
            try:
                asyncio.run(_drive(url, 2, 4, urls, max_tokens))  # compiles the programs
                rows = []
                for c in clients:
                    row = asyncio.run(_drive(url, c, max(requests, c), urls, max_tokens))
                    rows.append(row)
                    log(f"serve {fusion:10s} clients={c:3d} {row['tokens_per_s']:8.1f} tok/s  "
                        f"ttft p50 {row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s  "
                        f"latency p50 {row['latency_p50_s']:.3f}s p99 {row['latency_p99_s']:.3f}s")
                base = rows[0]["tokens_per_s"]
                for row in rows:
                    row["speedup_vs_one_at_a_time"] = row["tokens_per_s"] / base
                out[fusion] = {"rows": rows, "compiled": dict(engine.slots.num_traces)}
            finally:
                server.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--fusions", default="modulation,concat")
    p.add_argument("--geometry", default="demo", choices=sorted(GEOMETRIES),
                   help="demo: the demo model and 64x64 images; onevision: LaVi-HD vs OneVision's anyres concat at the "
                        "scaled 7B geometry, 1024x768 photos")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    r = run(tuple(a.fusions.split(",")), tuple(int(c) for c in a.clients.split(",")), a.requests, a.max_tokens,
            a.slots, a.geometry)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
