"""Reading LLaVA-format record files and resolving media paths inside a root folder."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from lavi_jax import storage


def load_records(path: str) -> list[Any]:
    """Records of a LLaVA ``.json`` (a list of objects) or ``.jsonl`` file.

    JSONL lines are kept as UTF-8 bytes and parsed when the record is used,
    which holds far less memory than parsed objects; a malformed line then
    shows up as a bad record instead of failing the whole file.
    """
    if path.endswith(".jsonl"):
        return [line for line in storage.iter_lines(path) if line.strip()]
    records = json.loads(storage.read_bytes(path).decode("utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def parse_record(record: Any) -> dict[str, Any]:
    """A record as a dict (JSONL lines, as bytes, are parsed here)."""
    if isinstance(record, bytes):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    return record


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def resolve_path(root: str, relative: Any) -> str:
    """``root/relative``, refusing absolute paths and ``..`` escapes.

    The check is lexical: symlinks placed inside the root by whoever prepared
    it are followed, but a record cannot name a file outside the root. ``root``
    may be a URI (``gs://bucket/images``): the result is then a URI too.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"media path must be a non-empty string, got {relative!r}")
    if "\x00" in relative:
        raise ValueError("media path contains a NUL byte")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or _DRIVE.match(relative):
        raise ValueError(f"absolute media path {relative!r} is not allowed")
    normalised = os.path.normpath(relative)
    if normalised in (".", "..") or normalised.startswith(".." + os.sep):
        raise ValueError(f"media path {relative!r} escapes the image root")
    return storage.join(root, normalised)
