"""Instruction filters of docs/method.md, step 1 (before the near-duplicate check).

Each returns the reason a candidate is dropped, or None; reasons are what `dropped.jsonl` and the
stage counts show.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache


@lru_cache(maxsize=32)
def _banned_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    # Whole words only ("file" drops "upload a file", not "profile"), case-insensitive.
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def filter_reason(instruction: str, *, min_chars: int, max_chars: int, banned_words: list[str]) -> str | None:
    if not instruction or len(instruction) < min_chars:
        return "too_short"
    if len(instruction) > max_chars:
        return "too_long"
    pattern = _banned_pattern(tuple(banned_words))
    if pattern is not None and pattern.search(instruction):
        return "banned_word"
    if instruction[0] in string.punctuation:
        return "punctuation_start"
    if not instruction[0].isascii():
        return "non_ascii_start"
    return None
