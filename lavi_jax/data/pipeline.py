"""grain input pipelines for training and evaluation.

Training::

    records -> this process's shard (every process_count-th record)
            -> seeded shuffle, reshuffled each epoch, repeated forever
            -> decode + tokenise in a thread pool (bad records become markers)
            -> skip and report bad records (budget: max_bad_records per process)
            -> batch, padded to a sequence bucket (see ``collate``), or with
               ``config.packing``: pack into rows of max(seq_buckets) tokens
               (see ``packing``), then batch the rows

Evaluation visits each record once in file order, turns bad records into
padding examples (``valid`` False) and pads the last batch, so every process
yields the same number of batches.

The iterators are ``grain.DatasetIterator``s: ``get_state()`` is a
JSON-serialisable dict (pipeline position and bad-record tally) that grain's
orbax handlers save, and ``set_state()`` resumes at the same element.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import numpy as np

from lavi_jax.data.anyres import AnyresProcessor
from lavi_jax.data.bad_records import BadRecord, BadRecordTracker
from lavi_jax.data.collate import Collator
from lavi_jax.data.image_processor import ImageProcessor, make_image_processor
from lavi_jax.data.llava import ExampleBuilder
from lavi_jax.data.packing import PackIterDataset, RowLayout, stack_rows
from lavi_jax.data.records import load_records
from lavi_jax.data.tokenizer import Tokenizer, make_tokenizer


class DataIterator(grain.DatasetIterator):
    """A grain pipeline iterator that also checkpoints its bad-record tally.

    ``bad_records`` holds the count and the reports (id, reason) so far.
    """

    def __init__(self, parent: grain.DatasetIterator, bad_records: BadRecordTracker):
        super().__init__(parent)
        self.bad_records = bad_records

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "bad_records": self.bad_records.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.bad_records.set_state(state["bad_records"])


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        return jax.process_index(), jax.process_count()
    return process_index, process_count


def _components(config, tokenizer, image_processor) -> tuple[Tokenizer, ImageProcessor]:
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config.tokenizer)
    if image_processor is None:
        image_processor = make_image_processor(config.processor, config.image_size)
    return tokenizer, image_processor


def _builder(config, tokenizer, image_processor) -> ExampleBuilder:
    return ExampleBuilder(
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_root=config.image_root,
        max_images=config.max_images,
        num_frames=config.num_frames,
        max_length=max(config.seq_buckets),
        max_image_pixels=config.get("max_image_pixels"),
    )


def _collator(config, tokenizer, image_processor, pad_to_max_bucket, process_count, eval_mode) -> Collator:
    anyres = isinstance(image_processor, AnyresProcessor)
    return Collator(
        seq_buckets=tuple(sorted(int(b) for b in config.seq_buckets)),
        max_images=config.max_images,
        num_frames=max(config.num_frames, image_processor.num_frames) if anyres else config.num_frames,
        image_size=image_processor.output_size,
        pad_id=tokenizer.pad_id,
        pad_to_max_bucket=process_count > 1 if pad_to_max_bucket is None else pad_to_max_bucket,
        eval_mode=eval_mode,
        anyres=anyres,
    )


def _read_options(config, batch_size: int) -> grain.ReadOptions:
    threads = int(config.get("num_threads", 8))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 2 * batch_size))


class _WithIndex:
    """Pairs each record with its position in the file (grain indexes past the end modulo length)."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, index, record):
        return index % self.num_records, record


class _Build:
    def __init__(self, builder: ExampleBuilder):
        self.builder = builder

    def __call__(self, indexed):
        return self.builder(*indexed)


class _Rebuild:
    """Record index -> example (None, after reporting, for a bad one): the packer's open rows on restore."""

    def __init__(self, records, builder: ExampleBuilder, tracker: BadRecordTracker):
        self.records, self.builder, self.tracker = records, builder, tracker

    def __call__(self, index: int):
        example = self.builder(index, self.records[index])
        return example if self.tracker.accept(example) else None


def make_train_iterator(
    config,
    tokenizer: Tokenizer | None = None,
    image_processor: ImageProcessor | None = None,
    *,
    batch_size: int,
    seed: int = 0,
    json_path: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_to_max_bucket: bool | None = None,
) -> DataIterator:
    """Endless, shuffled iterator of training batches for this process.

    Args:
      config: the data config (``config.data``, defaults in ``lavi_jax.config.data``).
      tokenizer, image_processor: built from ``config`` when None; pass an
        ``AnyresProcessor`` (``make_components`` builds one from
        ``config.model.anyres``) for anyres tiles and ``image_sizes``.
      batch_size: per-process batch size.
      seed: shuffle seed (the same on every process; shards differ).
      json_path: records file; defaults to ``config.train_json``.
      process_index, process_count: shard; default ``jax.process_index()`` /
        ``jax.process_count()``.
      pad_to_max_bucket: pad every batch to the largest bucket. Defaults to
        True with several processes, whose global batch needs one T; with
        False, agree on T across processes and use ``collate.pad_batch``
        (the training loop does: ``lavi_jax.train.loop.global_bucket``).

    With ``config.packing`` each of the ``batch_size`` rows packs several
    records (``max(seq_buckets)`` tokens, ``pack_max_images`` items per row, default ``max_images``; see
    ``packing``) and the batch adds ``segment_ids``, ``positions`` and the
    host-only ``record_index`` [B, T].
    """
    tokenizer, image_processor = _components(config, tokenizer, image_processor)
    process_index, process_count = _process(process_index, process_count)
    records = load_records(json_path or config.train_json)
    if not records:
        raise ValueError("no training records")
    shard = grain.MapDataset.source(records).map_with_index(_WithIndex(len(records)))[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no training records")
    tracker = BadRecordTracker(config.max_bad_records)
    builder = _builder(config, tokenizer, image_processor)
    dataset = (
        shard.shuffle(seed=seed)
        .repeat(None)
        .map(_Build(builder))
        .to_iter_dataset(_read_options(config, batch_size))
        .filter(tracker.accept)
    )
    if config.get("packing", False):
        anyres = isinstance(image_processor, AnyresProcessor)
        frames = max(config.num_frames, image_processor.num_frames) if anyres else config.num_frames
        row_items = int(config.get("pack_max_images", 0) or config.max_images)
        layout = RowLayout(max(int(b) for b in config.seq_buckets), row_items, int(frames),
                           tuple(image_processor.output_size), tokenizer.pad_id, anyres)
        dataset = PackIterDataset(dataset, layout, config.get("pack_window", 8), _Rebuild(records, builder, tracker))
        dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=stack_rows)
    else:
        dataset = dataset.batch(
            batch_size,
            drop_remainder=True,
            batch_fn=_collator(config, tokenizer, image_processor, pad_to_max_bucket, process_count, False),
        )
    return DataIterator(iter(dataset), tracker)


_PADDING = "padding"  # marks slots past the end of the records


class _EvalSlot:
    """Slot ``i`` of this process -> example of record ``process_index + i * process_count``."""

    def __init__(self, records, builder: ExampleBuilder, process_index: int, process_count: int):
        self.records, self.builder = records, builder
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, slot: int):
        index = self.process_index + slot * self.process_count
        if index >= len(self.records):
            return _PADDING  # up to a whole number of batches
        return self.builder(index, self.records[index])


class _EvalCheck:
    """Reports bad records and replaces them (and padding) with invalid examples."""

    def __init__(self, tracker: BadRecordTracker, pad_id: int):
        self.tracker, self.pad_id = tracker, pad_id

    def __call__(self, element):
        if isinstance(element, BadRecord):
            self.tracker.report(element)
            element = _PADDING
        if isinstance(element, str) and element == _PADDING:
            return {
                "input_ids": np.asarray([self.pad_id], np.int32),
                "loss_mask": np.zeros(1, np.int32),
                "pixel_values": np.zeros((0,), np.float32),
                "item_mask": np.zeros((0,), bool),
                "index": -1,
                "valid": False,
            }
        return element


def num_eval_batches(num_records: int, batch_size: int, process_count: int) -> int:
    """Batches each process yields for ``num_records`` records."""
    return math.ceil(math.ceil(num_records / process_count) / batch_size)


def make_eval_iterator(
    config,
    tokenizer: Tokenizer | None = None,
    image_processor: ImageProcessor | None = None,
    *,
    batch_size: int,
    json_path: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_to_max_bucket: bool | None = None,
) -> DataIterator:
    """One pass over the evaluation records, in lockstep across processes.

    Each process yields ``num_eval_batches(N, batch_size, process_count)``
    batches with the training contract plus ``valid`` bool [B] and ``index``
    int32 [B] (record position in the file, -1 for padding). Bad records are
    reported against ``max_bad_records`` and come out as ``valid`` False.
    Arguments are as for ``make_train_iterator``; ``json_path`` defaults to
    ``config.eval_json``.
    """
    tokenizer, image_processor = _components(config, tokenizer, image_processor)
    process_index, process_count = _process(process_index, process_count)
    records = load_records(json_path or config.eval_json)
    if not records:
        raise ValueError("no evaluation records")
    slots = num_eval_batches(len(records), batch_size, process_count) * batch_size
    builder = _builder(config, tokenizer, image_processor)
    tracker = BadRecordTracker(config.max_bad_records)
    dataset = (
        grain.MapDataset.range(slots)
        .map(_EvalSlot(records, builder, process_index, process_count))
        .to_iter_dataset(_read_options(config, batch_size))
        .map(_EvalCheck(tracker, tokenizer.pad_id))
        .batch(
            batch_size,
            batch_fn=_collator(config, tokenizer, image_processor, pad_to_max_bucket, process_count, True),
        )
    )
    return DataIterator(iter(dataset), tracker)
