"""Data: LLaVA-format records -> static-shape batches of tokens and pixels.

Entry points: ``make_train_iterator`` / ``make_eval_iterator`` (grain pipelines),
``make_components`` (the run's tokenizer and image processor, checked against the
model), ``make_tokenizer``, ``make_image_processor``. The batch layout is
``batch.BatchSpec``; the defaults of ``config.data`` are in ``lavi_jax.config``.

Names load their submodule on first use, so importing one piece (``data.batch``)
needs neither grain nor PyAV.
"""

import importlib

_EXPORTS = {  # name -> submodule
    "BadRecord": "bad_records",
    "BadRecordBudgetExceeded": "bad_records",
    "BadRecordTracker": "bad_records",
    "BatchSpec": "batch",
    "bucket_length": "batch",
    "Collator": "collate",
    "pad_batch": "collate",
    "make_components": "components",
    "ImageProcessor": "image_processor",
    "load_image": "image_processor",
    "make_image_processor": "image_processor",
    "ExampleBuilder": "llava",
    "MediaLoader": "media",
    "inside_root": "media",
    "media_items": "media",
    "DataIterator": "pipeline",
    "make_eval_iterator": "pipeline",
    "make_train_iterator": "pipeline",
    "num_eval_batches": "pipeline",
    "load_records": "records",
    "resolve_path": "records",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "make_tokenizer": "tokenizer",
    "load_video": "video",
    "sample_indices": "video",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
