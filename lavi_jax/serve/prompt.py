"""OpenAI chat messages -> an engine request, with the checkpoint's tokenizer, chat template and image placeholder.

    builder = PromptBuilder(tokenizer, processor, config)
    request = builder.request(messages, media)   # media: one (kind, value) item per image / video part, in order

A message's images and videos go before its text, one ``<image>`` line each, unless its text places them
with ``<image>`` tags, exactly as ``eval.py`` and ``python -m lavi_jax.predict`` build a one-question
prompt (``eval.runner.conversation``); pixels come from ``data.media.MediaLoader`` as there.
"""

from __future__ import annotations

import numpy as np

from lavi_jax.data.media import VIDEO, MediaLoader
from lavi_jax.eval.runner import conversation
from lavi_jax.serve.engine import Request, RequestError

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class PromptBuilder:
    """Tokenizer, processor and data settings of one checkpoint config."""

    def __init__(self, tokenizer, processor, config):
        self.tokenizer, self.processor = tokenizer, processor
        self.fusion = config.model.fusion
        self.num_frames = int(config.data.get("num_frames", 1))
        self.max_pixels = config.data.get("max_image_pixels")
        self.max_items = max(int(config.data.get("max_images", 1)), 1)
        self.image_loader = MediaLoader(processor, 1, None, self.max_pixels, joined=True)
        self.video_loader = MediaLoader(processor, self.num_frames, None, self.max_pixels, joined=True)

    @property
    def visual_shape(self) -> tuple:
        """(items, frames, height, width) a request's media are padded to in a modulation slot."""
        h, w = self.processor.output_size
        return self.max_items, max(self.image_loader.item_frames, self.video_loader.item_frames), h, w

    def turns(self, messages: list[tuple[str, str, int]]) -> list[dict]:
        """(role, text, number of media items) per message -> LLaVA turns."""
        out = []
        for role, text, n in messages:
            if role not in ROLES:
                raise RequestError(f"unknown role {role!r}")
            value = conversation({"prompt": text}, n)[0]["value"] if n or "<image>" in text else text
            out.append({"from": ROLES[role], "value": value})
        return out

    def request(self, messages: list[tuple[str, str, int]], media: list[tuple[str, object]], **knobs) -> Request:
        """A :class:`Request`; raises RequestError for a prompt or media the model cannot take."""
        if len(media) > self.max_items:
            raise RequestError(f"{len(media)} images/videos, more than the {self.max_items} this model takes")
        try:
            ids = np.asarray(self.tokenizer.encode_prompt(self.turns(messages)), np.int32)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not media or self.fusion == "none":
            return Request(ids, **knobs)
        loader = self.video_loader if any(k == VIDEO for k, _ in media) else self.image_loader
        try:
            pixels, mask, sizes = loader.load_all(media)
        except RequestError:
            raise
        except Exception as e:  # unreadable, truncated or too large media
            raise RequestError(f"cannot read the image: {type(e).__name__}: {e}") from None
        return Request(ids, pixels, mask, sizes if loader.anyres else None, **knobs)
