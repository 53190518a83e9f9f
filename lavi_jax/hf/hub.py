"""Hugging Face Hub ids where an HF directory goes: ``Qwen/Qwen2-7B-Instruct`` (or ``org/name@revision``).

:func:`resolve` turns a source into a path the importer reads: a local path or
URI that exists stays as it is; ``org/name[@revision]`` that is no local path
goes through ``huggingface_hub.snapshot_download`` (the files the import needs
only: configs, tokenizer files, safetensors and their index), which answers
from its cache first and, with ``HF_HUB_OFFLINE=1``, from the cache only.
Anything else stays as it is, for the importer to report as missing.
"""

from __future__ import annotations

import os
import re

from lavi_jax import storage

# What an import reads: configs, tokenizer and preprocessor files, the weights (safetensors only) and their index.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "chat_template*"]

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_TRUE = ("1", "on", "true", "yes")


def parse(source: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``org/name[@revision]``, else None."""
    m = _REPO_ID.match(source) if isinstance(source, str) else None
    if m is None or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("revision")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    """The hub cache as the environment gives it now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve(source: str | None) -> str | None:
    """A path the importer can read for ``source`` (None stays None); see the module docstring."""
    if not source or storage.is_uri(source) or storage.exists(source):
        return source
    parsed = parse(source)
    if parsed is None:
        return source
    repo, revision = parsed
    import huggingface_hub
    from huggingface_hub import errors

    cache, off = cache_dir(), offline()
    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache,
                                                 allow_patterns=ALLOW_PATTERNS, local_files_only=off)
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{source}: no such local path, and no Hugging Face Hub repo {repo!r} (unknown, or "
                                "private/gated: log in with `hf auth login` or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{source}: Hugging Face Hub repo {repo!r} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set: download it first where the Hub is reachable "
               f"(`hf download {repo}` with HF_HUB_CACHE={cache}), or unset HF_HUB_OFFLINE" if off else
               f"the Hub could not be reached: check the network, or download it into the cache first (`hf download {repo}`)")
        raise FileNotFoundError(f"{source}: no such local path, and Hugging Face Hub repo {where} is not in the "
                                f"cache {cache}; {how}") from None
    except errors.HfHubHTTPError as e:
        reason = " ".join(str(e).split())[:300]
        raise FileNotFoundError(f"{source}: download of Hugging Face Hub repo {where} into {cache} failed ({reason})") from None
