"""python -m lavi_jax.serve --ckpt CKPT [--host 127.0.0.1 --port 8000]: an OpenAI-compatible server.

    python -m lavi_jax.serve --ckpt /tmp/lavi_demo/modulation --slots 16 --allowed-media-root /data/images
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "lavi", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}'

Model, tokenizer, chat template and image processor come from the checkpoint as for eval.py and
``python -m lavi_jax.predict`` (``--ckpt``: a workdir, checkpoint folder or step folder; ``--step``).
"""

from __future__ import annotations

import argparse
import sys

import jax
from absl import logging

from lavi_jax import sharding
from lavi_jax.eval.from_checkpoint import checkpoint_config, load_checkpoint
from lavi_jax.generate import DEFAULT_BUCKETS
from lavi_jax.serve.engine import Engine
from lavi_jax.serve.media_fetch import MediaFetcher
from lavi_jax.serve.prompt import PromptBuilder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lavi_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="workdir, checkpoint folder or step folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="lavi", help="the model id clients send")
    p.add_argument("--slots", type=int, default=16, help="decode slots: requests decoded together")
    p.add_argument("--max-len", type=int, default=2048, help="cache positions per slot: prompt (with concat's "
                                                             "visual tokens) plus answer")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                   help="prompt length buckets (one prefill program each); longer prompts are refused")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond the slots; more: 429")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length when a request sets none")
    p.add_argument("--max-images", type=int, default=None, help="images/videos per request (default: the "
                                                                 "checkpoint's data.max_images)")
    p.add_argument("--allowed-media-root", default=None, help="local image/video paths are read only below it")
    p.add_argument("--allowed-media-domains", default="", help="comma-separated domains images may be fetched "
                                                               "from (public addresses only)")
    p.add_argument("--tensor", type=int, default=1, help="devices to split the model over (tensor parallel)")
    return p.parse_args(argv)


def build(args):
    """(engine, builder, fetcher) for the parsed arguments."""
    config, directory, step = checkpoint_config(None, args.ckpt, args.step)
    if args.max_images:
        with config.unlocked():
            config.data.max_images = args.max_images
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": args.tensor}, devices=jax.devices()[:args.tensor])
    model, params, tokenizer, processor = load_checkpoint(config, directory, step, mesh)
    builder = PromptBuilder(tokenizer, processor, config)
    engine = Engine(model, params, tokenizer, num_slots=args.slots, max_len=args.max_len,
                    buckets=tuple(int(b) for b in args.buckets.split(",") if b), visual_shape=builder.visual_shape,
                    anyres=builder.image_loader.anyres, max_waiting=args.max_waiting,
                    max_tokens_default=args.max_tokens, mesh=mesh)
    fetcher = MediaFetcher(args.allowed_media_root, [d.strip() for d in args.allowed_media_domains.split(",")])
    return engine, builder, fetcher


def main(argv=None) -> int:
    import uvicorn

    from lavi_jax.serve.server import create_app

    args = parse_args(argv)
    logging.set_verbosity(logging.ERROR)
    engine, builder, fetcher = build(args)
    app = create_app(engine, builder, fetcher, model_name=args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
