"""Pairing rules: from influence-scored candidates, grouped by generation prompt, to (chosen, rejected).

`sign` (docs/method.md, step 6): chosen = every candidate with I > 0, rejected = every candidate with I < 0.
It starves when nearly all candidates share a sign (SmolLM2-135M after a short warm-up: 12 of 12
measured candidates had I > 0). `rank` compares candidates *within* a prompt instead: chosen = those
above the prompt's median influence, rejected = those below it, whatever their sign.

Options on top of either rule: `best_vs_worst` keeps one pair per prompt (highest vs lowest),
`min_gap` drops pairs whose influence gap is smaller, `max_per_prompt` keeps the widest gaps, and
`control_length` ranks by `length_adjusted` influence (the rule, the gap and the cap all see it).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from montessori.config import PreferencesConfig


@dataclass(frozen=True)
class Scored:
    id: str
    prompt_id: str
    influence: float


def length_adjusted(influence: list[float], response_chars: list[int]) -> list[float]:
    """I - (a + b·log(chars)), a and b the least-squares line over all the values: what the response's
    length does not explain. Mean zero, so under the sign rule about half are positive."""
    x = [math.log(max(n, 1)) for n in response_chars]
    mx, my = statistics.fmean(x), statistics.fmean(influence)
    var = sum((v - mx) ** 2 for v in x)
    slope = sum((v - mx) * (y - my) for v, y in zip(x, influence)) / var if var > 0 else 0.0
    return [y - my - slope * (v - mx) for v, y in zip(x, influence)]


def split_prompt(cands: list[Scored], rule: str) -> tuple[list[Scored], list[Scored]]:
    """(chosen side, rejected side) of one prompt's candidates under a rule."""
    if rule == "sign":
        return [c for c in cands if c.influence > 0], [c for c in cands if c.influence < 0]
    if len(cands) < 2:
        return [], []
    median = statistics.median(c.influence for c in cands)
    # Candidates equal to the median sit on neither side: they are neither better nor worse.
    return [c for c in cands if c.influence > median], [c for c in cands if c.influence < median]


def prompt_pairs(cands: list[Scored], cfg: PreferencesConfig) -> list[tuple[Scored, Scored]]:
    """The preference pairs of one generation prompt, widest influence gap first."""
    chosen, rejected = split_prompt(cands, cfg.rule)
    if not chosen or not rejected:
        return []
    if cfg.best_vs_worst:
        best = max(chosen, key=lambda c: (c.influence, c.id))
        worst = min(rejected, key=lambda c: (c.influence, c.id))
        pairs = [(best, worst)]
    else:
        pairs = [(c, r) for c in chosen for r in rejected]
    pairs = [(c, r) for c, r in pairs if c.influence - r.influence >= cfg.min_gap]
    pairs.sort(key=lambda p: (-(p[0].influence - p[1].influence), p[0].id, p[1].id))
    if cfg.max_per_prompt is not None:
        pairs = pairs[:cfg.max_per_prompt]
    return pairs


def build_pairs(scored: list[Scored], cfg: PreferencesConfig) -> tuple[list[tuple[Scored, Scored]], dict]:
    """All pairs, in prompt order of first appearance, and the counts the stage reports."""
    groups: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        groups[s.prompt_id].append(s)
    pairs, without = [], 0
    for cands in groups.values():
        found = prompt_pairs(cands, cfg)
        pairs.extend(found)
        without += not found
    values = [s.influence for s in scored]
    counts = {
        "candidates": len(scored),
        "positive": sum(v > 0 for v in values),
        "negative": sum(v < 0 for v in values),
        "prompts": len(groups),
        "prompts_with_pairs": len(groups) - without,
        "prompts_without_pair": without,
        "pairs": len(pairs),
    }
    return pairs, counts


def starvation_hint(counts: dict, cfg: PreferencesConfig) -> str:
    """One plain sentence on why a rule built few pairs and what to try instead."""
    n, pos, neg = counts["candidates"], counts["positive"], counts["negative"]
    if cfg.rule == "sign":
        return (f"{pos} of {n} measured candidates had positive influence and {neg} negative; the sign rule "
                f"needs both within one prompt. Use preferences.rule=rank (above vs below each prompt's median).")
    tips = []
    if cfg.min_gap > 0:
        tips.append(f"lower preferences.min_gap (now {cfg.min_gap:g})")
    tips.append("generate more candidates per prompt (generation.instructions.n) or more probing pairs "
                "(split.probing)")
    return f"the rank rule needs 2+ measured candidates with different influence in a prompt; {' or '.join(tips)}."
