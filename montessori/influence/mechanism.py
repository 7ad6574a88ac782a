"""Stage `mechanism`: did DPO teach the teacher to write data this student learns from?

The method's claim in one number. After DPO, the updated teacher and the teacher it started from each
write fresh candidates (instruction, then its answer) for the same `mechanism.num_prompts` generation
prompts, with the same sampling seed per prompt, and every candidate is scored by the influence stage's
engine on this round's warm-up state: the same student, the same reference set, the same estimator.
If DPO worked, the updated teacher's candidates have the higher mean influence and share positive.

The prompts are new (a seed of their own; the examples drawn from the seed tasks and this round's kept
probing instructions, as the instructions stage draws them), so DPO never saw them.
Writes mechanism/candidates.jsonl (MechanismCandidate: both teachers' candidates, appended per batch of
prompts), mechanism/influence.jsonl (InfluenceResult per kept candidate; both resumed by id) and
mechanism/summary.json: per teacher the counts, mean influence and share positive with bootstrap 95%
intervals over prompts, and the paired difference (updated - original) with its interval.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from montessori.context import stage
from montessori.keys import BACKEND, INFLUENCE, PROMPTS, REFERENCE, SEEDS, STUDENT, TEACHER
from montessori.generation.backends import Request, Sampling
from montessori.generation.filters import filter_reason
from montessori.generation.prompts import ENGLISH, answer_messages, build_prompt, choose_examples, parse_completion
from montessori.generation.stage import _seeds, derived_seed, run_language
from montessori.generation.stage import teacher as generating_teacher
from montessori.influence.engine import compute_influence
from montessori.influence.settings import InfluenceSettings
from montessori.influence.warmup import load_warmup
from montessori.readers import read_pairs
from montessori.records import Candidate, GenerationPrompt, InfluenceResult, Pair, Record
from montessori.store import JsonlAppender, StageDir, atomic_write_json, read_jsonl, resume

TEACHERS = ("updated", "original")  # after this round's DPO / the teacher DPO started from


@dataclass
class MechanismCandidate(Record):
    kind: ClassVar[str] = "mechanism"
    id: str  # {teacher}-{prompt id}-s{sample}
    teacher: str  # updated | original
    prompt_id: str
    instruction: str | None
    response: str | None = None
    dropped: str | None = None  # why it is not scored: unparsed, or the filter's reason


def mechanism_prompts(ctx, instructions: StageDir) -> list[GenerationPrompt]:
    """The same fresh generation prompts for both teachers (their synthetic examples: this round's
    probing instructions)."""
    cfg, gen = ctx.config, ctx.config.generation
    seeds = _seeds(cfg)
    language = run_language(cfg, seeds)  # as the instructions stage asks
    probing = [(c.id, c.instruction) for c in read_jsonl(instructions.path / "candidates.jsonl", Candidate)]
    prompts = []
    for i in range(cfg.mechanism.num_prompts):
        rng = random.Random(derived_seed(cfg.seed, ctx.round, "mechanism", i))
        examples = choose_examples(rng, seeds, probing, gen.examples_per_prompt, gen.synthetic_per_prompt)
        messages, prefill = build_prompt(gen.prompt_style, [t for _, t in examples], language)
        prompts.append(GenerationPrompt(f"r{ctx.round}-mech-p{i:05d}", messages, [e for e, _ in examples],
                                        gen.prompt_style, prefill, ctx.round))
    return prompts


def write_candidates(backend, gen, prompts: list[GenerationPrompt], teacher: str, seed: int,
                     out: JsonlAppender, language: str = ENGLISH) -> None:
    """n instructions per prompt, then one answer per kept instruction, appended batch by batch; a
    batch whose candidates are all written is skipped (the batches are fixed, so resuming is exact)."""
    sampling = Sampling.from_config(gen.instructions)
    answer = Sampling.from_config(gen.responses)
    answer.n = 1
    per_batch = max(1, gen.batch_size // sampling.n)
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start:start + per_batch]
        if all(f"{teacher}-{p.id}-s{j}" in out for p in batch for j in range(sampling.n)):
            continue
        # Seeds name the prompt, not the teacher: both teachers sample with the same seeds.
        requests = [Request(p.messages, p.prefill, derived_seed(seed, p.id, "sample")) for p in batch]
        written = []
        for prompt, completions in zip(batch, backend.generate(requests, sampling)):
            for j, comp in enumerate(completions):
                instruction = parse_completion(prompt.style, comp.text)
                reason = "unparsed" if instruction is None else filter_reason(
                    instruction, min_chars=gen.min_chars, max_chars=gen.max_chars, banned_words=gen.banned_words,
                    language=language)
                written.append(MechanismCandidate(f"{teacher}-{prompt.id}-s{j}", teacher, prompt.id, instruction,
                                                  dropped=reason))
        kept = [c for c in written if c.dropped is None]
        if kept:
            requests = [Request(answer_messages(c.instruction, language), "",
                                derived_seed(seed, c.prompt_id, "response")) for c in kept]
            for cand, (comp,) in zip(kept, backend.generate(requests, answer)):
                cand.response = comp.text.strip()
        for cand in written:
            if cand.id not in out:
                out.append(cand)


def bootstrap(by_prompt: list[list[float]], stat, samples: int, seed: int) -> tuple[float, float]:
    """95% interval of stat(values) when the prompts (the sampled unit) are resampled."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        picked = [v for i in rng.integers(0, len(by_prompt), len(by_prompt)) for v in by_prompt[i]]
        if picked:
            values.append(stat(picked))
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def summarize(records: list[MechanismCandidate], results: dict[str, InfluenceResult], prompt_ids: list[str], *,
              samples: int = 1000, seed: int = 0) -> dict:
    """Per teacher: counts, mean influence, share positive (bootstrap intervals over prompts), and the
    paired difference updated - original (both teachers' candidates of a resampled prompt go together)."""
    def values(teacher: str) -> list[list[float]]:
        by: dict[str, list[float]] = {p: [] for p in prompt_ids}
        for c in records:
            r = results.get(c.id)
            if c.teacher == teacher and r is not None and r.status == "ok" and r.influence is not None:
                by[c.prompt_id].append(r.influence)
        return [by[p] for p in prompt_ids]

    def mean(v):
        return float(np.mean(v))

    def share(v):
        return float(np.mean(np.array(v) > 0))

    out: dict = {"prompts": len(prompt_ids), "bootstrap_samples": samples}
    grouped = {t: values(t) for t in TEACHERS}
    for t in TEACHERS:
        flat = [v for vs in grouped[t] for v in vs]
        mine = [r for r in records if r.teacher == t]
        entry = {"candidates": len(mine), "dropped": sum(c.dropped is not None for c in mine),
                 "scored": sum(c.id in results for c in mine), "measured": len(flat)}
        if flat:
            entry |= {"mean_influence": mean(flat), "share_positive": share(flat)}
            entry["mean_influence_low"], entry["mean_influence_high"] = bootstrap(grouped[t], mean, samples, seed)
            entry["share_positive_low"], entry["share_positive_high"] = bootstrap(grouped[t], share, samples, seed)
        out[t] = entry
    if all(out[t]["measured"] for t in TEACHERS):
        rng = np.random.default_rng(seed)
        up, orig = grouped["updated"], grouped["original"]
        diffs = []
        for _ in range(samples):
            idx = rng.integers(0, len(prompt_ids), len(prompt_ids))
            a = [v for i in idx for v in up[i]]
            b = [v for i in idx for v in orig[i]]
            if a and b:
                diffs.append(np.mean(a) - np.mean(b))
        low, high = np.percentile(diffs, [2.5, 97.5]) if diffs else (math.nan, math.nan)
        out["difference"] = {"mean_influence": out["updated"]["mean_influence"] - out["original"]["mean_influence"],
                             "low": float(low), "high": float(high),
                             "updated_better_fraction": float(np.mean(np.array(diffs) > 0)) if diffs else math.nan}
    return out


@stage("mechanism", keys=TEACHER + STUDENT + BACKEND + SEEDS + PROMPTS + REFERENCE + INFLUENCE + (
           "generation.responses", "mechanism.enabled", "mechanism.num_prompts", "mechanism.bootstrap_samples"),
       inputs=("instructions", "warmup", "dpo"), round_inputs=("dpo",), files=("data.seeds", "data.reference"),
       models=("teacher", "student"), generates=True)
def run_mechanism(ctx, instructions: StageDir, warmup: StageDir, dpo: StageDir) -> dict:
    cfg, mcfg, icfg = ctx.config, ctx.config.mechanism, ctx.config.influence
    if not mcfg.enabled:
        return {"enabled": False}
    prompts = mechanism_prompts(ctx, instructions)
    seed = cfg.seed
    specs = {"updated": str(dpo.path / "model"), "original": ctx.teacher_spec()}
    with JsonlAppender(ctx.dir.file("candidates.jsonl"), MechanismCandidate) as out:
        for teacher in TEACHERS:
            with generating_teacher(ctx, specs[teacher]) as backend:
                write_candidates(backend, cfg.generation, prompts, teacher, seed, out, run_language(cfg))
        candidates = [c for c in out.records if c.dropped is None]
    with resume(ctx.dir.file("influence.jsonl"), InfluenceResult,
                [Pair(c.id, c.instruction, c.response or "") for c in candidates]) as (scored, todo):
        if todo:
            ctx.log.info("scoring %d candidates of both teachers on the warm-up state (%s)", len(todo),
                         icfg.estimator)
            reference = read_pairs(cfg.data.reference, lenient=cfg.data.lenient, limit=cfg.data.max_reference)
            model, tokenizer, state = load_warmup(warmup.path, cfg.models.device)
            compute_influence(model, state, todo, reference.records, tokenizer=tokenizer,
                              settings=InfluenceSettings.from_config(cfg),
                              on_result=scored.append, progress=ctx.progress)
        results = {r.id: r for r in scored.records}
    summary = summarize(list(out.records), results, [p.id for p in prompts], samples=mcfg.bootstrap_samples,
                        seed=cfg.seed)
    atomic_write_json(ctx.dir.file("summary.json"), summary)
    counts = {"prompts": len(prompts)}
    for t in TEACHERS:
        counts |= {f"{t}_{k}": v for k, v in summary[t].items() if not k.endswith(("_low", "_high"))}
    if "difference" in summary:
        counts["difference_mean_influence"] = summary["difference"]["mean_influence"]
    return counts | {"_extra": {"teachers": specs}}
