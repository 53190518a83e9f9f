"""The output directory of a conversion CLI: refused when it holds something, unless replacing it is asked for."""

from __future__ import annotations

import os
import shutil


def fresh_output_dir(path: str, overwrite: bool) -> str:
    """Absolute ``path``, emptied when ``overwrite``; a non-empty directory otherwise raises ValueError."""
    out = os.path.abspath(path)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    return out
