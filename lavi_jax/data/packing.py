"""Packing examples into rows of ``seq_len`` tokens: several conversations per row, each with its own images.

A first-fit packer with a window of ``window`` open rows. Each example (in
stream order) goes into the oldest open row where both budgets hold: tokens
(``seq_len``) and visual items (``max_items``). When it fits none, a new row is
opened; if ``window`` rows are already open, the fullest (most tokens; the
oldest on ties) is emitted first. A row that is exactly full is emitted at once.

An emitted row follows :class:`lavi_jax.data.batch.BatchSpec` with
``packed=True``: ``segment_ids`` 1, 2, ... per conversation (0 on padding),
``positions`` restarting at 0 per segment, ``loss_mask`` 0 at every segment's
first token, and the row's items in segment order (the k-th ``<image>`` of the
row is item k). ``record_index`` int32 [T] (host only) is each token's record
position in the file, -1 on padding.

grain's ``FirstFitPackIterDataset`` is not used: it flushes all its bins as soon
as one element fits none, which leaves every bin's tail empty (pad well above
5 % at LLaVA lengths), and it cannot zero ``loss_mask`` at segment starts.

Checkpoints: the state is the parent's state plus the record indices of the
rows not yet emitted; ``set_state`` rebuilds those examples with ``rebuild``
(``index -> example``), so resuming yields the same rows as an uninterrupted run.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np

from lavi_jax.data.batch import BatchSpec

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The static shape of one packed row."""

    seq_len: int
    max_items: int
    num_frames: int
    image_size: tuple[int, int]
    pad_id: int
    anyres: bool = False  # rows carry image_sizes

    def build(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """One packed row of ``examples`` (which fit the budgets)."""
        spec = BatchSpec(1, self.seq_len, self.max_items, self.num_frames, tuple(self.image_size), packed=True,
                         anyres=self.anyres)
        row = {k: v[0] for k, v in spec.zeros(self.pad_id).items()}
        row["record_index"] = np.full(self.seq_len, -1, np.int32)
        t = k = 0
        for segment, e in enumerate(examples, start=1):
            n = len(e["input_ids"])
            row["input_ids"][t:t + n] = e["input_ids"]
            row["attention_mask"][t:t + n] = 1
            row["loss_mask"][t:t + n] = e["loss_mask"]
            row["loss_mask"][t] = 0.0  # never predict a conversation's first token from the previous one
            row["segment_ids"][t:t + n] = segment
            row["positions"][t:t + n] = np.arange(n, dtype=np.int32)
            row["record_index"][t:t + n] = e["index"]
            items = num_items(e)
            if items:
                frames = e["item_mask"].shape[1]
                row["pixel_values"][k:k + items, :frames] = e["pixel_values"]
                row["item_mask"][k:k + items, :frames] = e["item_mask"]
                if self.anyres:
                    row["image_sizes"][k:k + items] = e["image_sizes"]
            t, k = t + n, k + items
        if t > self.seq_len or k > self.max_items:
            raise ValueError(f"row of {t} tokens and {k} items exceeds ({self.seq_len}, {self.max_items})")
        return row


def num_items(example: Example) -> int:
    mask = example["item_mask"]
    return int(mask.shape[0]) if mask.ndim == 2 else 0


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``batch_fn`` for packed rows: stacks each field into [B, ...]."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Row:
    def __init__(self):
        self.examples: list[Example] = []
        self.tokens = 0
        self.items = 0

    def add(self, example: Example) -> None:
        self.examples.append(example)
        self.tokens += len(example["input_ids"])
        self.items += num_items(example)


class PackIterator(grain.DatasetIterator):
    """Iterator of packed rows; see the module docstring."""

    def __init__(self, parent: grain.DatasetIterator, layout: RowLayout, window: int,
                 rebuild: Callable[[int], Example | None]):
        super().__init__(parent)
        self.layout, self.window, self.rebuild = layout, int(window), rebuild
        if self.window < 1:
            raise ValueError(f"pack_window must be >= 1, got {window}")
        self._open: list[_Row] = []
        self._ready: collections.deque[_Row] = collections.deque()
        self._exhausted = False

    def _fits(self, row: _Row, example: Example) -> bool:
        return (row.tokens + len(example["input_ids"]) <= self.layout.seq_len
                and row.items + num_items(example) <= self.layout.max_items)

    def _place(self, example: Example) -> None:
        if len(example["input_ids"]) > self.layout.seq_len or num_items(example) > self.layout.max_items:
            raise ValueError(f"record #{example['index']} exceeds a row's budgets")
        for i, row in enumerate(self._open):
            if self._fits(row, example):
                row.add(example)
                if row.tokens == self.layout.seq_len:
                    self._ready.append(self._open.pop(i))
                return
        if len(self._open) >= self.window:
            fullest = max(range(len(self._open)), key=lambda i: (self._open[i].tokens, -i))
            self._ready.append(self._open.pop(fullest))
        row = _Row()
        row.add(example)
        self._open.append(row)

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._exhausted:
                if not self._open:
                    raise StopIteration
                self._ready.append(self._open.pop(0))
                break
            try:
                self._place(next(self._parent))
            except StopIteration:
                self._exhausted = True
        return self.layout.build(self._ready.popleft().examples)

    def get_state(self) -> dict[str, Any]:
        def indices(rows):
            return [[int(e["index"]) for e in r.examples] for r in rows]

        return {"parent": self._parent.get_state(), "open": indices(self._open), "ready": indices(self._ready),
                "exhausted": self._exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])

        def rows(lists):
            out = []
            for indices in lists:
                row = _Row()
                for index in indices:
                    example = self.rebuild(int(index))
                    if example is not None:  # a record that went bad since the save is reported and dropped
                        row.add(example)
                if row.examples:
                    out.append(row)
            return out

        self._open = rows(state["open"])
        self._ready = collections.deque(rows(state["ready"]))
        self._exhausted = bool(state.get("exhausted", False))


class PackIterDataset(grain.IterDataset):
    """grain transform: an ``IterDataset`` of examples -> one of packed rows (``PackIterator``)."""

    def __init__(self, parent: grain.IterDataset, layout: RowLayout, window: int,
                 rebuild: Callable[[int], Example | None]):
        super().__init__(parent)
        self.layout, self.window, self.rebuild = layout, window, rebuild

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self.layout, self.window, self.rebuild)
