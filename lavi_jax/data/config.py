"""The data config (``config.data``): one default and one comment per knob."""

from __future__ import annotations

import ml_collections


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Data pipeline settings; keyword arguments override the defaults."""
    c = ml_collections.ConfigDict()
    c.train_json = ""  # LLaVA .json / .jsonl with the training records
    c.eval_json = ""  # held-out records in the same format ("" = none)
    c.image_root = ""  # folder that the records' "image" / "video" paths are relative to
    c.tokenizer = "byte"  # "byte" (built-in demo tokenizer) or a local HF tokenizer directory
    c.processor = "siglip"  # "siglip" | "clip" | a HF directory with preprocessor_config.json
    c.image_size = 384  # processor output side (must match the vision tower)
    c.max_images = 1  # N_items: images / videos per sample; fewer are padded with item_mask False
    c.num_frames = 1  # N_frames: frames sampled uniformly per video; an image uses frame 0
    c.seq_buckets = (512, 1024, 2048)  # padded sequence lengths; longer samples are skipped as bad
    c.max_bad_records = 100  # distinct bad records skipped per process before the run stops
    c.max_image_pixels = 89_478_485  # larger images are rejected (decompression bombs); PIL's default
    c.num_threads = 8  # decoding threads per process
    c.update(overrides)
    return c
