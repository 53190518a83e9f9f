"""Resumable evaluation: the per-sample predictions log ``<out>/<task>.predictions.jsonl``.

Line 1 is a header naming the run that wrote it: the task (scorer, files with
their sizes, every setting that changes prompts or answers), the checkpoint
(path and step) and a hash of the model config and media settings. Every
further line is one generated sample, ``{"id", "prediction", "error"}``;
process 0 appends a global batch's lines and flushes them after each batch.

A rerun resumes: process 0 reads the log and, when its header equals this
run's, its samples are done and are not generated again (their predictions
are scored as read). Otherwise, another task, checkpoint or config, or a run
without a checkpoint identity, the log is started over with a printed line. A
last line cut short by preemption is dropped. Process 0 then sends the done
samples to every process (``multihost_utils.broadcast_one_to_all`` of their
JSON bytes), so all processes skip the same samples and run the same batches
without needing a shared file system. Delete the log to generate again.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

HEADER_KEY = "lavi_jax_predictions"
VERSION = 1


def log_path(out_dir: str, label: str) -> str:
    return os.path.join(out_dir, label.replace("/", "_").replace(os.sep, "_") + ".predictions.jsonl")


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_hash(*parts) -> str:
    """A short sha256 of ``parts`` (ConfigDicts as dicts), stable across processes and runs."""
    plain = [p.to_dict() if hasattr(p, "to_dict") else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sizes(paths) -> dict:
    out = {}
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        if isinstance(p, (str, os.PathLike)) and os.path.isfile(p):
            out[os.path.abspath(p)] = os.path.getsize(p)
    return out


def run_header(task, checkpoint: dict | None, config: str) -> dict:
    """The header of ``task``'s log for this run (``checkpoint``: ``{"path", "step"}`` or None)."""
    settings = {"name": task.name, "label": task.label, "questions": task.questions, "annotations": task.annotations,
                "image_root": task.image_root, "max_new_tokens": task.max_new_tokens, "limit": task.limit,
                "options": task.options, "files": _file_sizes([task.questions, task.annotations])}
    if checkpoint is not None:
        checkpoint = {"path": os.path.abspath(str(checkpoint["path"])), "step": checkpoint.get("step")}
    return _jsonable({HEADER_KEY: VERSION, "task": settings, "checkpoint": checkpoint, "config": config})


def read_log(path: str, header: dict) -> tuple[dict[str, dict], str | None]:
    """``(records by id, None)`` when the log at ``path`` was written by the run ``header`` names, else
    ``({}, why not)``. A line that does not parse ends the log (a write cut short)."""
    if not os.path.exists(path):
        return {}, None
    if header.get("checkpoint") is None:
        return {}, "this run names no checkpoint to check it against"
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        saved = json.loads(lines[0])
    except json.JSONDecodeError:
        return {}, "its header cannot be read"
    if not isinstance(saved, dict) or saved.get(HEADER_KEY) != VERSION:
        return {}, "it has no predictions-log header"
    differ = [k for k in ("task", "checkpoint", "config") if saved.get(k) != header[k]]
    if differ:
        return {}, "written for another " + " and ".join(differ)
    records = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        records[str(record["id"])] = {"prediction": record.get("prediction"), "error": record.get("error")}
    return records, None


def _share(records: dict) -> dict:
    """Process 0's ``records`` on every process."""
    if jax.process_count() == 1:
        return records
    raw = json.dumps(records).encode("utf-8") if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(raw), np.int64)))
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = np.frombuffer(raw, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode("utf-8"))


class PredictionLog:
    """The log of one task run. ``open()`` returns the done samples (same on every process); process 0
    then owns the file and ``append`` writes a batch's samples."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header
        self.writer = jax.process_index() == 0
        self._file = None

    def open(self) -> dict[str, dict]:
        records = {}
        if self.writer:
            records, why = read_log(self.path, self.header)
            if why:
                print(f"{self.path}: {why}; starting over", flush=True)
            elif records:
                print(f"{self.path}: resuming, {len(records)} samples done", flush=True)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:  # header + intact lines only
                f.write(json.dumps(self.header, ensure_ascii=False) + "\n")
                for i, r in records.items():
                    f.write(json.dumps({"id": i, **r}, ensure_ascii=False) + "\n")
            os.replace(self.path + ".tmp", self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        return _share(records)

    def append(self, records: list[dict]) -> None:
        """Writes ``{"id", "prediction", "error"}`` lines (process 0) and flushes them to disk."""
        if self._file is None or not records:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
