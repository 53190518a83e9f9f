"""The lenient option-letter extractor (`convention="lenient"`), never a scorer's default.

It reads "B", "b", "(B)", "B.", "The answer is B", "Answer: C) blue", an answer that is one
option's text ("blue", "It is blue."), and skips the article "A" ("A dog is ..."). Published
numbers come from the stricter per-task rules in `mc_lmms_eval`.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

LETTERS = string.ascii_uppercase

BARE = re.compile(r"[\s(\[{*'\"]*([A-Za-z])[\s)\]}.:*'\",]*")
_KEYWORD = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*[:：]?\s*"
                      r"[(\[]?([A-Z])(?![A-Za-z'])")
_LEADING = re.compile(r"[(\[]?([A-Z])[)\].:：]")
_LONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def norm_text(text: str) -> str:
    """Lower-case alphanumeric words joined by single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _match_option_text(text: str, options: Sequence[str]) -> int | None:
    pred = norm_text(text)
    norms = [norm_text(o) for o in options]
    exact = [i for i, o in enumerate(norms) if o and o == pred]
    if len(exact) == 1:
        return exact[0]
    found = [i for i, o in enumerate(norms) if o and f" {o} " in f" {pred} "]
    # "dark red" contains "red": keep only matches not inside another match.
    found = [i for i in found
             if not any(j != i and f" {norms[i]} " in f" {norms[j]} " for j in found)]
    return found[0] if len(found) == 1 else None


def extract_choice(text: str | None, options: Sequence[str] | None = None,
                   letters: str | None = None) -> str | None:
    """The option letter a free-form answer picks, or None when none can be told."""
    if text is None:
        return None
    if letters is None:
        letters = LETTERS[:len(options)] if options else LETTERS[:8]
    s = str(text).strip()
    if not s:
        return None
    m = BARE.fullmatch(s)  # "B", "(B)", "B.", "b"
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = _KEYWORD.search(s)  # "The answer is B", "Answer: C) blue", "option (D)"
    if m and m.group(1) in letters:
        return m.group(1)
    m = _LEADING.match(s)  # "B. blue", "(B) blue", "C) blue"
    if m and m.group(1) in letters:
        return m.group(1)
    if options:
        i = _match_option_text(s, options)
        if i is not None:
            return letters[i]
    lone = set()
    for m in _LONE.finditer(s):
        # An "A" followed by a lower-case word is the article, not option A.
        if m.group(1) == "A" and re.match(r"\s+[a-z]", s[m.end():]):
            continue
        if m.group(1) in letters:
            lone.add(m.group(1))
    return lone.pop() if len(lone) == 1 else None
