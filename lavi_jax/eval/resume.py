"""Resumable evaluation: the per-sample predictions log, the folder ``<out>/<task>.predictions/``.

The log is a folder of whole files (objects in a bucket: ``<out>`` may be a
``gs://`` URI, and objects cannot be appended to), each written once with
:func:`lavi_jax.storage.write_bytes` (one object; on local disk a file renamed
into place, so a reader never sees half of one):

- ``header.json`` names the run that wrote the log: the task (scorer, files
  with their sizes, every setting that changes prompts or answers), the
  checkpoint (path and step) and a hash of the model config and media settings.
- ``part-00000.jsonl``, ``part-00001.jsonl``, ...: one part per global batch,
  written by process 0 after the batch, one line per generated sample,
  ``{"id", "prediction", "error"}``.

A rerun resumes: process 0 reads ``header.json`` and, when it equals this
run's, the parts in order; their samples are done and are not generated again
(their predictions are scored as read), and new parts are numbered after the
last one read. A part that does not parse (or a missing number) ends the log:
it and every part after it are dropped. Otherwise, another task, checkpoint or
config, or a run without a checkpoint identity, the log is started over with a
printed line (the folder is removed, then a new header written). Process 0
then sends the done samples to every process
(``multihost_utils.broadcast_one_to_all`` of their JSON bytes), so all
processes skip the same samples and run the same batches without needing a
shared file system. Delete the folder to generate again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from lavi_jax import storage

HEADER_KEY = "lavi_jax_predictions"
VERSION = 2  # 1: one appended predictions.jsonl file; 2: a folder of header.json and numbered parts
HEADER = "header.json"
_PART = re.compile(r"^part-(\d+)\.jsonl$")
READ_THREADS = 16  # parts read concurrently (one request each on a bucket)


def log_dir(out_dir: str, label: str) -> str:
    """``<out_dir>/<label>.predictions`` (``/`` in a label as ``_``)."""
    return storage.join(out_dir, label.replace("/", "_").replace(os.sep, "_") + ".predictions")


def part_name(number: int) -> str:
    return f"part-{number:05d}.jsonl"


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_hash(*parts) -> str:
    """A short sha256 of ``parts`` (ConfigDicts as dicts), stable across processes and runs."""
    plain = [p.to_dict() if hasattr(p, "to_dict") else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sizes(paths) -> dict:
    out = {}
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        if isinstance(p, (str, os.PathLike)) and storage.isfile(os.fspath(p)):
            out[storage.absolute(os.fspath(p))] = storage.size(os.fspath(p))
    return out


def run_header(task, checkpoint: dict | None, config: str) -> dict:
    """The header of ``task``'s log for this run (``checkpoint``: ``{"path", "step"}`` or None)."""
    settings = {"name": task.name, "label": task.label, "questions": task.questions, "annotations": task.annotations,
                "image_root": task.image_root, "max_new_tokens": task.max_new_tokens, "limit": task.limit,
                "options": task.options, "files": _file_sizes([task.questions, task.annotations])}
    if checkpoint is not None:
        checkpoint = {"path": storage.absolute(str(checkpoint["path"])), "step": checkpoint.get("step")}
    return _jsonable({HEADER_KEY: VERSION, "task": settings, "checkpoint": checkpoint, "config": config})


def _parts(directory: str) -> dict[int, str]:
    """Part number -> file name of the parts in ``directory``."""
    try:
        names = storage.listdir(directory)
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): n for n in names if (m := _PART.match(n))}


def _parse_part(raw: bytes) -> list[dict] | None:
    """A part's records, or None when it does not parse."""
    try:
        records = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not all(isinstance(r, dict) and "id" in r for r in records):
        return None
    return records


def read_log(directory: str, header: dict) -> tuple[dict[str, dict], str | None, int]:
    """``(records by id, None, parts read)`` when the log in ``directory`` was written by the run ``header`` names,
    else ``({}, why not, 0)`` (``why`` None too when there is no log). Parts are read in order from
    ``part-00000.jsonl``; the first missing or unparseable one ends the log."""
    header_path = storage.join(directory, HEADER)
    if not storage.exists(header_path):
        return {}, ("it has no header" if _parts(directory) else None), 0
    if header.get("checkpoint") is None:
        return {}, "this run names no checkpoint to check it against", 0
    try:
        saved = json.loads(storage.read_bytes(header_path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, "its header cannot be read", 0
    if not isinstance(saved, dict) or saved.get(HEADER_KEY) != VERSION:
        return {}, "it has no predictions-log header", 0
    differ = [k for k in ("task", "checkpoint", "config") if saved.get(k) != header[k]]
    if differ:
        return {}, "written for another " + " and ".join(differ), 0
    parts = _parts(directory)
    names = []
    while len(names) in parts:  # 0, 1, 2, ... up to the first missing number
        names.append(parts[len(names)])
    with concurrent.futures.ThreadPoolExecutor(max(min(READ_THREADS, len(names)), 1)) as pool:
        raws = list(pool.map(lambda n: storage.read_bytes(storage.join(directory, n)), names))
    records, read = {}, 0
    for raw in raws:
        part = _parse_part(raw)
        if part is None:
            break
        for record in part:
            records[str(record["id"])] = {"prediction": record.get("prediction"), "error": record.get("error")}
        read += 1
    return records, None, read


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
    """The log of one task run, in folder ``directory``. ``open()`` returns the done samples (same on every
    process); process 0 then owns the folder and ``append`` writes a batch's samples as the next part."""

    def __init__(self, directory: str, header: dict):
        self.directory, self.header = directory, header
        self.writer = jax.process_index() == 0
        self.next_part: int | None = None

    @property
    def path(self) -> str:
        return self.directory

    def open(self) -> dict[str, dict]:
        records = {}
        if self.writer:
            records, why, read = read_log(self.directory, self.header)
            if why:
                print(f"{self.directory}: {why}; starting over", flush=True)
            elif records:
                print(f"{self.directory}: resuming, {len(records)} samples done", flush=True)
            if why or not storage.exists(storage.join(self.directory, HEADER)):
                storage.remove(self.directory)
                storage.write_json(storage.join(self.directory, HEADER), self.header, ensure_ascii=False)
            else:  # parts after the last one read (a part cut short, or after a gap) are dropped
                for number, name in sorted(_parts(self.directory).items()):
                    if number >= read:
                        storage.remove(storage.join(self.directory, name))
            self.next_part = read
        return _share(records)

    def append(self, records: list[dict]) -> None:
        """Writes ``{"id", "prediction", "error"}`` lines (process 0) as the next part, one whole file."""
        if self.next_part is None or not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        storage.write_bytes(storage.join(self.directory, part_name(self.next_part)), data)
        self.next_part += 1

    def close(self) -> None:
        self.next_part = None
