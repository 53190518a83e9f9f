"""The output directory of a conversion CLI: refused when it holds something, unless replacing it is asked for."""

from __future__ import annotations

from lavi_jax import storage


def fresh_output_dir(path: str, overwrite: bool) -> str:
    """Absolute ``path`` (a URI as it is), emptied when ``overwrite``; a non-empty directory otherwise raises
    ValueError. A URI's store is checked up front (reachable, bucket there, writable) so a bad ``gs://`` fails
    before any work, with one line naming it."""
    out = storage.absolute(path)
    if storage.exists(out) and storage.isdir(out) and storage.listdir(out):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        storage.remove(out)
    storage.check_writable(out)
    return out
