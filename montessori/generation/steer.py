"""generation.steer: show the teacher more seed examples of the kinds that measured best.

"Generate more of what works": after a small run has measured which kinds of candidates helped the
student (`montessori analyze`), the next generation draws each prompt's seed examples with a weight
per seed, w = exp(strength * z), where z is the standardized mean influence of the seed's kind:
its task type (the same rule as the analysis, applied to the seed's text) or, with `by: seed`, the
candidates attributed to that seed. Kinds measured fewer than `min_count` times, and seeds of
unmeasured kinds, keep w = 1. The weights and what they came from are recorded in the stage's
manifest (`steer`). With `enabled: false` nothing here runs and the prompts are the unsteered ones.

It reads the kinds from montessori.features, which the analysis shares, and not from the analysis
itself: generation is a stage, and stages do not import the views of a run (tests/test_layers.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from montessori.errors import InputError
from montessori.features import measured_candidates, task_type
from montessori.store import RunStore, file_hash


def kind_weights(items, by: str, strength: float, min_count: int) -> dict[str, dict]:
    """{kind: {n, mean, weight}} from measured candidates (montessori.features.CandidateFeatures)."""
    values = [c.influence for c in items]
    if len(values) < 2:
        return {}
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    groups: dict[str, list[float]] = {}
    for c in items:
        groups.setdefault(getattr(c, by), []).append(c.influence)
    out = {}
    for kind in sorted(groups):
        vs = groups[kind]
        m = sum(vs) / len(vs)
        z = (m - mean) / sd if sd > 0 else 0.0
        out[kind] = {"n": len(vs), "mean": m, "weight": math.exp(strength * z) if len(vs) >= min_count else 1.0}
    return out


def steer_weights(ctx, seeds: list[tuple[str, str]], *, this_round: bool,
                  measured_by: tuple) -> tuple[list[float] | None, dict]:
    """(one weight per seed or None, the manifest's record); (None, {}) when steering is off.
    `measured_by`: the (instructions, responses, influence) stages whose files hold the measurements."""
    steer = ctx.config.generation.steer
    if not steer.enabled:
        return None, {}
    if steer.source is not None:
        source = Path(steer.source)
        if not RunStore(source).rounds():
            raise InputError(f"generation.steer.source {source}: not a run directory (no round-N folders)")
        items, _ = measured_candidates(source, *measured_by)
    else:  # this run's measurements so far (the fingerprint chain makes them inputs of this stage)
        source = ctx.store.root
        last = ctx.round if this_round else ctx.round - 1
        items = [c for c in measured_candidates(source, *measured_by)[0] if c.round <= last]
    kinds = kind_weights(items, steer.by, steer.strength, steer.min_count)
    store, influence = RunStore(source), measured_by[-1]
    influence_files = [store.stage(r, influence).path / "influence.jsonl" for r in store.rounds()]
    keys = [task_type(text) if steer.by == "task_type" else sid for sid, text in seeds]
    weights = [kinds.get(k, {}).get("weight", 1.0) for k in keys]
    record = {"steer": {"by": steer.by, "strength": steer.strength, "min_count": steer.min_count,
                        "source": str(source), "measured": len(items), "kinds": kinds,
                        "influence_files": {str(p.relative_to(source)): file_hash(p)
                                            for p in influence_files if p.exists()},
                        "seed_weights": {sid: round(w, 6) for (sid, _), w in zip(seeds, weights)}}}
    if not kinds:
        ctx.log.info("generation.steer: no measurements yet in %s: seeds drawn uniformly", source)
        return None, record
    ctx.log.info("generation.steer by %s from %d measured candidates: %s", steer.by, len(items),
                 ", ".join(f"{k} x{v['weight']:.2f}" for k, v in kinds.items()))
    return weights, record
