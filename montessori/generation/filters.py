"""Instruction filters of docs/method.md, step 1 (before the near-duplicate check).

Each returns the reason a candidate is dropped, or None; reasons are what `dropped.jsonl` and the
stage counts show.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

from montessori.generation.prompts import ENGLISH


@lru_cache(maxsize=32)
def _banned_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    # Whole words only ("file" drops "upload a file", not "profile"), case-insensitive.
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def filter_reason(instruction: str, *, min_chars: int, max_chars: int, banned_words: list[str],
                  language: str = ENGLISH) -> str | None:
    """Self-Instruct's filters. Its first-character rule ("starts with a non-English character") is
    for English runs only: asked for Japanese, a well-formed task starts with a kana or kanji, and the
    rule dropped 42 of the Qwen teacher's 64 first samples (docs/experiments.md). For other languages
    only a punctuation or symbol start (e.g. 「 or ・: Unicode categories P* and S*) is dropped."""
    if not instruction or len(instruction) < min_chars:
        return "too_short"
    if len(instruction) > max_chars:
        return "too_long"
    pattern = _banned_pattern(tuple(banned_words))
    if pattern is not None and pattern.search(instruction):
        return "banned_word"
    if instruction[0] in string.punctuation:
        return "punctuation_start"
    if language != ENGLISH:
        return "punctuation_start" if unicodedata.category(instruction[0])[0] in "PS" else None
    if not instruction[0].isascii():
        return "non_ascii_start"
    return None
