"""The tokenizer and image processor of a run, checked against the model they feed."""

from __future__ import annotations

from lavi_jax.data.anyres import AnyresProcessor
from lavi_jax.data.image_processor import ImageProcessor, make_image_processor
from lavi_jax.data.tokenizer import Tokenizer, make_tokenizer


def make_components(config) -> tuple[Tokenizer, ImageProcessor | AnyresProcessor]:
    """``(tokenizer, image processor)`` for ``config.data``; raises when they do not fit ``config.model``.

    With ``config.model.anyres.enabled`` the processor is an ``AnyresProcessor``
    (the model config's pinpoints / max_crops / aspect around the tower's processor).
    """
    tokenizer = make_tokenizer(config.data.tokenizer)
    m = config.model
    if tokenizer.vocab_size > m.llm.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer!r}: vocab ({tokenizer.vocab_size}) exceeds "
                         f"model.llm.vocab_size ({m.llm.vocab_size})")
    if m.fusion != "none" and tokenizer.image_token_id != m.image_token_id:
        raise ValueError(f"tokenizer {config.data.tokenizer!r}: image token id {tokenizer.image_token_id} != "
                         f"model.image_token_id {m.image_token_id}")
    if m.fusion != "none" and config.data.image_size != m.vision.image_size:
        raise ValueError(f"data.image_size={config.data.image_size} != model.vision.image_size={m.vision.image_size}")
    processor = make_image_processor(config.data.processor, config.data.image_size)
    anyres = m.get("anyres")
    if m.fusion != "none" and anyres is not None and anyres.enabled:
        processor = AnyresProcessor.from_config(anyres, processor)
    return tokenizer, processor
