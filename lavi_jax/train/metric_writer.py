"""Metric sinks: ``<workdir>/metrics.jsonl``, TensorBoard event files and a tqdm bar (process 0 only).

The workdir may be a bucket, whose objects cannot be appended to: ``metrics.jsonl``
is held in memory (what an earlier run wrote first) and written whole, at most
once per ``min_interval`` seconds (GCS takes about one write per object per
second), at every :meth:`flush` (the loop flushes before each checkpoint) and on
close. TensorBoard event files at a URI are uploaded whole at each of tensorboardX's
flushes (:class:`_EventObject`, through :mod:`lavi_jax.storage`).
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import jax

from lavi_jax import storage


class _EventObject:
    """tensorboardX's record sink for a URI: the events so far, written whole at each flush, never after close
    (tensorboardX's own GCS sink uploads again when garbage-collected, at interpreter exit included)."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = path, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        if not self.closed:
            storage.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()
        self.closed = True


class _EventObjects:
    def open(self, path: str) -> _EventObject:
        return _EventObject(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no directories."""


def _register_event_sinks() -> None:
    from tensorboardX import record_writer

    for scheme in ("gs", "gcs", "s3"):
        record_writer.register_writer_factory(scheme, _EventObjects())


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int | None = None, initial_step: int = 0, desc: str = "train",
                 min_interval: float = 1.0):
        self.active = jax.process_index() == 0
        self.bar = None
        self.tb = None
        self.path = storage.join(workdir, "metrics.jsonl")
        self.min_interval, self._written, self._dirty = min_interval, 0.0, False
        if not self.active:
            return
        self.lines = storage.read_text(self.path).splitlines(keepends=True) if storage.exists(self.path) else []
        if self.lines and not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"
        from tensorboardX import SummaryWriter  # process 0 only: the other processes never load it

        _register_event_sinks()
        self.tb = SummaryWriter(storage.join(workdir, "tensorboard"))
        if total_steps:
            from tqdm import tqdm  # process 0 only

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                            disable=os.environ.get("LAVI_NO_PROGRESS") == "1")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        self.lines.append(json.dumps({"step": int(step), **clean}) + "\n")
        self._dirty = True
        if time.monotonic() - self._written >= self.min_interval:
            self.flush()
        for k, v in clean.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, int(step))
        if self.bar is not None and "loss" in clean:
            self.bar.set_postfix(loss=f"{clean['loss']:.4f}")

    def flush(self) -> None:
        """Writes ``metrics.jsonl`` whole when it has lines not yet written."""
        if self.active and self._dirty:
            storage.write_text(self.path, "".join(self.lines))
            self._written, self._dirty = time.monotonic(), False

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.flush()
