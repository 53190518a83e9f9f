"""One question from the command line: a checkpoint answers a prompt about images or a video, printed as generated.

    python -m lavi_jax.predict --ckpt /tmp/lavi_demo/modulation --image cat.jpg --prompt "What is in the picture?"
    python -m lavi_jax.predict --ckpt CK --image a.jpg --image b.jpg --prompt "<image> or <image>: which is older?"
    python -m lavi_jax.predict --ckpt CK --video clip.mp4 --prompt "What happens?" --temperature 0.7 --top_p 0.9

Model, tokenizer and image processor come from the checkpoint as for eval.py
(``--ckpt`` takes a workdir, a checkpoint folder or a step folder; ``--step``).
Images and videos come first, in order, unless the prompt places them with
``<image>`` tags. ``--temperature 0`` (the default) is greedy and answers as
eval.py does; otherwise ``--top_k``, ``--top_p`` and ``--seed`` shape the
sampling. The model runs on one device, or split over ``--tensor`` devices.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from absl import logging

from lavi_jax import sharding
from lavi_jax.data.media import VIDEO, MediaLoader, media_items
from lavi_jax.eval.from_checkpoint import checkpoint_config, load_checkpoint
from lavi_jax.eval.runner import conversation
from lavi_jax.generate import GenerationConfig, Generator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lavi_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="workdir, checkpoint folder or step folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--video", default=None, help="a video file or a folder of frames")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: no top-k restriction")
    p.add_argument("--top_p", type=float, default=1.0, help="1: no nucleus restriction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor", type=int, default=1, help="devices to split the model over (tensor parallel)")
    return p.parse_args(argv)


class Predictor:
    """A checkpoint ready to answer: ``inputs(prompt, images, video)`` then ``stream(inputs, ...)`` or ``answer``."""

    def __init__(self, ckpt: str, *, step: int | None = None, max_new_tokens: int = 128, tensor: int = 1):
        self.config, directory, step = checkpoint_config(None, ckpt, step)
        self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": tensor}, devices=jax.devices()[:tensor])
        self.model, self.params, self.tokenizer, self.processor = load_checkpoint(self.config, directory, step,
                                                                                  self.mesh)
        self.generator = Generator(self.model, max_new_tokens=max_new_tokens, stop_ids=self.tokenizer.stop_ids,
                                   pad_id=self.tokenizer.pad_id)

    def inputs(self, prompt: str, images=(), video: str | None = None) -> tuple:
        """(input_ids [1, T], attention_mask, pixel_values or None, item_mask or None[, image_sizes]) for one
        question; ``image_sizes`` [1, N, 2] only for an anyres model."""
        sample = {"prompt": prompt, "image": list(images) or None, "video": video}
        items = media_items(sample)
        ids = np.asarray(self.tokenizer.encode_prompt(conversation(sample, len(items))), np.int32)[None]
        if not items or self.model.config.fusion == "none":
            return ids, np.ones_like(ids), None, None
        frames = int(self.config.data.get("num_frames", 1)) if any(k == VIDEO for k, _ in items) else 1
        loader = MediaLoader(self.processor, frames, None, self.config.data.get("max_image_pixels"), joined=True)
        pixels, mask, sizes = loader.load_sample(sample, len(items))
        if loader.anyres:
            if self.model.config.fusion == "modulation":  # one question: only the frames its items use
                used = int(mask.sum(1).max())
                pixels, mask = pixels[:, :used], mask[:, :used]
            return ids, np.ones_like(ids), pixels[None], mask[None], sizes[None]
        return ids, np.ones_like(ids), pixels[None], mask[None]

    def stream(self, inputs: tuple, sampling: GenerationConfig = GenerationConfig(), seed: int = 0):
        """Yields the answer's text piece by piece as tokens are generated (stop token excluded)."""
        stops, tokens, shown = set(self.tokenizer.stop_ids), [], ""
        with sharding.use_mesh(self.mesh):
            state = self.generator.prefill(self.params, *inputs)
            for tok in self.generator.stream(self.params, state, sampling=sampling, rng=jax.random.key(seed)):
                if int(tok[0]) in stops:
                    break
                tokens.append(int(tok[0]))
                text = self.tokenizer.decode(tokens)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    yield text[len(shown):]
                    shown = text
        text = self.tokenizer.decode(tokens)
        if text != shown:
            yield text[len(shown):]

    def answer(self, *args, **kwargs) -> str:
        return "".join(self.stream(*args, **kwargs)).strip()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # orbax notes every read-only checkpoint open at WARNING
    predictor = Predictor(args.ckpt, step=args.step, max_new_tokens=args.max_new_tokens, tensor=args.tensor)
    sampling = GenerationConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    first = True
    for piece in predictor.stream(predictor.inputs(args.prompt, args.image, args.video), sampling, args.seed):
        sys.stdout.write(piece.lstrip() if first else piece)  # eval.py strips the answer; so does the first piece
        first = first and not piece.strip()
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
