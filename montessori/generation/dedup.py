"""Near-duplicate filter: ROUGE-L F1 against every kept instruction, with `rouge-score`'s decisions.

The public code scores each new instruction against the whole pool in pure Python (an O(m*n) LCS
table per pair, a process pool per candidate): quadratic in the pool and hours at 10K instructions.
Here each instruction is tokenized once, exactly as `rouge_score.tokenize` does (lowercase, every
non-[a-z0-9] run is a separator, no stemming: the Self-Instruct setting), and a pair is scored only
if it can reach the threshold:

  - lengths: F1 = 2*lcs/(m+n) <= 2*min(m,n)/(m+n); pairs of very different lengths cannot be duplicates;
  - shared tokens: lcs <= sum_t min(count_a(t), count_b(t)), counted for the whole pool at once through
    an inverted index (numpy), so most of the pool is rejected without an LCS.

The few survivors get an exact LCS length by the bit-parallel algorithm of Allison and Dix (one
big-integer add/or per token, i.e. the DP table's rows 64 cells per machine word), and the F1 is then
computed with rouge-score's own float formula so borderline decisions are identical.

rouge-score's tokenizer keeps only [a-z0-9]: Japanese or Chinese text becomes no tokens at all, so two
near-identical Japanese instructions score 0 and both are kept (Russian or Greek text too). A text
whose letters are mostly not ASCII is therefore tokenized by `dedup_tokens` instead: every character
of a script written without spaces (kana, hanzi, hangul, Thai, ...) is a token (ROUGE-L over
characters, as is usual for Chinese and Japanese), and any other run of letters or digits is a word.
Text whose letters are mostly ASCII (English) keeps rouge-score's tokens, so its decisions are
rouge-score's, exactly as before.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
# Scripts written without spaces between words: hiragana, katakana (and its half-width forms), CJK
# ideographs (with extensions and compatibility forms), hangul syllables, Thai, Lao, Khmer, Myanmar.
# (Korean puts spaces between phrases, not words: its phrases inflect, so characters match better.)
_UNSPACED = ("\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
             "\uac00-\ud7af\u0e00-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f")
_UNICODE_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")


def rouge_tokens(text: str) -> list[str]:
    """`rouge_score.tokenize.tokenize(text, None)` without the dependency."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def dedup_tokens(text: str) -> list[str]:
    """The tokens dedup compares: rouge-score's for text whose letters are mostly ASCII (English stays
    exactly rouge-score), else one token per character of a script without spaces and one per run of
    other letters or digits (Japanese, Chinese, Korean, Thai, Cyrillic, Greek, ...)."""
    letters = [ch for ch in text if ch.isalpha()]
    if sum(ch.isascii() for ch in letters) * 2 >= len(letters):
        return rouge_tokens(text)
    return _UNICODE_TOKEN.findall(text.lower())


def lcs_length(masks: dict[str, int], n: int, other: list[str]) -> int:
    """LCS length of a sequence (given as per-token position bitmasks, length n) and `other`."""
    full = (1 << n) - 1
    v = full
    for tok in other:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def _masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def rouge_l_f1(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists, the same float as rouge-score's `_score_lcs`."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(_masks(a), len(a), b)
    return _fmeasure(lcs, len(a), len(b))


def _fmeasure(lcs: int, n_target: int, n_pred: int) -> float:
    precision, recall = lcs / n_pred, lcs / n_target
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


class _Postings:
    """token -> growable arrays of (pool index, count of the token in that instruction)."""

    def __init__(self):
        self.ids = np.empty(16, dtype=np.int64)
        self.counts = np.empty(16, dtype=np.int32)
        self.size = 0

    def add(self, idx: int, count: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.resize(self.ids, 2 * self.size)
            self.counts = np.resize(self.counts, 2 * self.size)
        self.ids[self.size], self.counts[self.size] = idx, count
        self.size += 1


class RougeDeduper:
    """A growing pool of kept instructions; `max_score` answers "how close is the nearest one?"."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.tokens: list[list[str]] = []
        self.masks: list[dict[str, int]] = []
        self.lengths = np.empty(0, dtype=np.int64)
        self._lengths: list[int] = []
        self.postings: dict[str, _Postings] = {}
        self.pruned = 0  # pairs rejected without an LCS (for benchmarks)
        self.scored = 0  # pairs given an exact LCS

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, text: str) -> None:
        tokens = dedup_tokens(text)
        idx = len(self.tokens)
        self.tokens.append(tokens)
        self.masks.append(_masks(tokens))
        self._lengths.append(len(tokens))
        for tok, count in Counter(tokens).items():
            self.postings.setdefault(tok, _Postings()).add(idx, count)

    def max_score(self, text: str, at_least: float = 0.0) -> float:
        """Highest ROUGE-L F1 of `text` against the pool; exact whenever it is >= `at_least` (pairs
        that cannot reach `at_least` are not scored), 0.0 for an empty pool."""
        return self._best(dedup_tokens(text), at_least, stop_above=None)

    def is_duplicate(self, text: str, extra: list[str] = ()) -> bool:
        """ROUGE-L F1 > threshold against any pooled instruction or any of `extra` (the prompt's examples)."""
        tokens = dedup_tokens(text)
        if any(rouge_l_f1(tokens, dedup_tokens(e)) > self.threshold for e in extra):
            return True
        return self._best(tokens, self.threshold, stop_above=self.threshold) > self.threshold

    def _best(self, tokens: list[str], bound: float, stop_above: float | None) -> float:
        if not tokens or not self.tokens:
            return 0.0
        if len(self.lengths) != len(self._lengths):
            self.lengths = np.asarray(self._lengths, dtype=np.int64)
        n = len(tokens)
        shared = np.zeros(len(self.tokens), dtype=np.int64)
        for tok, count in Counter(tokens).items():
            post = self.postings.get(tok)
            if post is not None:
                shared[post.ids[:post.size]] += np.minimum(post.counts[:post.size], count)
        # Upper bound of F1 = 2*lcs/(m+n) with lcs <= min(shared, m, n); the margin keeps float
        # rounding on the side of scoring a pair exactly.
        upper = 2 * np.minimum(shared, np.minimum(self.lengths, n)) / (self.lengths + n)
        survivors = np.flatnonzero(upper >= bound - 1e-9)
        self.pruned += len(self.tokens) - len(survivors)
        best = 0.0
        for idx in survivors[np.argsort(-upper[survivors], kind="stable")]:
            if upper[idx] < best - 1e-9:  # sorted by bound: no later pair can beat `best`
                break
            self.scored += 1
            lcs = lcs_length(self.masks[idx], int(self.lengths[idx]), tokens)
            best = max(best, _fmeasure(lcs, n, int(self.lengths[idx])))
            if stop_above is not None and best > stop_above:
                break
        return best


def near_duplicates(texts: list[str], others: list[str], threshold: float = 0.7) -> list[tuple[int, int, float]]:
    """(i, j, ROUGE-L F1) for every text i whose F1 with other j exceeds `threshold` (dedup's rule), e.g.
    held-out tasks that nearly repeat a reference task; all pairs are scored (for tens of texts)."""
    pool = [dedup_tokens(o) for o in others]
    found = []
    for i, text in enumerate(texts):
        tokens = dedup_tokens(text)
        found += [(i, j, f) for j, other in enumerate(pool) if (f := rouge_l_f1(tokens, other)) > threshold]
    return found


def dedup(texts: list[str], threshold: float = 0.7) -> list[bool]:
    """Keep-mask of greedy in-order dedup: a text is kept unless it is too close to an earlier kept one."""
    pool = RougeDeduper(threshold)
    keep = []
    for text in texts:
        ok = not pool.is_duplicate(text)
        keep.append(ok)
        if ok:
            pool.add(text)
    return keep
