"""Storage: every file lavi_jax reads or writes, on local disk or behind a URI (``gs://``, ``s3://``, ...).

One layer for every path, through fsspec: a local path and a ``gs://bucket/key``
URI go through the same calls (``gcsfs`` serves ``gs://``; any other protocol
fsspec knows, e.g. ``s3://`` with ``s3fs`` installed, works for reading and
writing files). fsspec rather than etils ``epath``: ranged reads
(``read_bytes(path, start, end)``, the safetensors import reads each tensor's
bytes only) and every protocol fsspec serves, while orbax keeps its own
``epath`` (which, without TensorFlow, is gcsfs too). Orbax checkpoints are
written to local paths and ``gs://`` only.

A URI stays a URI: it is never ``abspath``-ed. Objects cannot be appended to,
so writes are whole files (:func:`write_bytes`: one object, or on local disk a
file written beside and renamed, so a reader never sees half of it).

Against a GCS-compatible emulator set ``STORAGE_EMULATOR_HOST`` (gcsfs,
google-cloud-storage) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, which
orbax writes arrays with); on a real pod application default credentials are
used. gcsfs retries transient failures with backoff; each retry is logged here
as a warning (logger ``lavi_jax.storage``).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import urllib.parse
import uuid
from typing import Any, Iterator

# gcsfs >= 2026.10 probes a gRPC bucket-type API first; emulators do not serve it (3 x 60 s of timeouts).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

log = logging.getLogger("lavi_jax.storage")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """A storage operation that failed; the message names the path or URI and what failed."""


# ----------------------------------------------------------------------------- names


def is_uri(path: Any) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a local path."""
    return isinstance(path, str) and bool(_URI.match(path))


def protocol(path: str) -> str:
    m = _URI.match(path) if isinstance(path, str) else None
    return m.group(1).lower() if m else "file"


def join(base: str, *parts: str) -> str:
    """``base/part/...``: '/'-joined for a URI, ``os.path.join`` for a local path."""
    base = os.fspath(base)
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is (without a trailing '/')."""
    path = os.fspath(path)
    if is_uri(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(path)


def parent(path: str) -> str:
    path = absolute(path)
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(path)


def basename(path: str) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.basename(path) if is_uri(path) else os.path.basename(path)


# ----------------------------------------------------------------------------- the filesystem behind a path


@functools.lru_cache(maxsize=None)
def _filesystem(proto: str) -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem(proto)
    _log_retries()
    return fs


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    path = os.fspath(path)
    fs = _filesystem(protocol(path))
    return fs, (fs._strip_protocol(path) if is_uri(path) else os.path.abspath(path))


def is_local(path: str) -> bool:
    return protocol(os.fspath(path)) in ("file", "local")


def _fail(path: str, what: str, e: BaseException) -> StorageError:
    if isinstance(e, StorageError):
        return e
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError):
        err = FileNotFoundError(f"{path}: {what}: not found")
        return err  # a FileNotFoundError, so callers that skip missing inputs keep doing so
    return StorageError(f"{path}: {what} failed ({type(e).__name__}: {reason})")


@contextlib.contextmanager
def _errors(path: str, what: str):
    try:
        yield
    except (OSError, ValueError, RuntimeError, TimeoutError) as e:
        raise _fail(path, what, e) from e
    except Exception as e:  # client libraries' own error types (aiohttp, google.auth, botocore)
        if type(e).__module__.split(".")[0] in ("aiohttp", "google", "botocore", "requests", "gcsfs", "s3fs"):
            raise _fail(path, what, e) from e
        raise


# ----------------------------------------------------------------------------- queries


def exists(path: str) -> bool:
    fs, p = _fs(path)
    with _errors(path, "exists"):
        return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = _fs(path)
    with _errors(path, "isdir"):
        return fs.isdir(p)


def isfile(path: str) -> bool:
    fs, p = _fs(path)
    with _errors(path, "isfile"):
        return fs.isfile(p)


def size(path: str) -> int:
    fs, p = _fs(path)
    with _errors(path, "size"):
        return int(fs.size(p))


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of directory ``path``, sorted."""
    fs, p = _fs(path)
    with _errors(path, "list"):
        entries = fs.ls(p, detail=False)
    here = p.rstrip("/")
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != here})


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern`` (``*``, ``?``, ``[...]``), sorted; URIs keep their scheme."""
    fs, p = _fs(pattern)
    with _errors(pattern, "glob"):
        found = fs.glob(p)
    if is_uri(pattern):
        return sorted(f"{protocol(pattern)}://{f}" for f in found)
    return sorted(found)


# ----------------------------------------------------------------------------- reading


def open(path: str, mode: str = "rb", **kwargs):  # noqa: A001 - the storage layer's open
    """A file object for ``path`` (read modes; use :func:`write_bytes` to write whole files)."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"storage.open is for reading; write whole files with storage.write_bytes ({path})")
    fs, p = _fs(path)
    with _errors(path, "open"):
        return fs.open(p, mode, **kwargs)


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of ``path`` (``[start, end)`` only, read as one ranged request, when given)."""
    fs, p = _fs(path)
    with _errors(path, "read" if start is None else f"read of bytes [{start}, {end})"):
        return fs.cat_file(p, start=start, end=end)


def read_text(path: str, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def read_json(path: str) -> Any:
    raw = read_bytes(path)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- writing


def makedirs(path: str) -> None:
    """Creates a local directory (and parents); object stores have no directories to create."""
    if is_local(path):
        with _errors(path, "mkdir"):
            os.makedirs(_fs(path)[1], exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` whole: one object, or a local file written beside it and renamed over it."""
    fs, p = _fs(path)
    with _errors(path, "write"):
        if is_local(path):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            with builtins.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        else:
            fs.pipe_file(p, data)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def write_json(path: str, value: Any, **kwargs) -> None:
    write_text(path, json.dumps(value, **kwargs))


def copy(src: str, dst: str) -> None:
    """Copies one file, between any two places (local, bucket)."""
    write_bytes(dst, read_bytes(src))


def remove(path: str) -> None:
    """Removes a file or a whole directory tree; nothing when it does not exist."""
    fs, p = _fs(path)
    with _errors(path, "remove"):
        if fs.exists(p):
            fs.rm(p, recursive=True)


# ----------------------------------------------------------------------------- local copies for libraries


def local_dir(path: str, names: tuple[str, ...] | None = None) -> str:
    """A local directory holding ``path``'s files (``names`` only, when given, those present): ``path`` itself
    when local, else a copy in a per-user cache keyed by the URI (for libraries that read only local files,
    such as ``transformers.AutoTokenizer``)."""
    if is_local(path):
        return _fs(path)[1]
    key = hashlib.sha256(absolute(path).encode()).hexdigest()[:16]
    dst = os.path.join(tempfile.gettempdir(), f"lavi_jax-{os.getuid()}", key)
    files = [n for n in listdir(path) if (names is None or n in names) and isfile(join(path, n))]
    os.makedirs(dst, exist_ok=True)
    for n in files:
        data = read_bytes(join(path, n))
        target = os.path.join(dst, n)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with builtins.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return dst


def copy_tree(src: str, dst: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Copies the files (not subfolders) of directory ``src`` into ``dst`` (``names`` only, when given).
    Returns the copied names."""
    files = [n for n in listdir(src) if (names is None or n in names) and isfile(join(src, n))]
    for n in files:
        if is_local(src) and is_local(dst):
            os.makedirs(_fs(dst)[1], exist_ok=True)
            shutil.copy2(_fs(join(src, n))[1], _fs(join(dst, n))[1])
        else:
            copy(join(src, n), join(dst, n))
    return files


# ----------------------------------------------------------------------------- up-front checks


def _endpoint(path: str) -> tuple[str, int] | None:
    """(host, port) a ``gs://`` request goes to (the emulator's when ``STORAGE_EMULATOR_HOST`` is set)."""
    if protocol(path) not in ("gs", "gcs"):
        return None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator in ("", "default"):
        return "storage.googleapis.com", 443
    url = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
    return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)


def _check_reachable(path: str, timeout: float = 10.0) -> None:
    endpoint = _endpoint(path)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as e:
        raise StorageError(f"{path}: storage endpoint {endpoint[0]}:{endpoint[1]} is unreachable ({e})") from None


def _check_credentials(path: str) -> None:
    if protocol(path) not in ("gs", "gcs") or os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        raise StorageError(
            f"{path}: no Google Cloud credentials ({str(e).splitlines()[0]}); on a GCP VM or TPU pod the VM's service "
            "account is used, elsewhere run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS") from None


def check_writable(directory: str) -> None:
    """Fails with one line naming ``directory`` unless a file can be written and removed there (a probe, as MaxText
    does before training: an unreachable endpoint, a missing bucket, missing credentials or permissions)."""
    _check_reachable(directory)
    _check_credentials(directory)
    if protocol(directory) in ("gs", "gcs"):
        bucket = _fs(directory)[1].split("/")[0]
        fs = _filesystem("gs")
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(f"{directory}: bucket {bucket!r} does not exist") from None
        except Exception as e:
            raise _fail(directory, f"access to bucket {bucket!r}", e) from None
    probe = join(directory, f".lavi_jax_probe-{uuid.uuid4().hex[:12]}")
    try:
        makedirs(directory)
        write_bytes(probe, b"probe")
        remove(probe)
    except (OSError, ValueError) as e:
        raise StorageError(f"{directory}: cannot write there ({e})") from None


def check_readable(path: str) -> None:
    """Fails with one line naming ``path`` unless it exists (file or directory) and its store answers."""
    _check_reachable(path)
    if not exists(path):
        raise FileNotFoundError(f"{path}: not found")


# ----------------------------------------------------------------------------- retries, logged


class _RetryLog(logging.Filter):
    """gcsfs logs its retries at debug level; this passes them on as warnings (and drops its other debug lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "retrying after exception" in message or "out of retries" in message:
            log.warning("storage request %s", message)
            return False
        return record.levelno >= logging.WARNING


def _log_retries() -> None:
    logger = logging.getLogger("gcsfs")  # the logger gcsfs's retry loop writes to
    if "gcsfs" not in logging.Logger.manager.loggerDict or any(isinstance(f, _RetryLog) for f in logger.filters):
        return
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("gcsfs.") and isinstance(child, logging.Logger) and child.level == logging.NOTSET:
            child.setLevel(logging.WARNING)  # children keep their quiet default although the parent says DEBUG
    logger.addFilter(_RetryLog())
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)


def iter_lines(path: str) -> Iterator[bytes]:
    """The lines of ``path`` as bytes (newline kept), read in blocks."""
    with open(path, "rb") as f:
        yield from f


@contextlib.contextmanager
def write_file(path: str):
    """A binary file object to write ``path`` through, whole and in parts (for files too big to hold in memory):
    local, a file beside ``path`` renamed over it at the end; a URI, a temp file on local disk uploaded in one
    request (``put_file``) at the end. Nothing is written when the block raises."""
    fs, p = _fs(path)
    local = is_local(path)
    with _errors(path, "write"):
        if local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            fd, tmp = tempfile.mkstemp(prefix="lavi_jax-upload-")
            os.close(fd)
    try:
        with builtins.open(tmp, "wb") as f:
            yield f
        with _errors(path, "write"):
            if local:
                os.replace(tmp, p)
            else:
                fs.put_file(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def relpath(path: str, root: str) -> str:
    """``path`` relative to ``root``, lexically (no filesystem access; ``..`` parts when ``path`` lies outside it).
    Local paths as ``os.path.relpath`` of their absolute forms; URIs by their ``bucket/key`` parts, a URI against a
    root of another scheme (or a local path against a URI root) starting with ``..`` as outside it."""
    path, root = os.fspath(path), os.fspath(root)
    if not is_uri(path) and not is_uri(root):
        return os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if protocol(path) != protocol(root):
        return posixpath.join("..", _URI.sub("", path) if is_uri(path) else path.lstrip("/"))
    key = posixpath.normpath("/" + _URI.sub("", path))
    return posixpath.relpath(key, posixpath.normpath("/" + _URI.sub("", root)))
