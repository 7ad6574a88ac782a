"""Stage `preferences`: turn influence-scored candidates into DPO preference pairs (docs/method.md, step 6).

Reads instructions/prompts.jsonl + candidates.jsonl, influence/influence.jsonl (status "ok" only) and
responses/pairs.jsonl (which candidate each scored pair answers, and its length); writes
preferences/preferences.jsonl. A pair's prompt is the generation prompt the teacher sampled from
(messages + assistant prefill); chosen and rejected are the raw completions, reasoning included.

Zero pairs is an error, not an empty DPO run: the message says why the rule starved and names the
alternative (preferences.rule=rank for the sign rule). Few pairs (under half the prompts) is a warning.
"""

from __future__ import annotations

import statistics

from montessori.context import stage
from montessori.errors import InputError, MontessoriError
from montessori.preferences.rules import Scored, build_pairs, length_adjusted, starvation_hint
from montessori.records import Candidate, GenerationPrompt, InfluenceResult, Pair, PreferencePair
from montessori.store import StageDir, read_jsonl, write_jsonl


def make_preferences(prompts: dict[str, GenerationPrompt], candidates: dict[str, Candidate],
                     influence: list[InfluenceResult], cfg,
                     responses: dict[str, Pair] | None = None) -> tuple[list[PreferencePair], dict]:
    """`responses` (pair id -> answered pair, from responses/pairs.jsonl) says which candidate a scored
    pair answers; without it a pair's id is its candidate's (one answer each). With several answers per
    instruction (generation.responses.n > 1) a candidate's influence is the mean over its measured
    answers, and its length (preferences.control_length) the mean of theirs."""
    per_candidate: dict[str, list[tuple[float, int]]] = {}
    used = 0
    for res in influence:
        if res.status != "ok" or res.influence is None:
            continue
        pair = (responses or {}).get(res.id)
        cid = pair.candidate_id or pair.id if pair is not None else res.id
        if cid not in candidates:
            raise InputError("no candidate with this id in instructions/candidates.jsonl",
                             file="influence/influence.jsonl", record=res.id, field="id")
        if cfg.control_length and pair is None:
            raise InputError("scored candidate has no answer in responses/pairs.jsonl (preferences.control_length "
                             "needs its length)", file="influence/influence.jsonl", record=res.id, field="id")
        per_candidate.setdefault(cid, []).append((float(res.influence), len(pair.response) if pair else 0))
        used += 1
    scored = [Scored(cid, candidates[cid].prompt_id, statistics.fmean(v for v, _ in values))
              for cid, values in per_candidate.items()]
    raw = {s.id: s.influence for s in scored}
    if cfg.control_length and scored:
        chars = [statistics.fmean(n for _, n in per_candidate[s.id]) for s in scored]
        scored = [Scored(s.id, s.prompt_id, v) for s, v in zip(scored, length_adjusted([s.influence for s in scored],
                                                                                       chars))]
    pairs, counts = build_pairs(scored, cfg)
    prefs = []
    for chosen, rejected in pairs:
        c, r = candidates[chosen.id], candidates[rejected.id]
        prompt = prompts.get(c.prompt_id)
        # The prompt record is the authority; a candidate carries a copy for runs without prompts.jsonl.
        messages = prompt.messages if prompt is not None else c.messages
        prefill = prompt.prefill if prompt is not None else c.prefill
        if not messages:
            raise InputError("generation prompt not found (no prompts.jsonl record, no messages on the candidate)",
                             file="instructions/candidates.jsonl", record=c.id, field="prompt_id")
        prefs.append(PreferencePair(id=f"{c.id}>{r.id}", prompt_id=c.prompt_id, prompt=messages, prefill=prefill,
                                    chosen=c.completion, rejected=r.completion, chosen_id=c.id, rejected_id=r.id,
                                    chosen_influence=raw[chosen.id], rejected_influence=raw[rejected.id]))
    counts["skipped_influence"] = len(influence) - used
    counts["answers_scored"] = used
    return prefs, counts


@stage("preferences", keys=tuple(f"preferences.{k}" for k in (
           "rule", "best_vs_worst", "min_gap", "max_per_prompt", "control_length")),
       inputs=("instructions", "responses", "influence"))
def run_preferences(ctx, instructions: StageDir, responses: StageDir, influence: StageDir) -> dict:
    cfg = ctx.config.preferences
    prompts = {p.id: p for p in read_jsonl(instructions.path / "prompts.jsonl", GenerationPrompt)}
    candidates = {c.id: c for c in read_jsonl(instructions.path / "candidates.jsonl", Candidate)}
    results = read_jsonl(influence.path / "influence.jsonl", InfluenceResult)
    # Which candidate each scored pair answers, and its length.
    source = responses.path / "pairs.jsonl"
    answered = {p.id: p for p in read_jsonl(source, Pair)} if source.exists() else None
    prefs, counts = make_preferences(prompts, candidates, results, cfg, answered)
    if not prefs:
        raise MontessoriError(f"preferences: rule '{cfg.rule}' built 0 preference pairs from {counts['prompts']} prompts, "
                              f"so DPO would train on nothing. {starvation_hint(counts, cfg)}")
    if counts["prompts_with_pairs"] * 2 < counts["prompts"]:
        ctx.log.warning("preferences: only %d of %d prompts gave a pair (%d pairs). %s", counts["prompts_with_pairs"],
                        counts["prompts"], len(prefs), starvation_hint(counts, cfg))
    write_jsonl(ctx.dir.file("preferences.jsonl"), prefs)
    counts["rule"] = cfg.rule
    counts["control_length"] = cfg.control_length
    return counts
