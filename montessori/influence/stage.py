"""Stage `influence`: score every probing pair from the in-memory warm-up state.

Reads responses/pairs.jsonl, warmup/{split.json, model/, optimizer.pt} and the reference set
(data.reference, at most data.max_reference examples, cut to data.reference_max_length tokens).
Writes influence/influence.jsonl (InfluenceResult), one line per candidate as soon as it is scored;
a re-run skips ids already there. A candidate whose loss is not finite, or that has no response
token, is recorded with that status and the run goes on.
"""

from __future__ import annotations

import json
import math

from montessori.context import stage
from montessori.keys import INFLUENCE, REFERENCE
from montessori.errors import InputError
from montessori.influence.settings import InfluenceSettings
from montessori.influence.warmup import load_warmup
from montessori.models.load import resolve_device
from montessori.readers import read_pairs
from montessori.records import InfluenceResult, Pair
from montessori.store import StageDir, read_jsonl, resume


def probing_pairs(responses: StageDir, warmup: StageDir) -> list[Pair]:
    """The candidates to score: the warm-up split's probing pairs, from the responses stage's pairs."""
    source = responses.path / "pairs.jsonl"
    split_file = warmup.path / "split.json"
    by_id = {p.id: p for p in read_jsonl(source, Pair)}
    ids = json.loads(split_file.read_text())["probing"]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InputError(f"probing id not in {source}", file=split_file, record=missing[0])
    return [by_id[i] for i in ids]


@stage("influence", keys=("models.teacher", "models.device") + REFERENCE + INFLUENCE,
       inputs=("responses", "warmup"), files=("data.reference",), models=("student",))
def run_influence(ctx, responses: StageDir, warmup: StageDir) -> dict:
    """Scores the candidates through `ctx.map`: in this process by default (one Scorer given every
    candidate), on the workers the executor chose otherwise (distributed.ray: one per GPU)."""
    if ctx.config.influence.utility != "influence":
        return run_utility(ctx, responses, warmup)
    from functools import partial

    from montessori.influence.scorer import build_scorer
    cfg, icfg = ctx.config, ctx.config.influence
    settings = InfluenceSettings.from_config(cfg)
    candidates = probing_pairs(responses, warmup)
    with resume(ctx.dir.file("influence.jsonl"), InfluenceResult, candidates) as (out, todo):
        if todo:
            ctx.log.info("%d of %d candidates to score (%s, precision %s)", len(todo), len(candidates),
                         icfg.estimator, icfg.precision)
            reference = read_pairs(cfg.data.reference, lenient=cfg.data.lenient, limit=cfg.data.max_reference)
            ctx.map(partial(build_scorer, str(warmup.path), reference.records, settings), "score",
                    todo, out.append, desc=f"influence ({settings.estimator})")
        results = out.select(c.id for c in candidates)
    return influence_counts(results, icfg, settings.resolve(resolve_device(cfg.models.device)).grad_precision)


def influence_counts(results, icfg, grad_prec: str, **extra) -> dict:
    """The stage's manifest counts, wherever its candidates were scored."""
    ok = [r for r in results if r.status == "ok"]
    timed = [r.seconds for r in results if r.seconds is not None]
    return {"candidates": len(results), "ok": len(ok), "invalid": len(results) - len(ok),
            "positive": sum(r.influence > 0 for r in ok), "negative": sum(r.influence < 0 for r in ok),
            "seconds_per_candidate": round(sum(timed) / len(timed), 4) if timed else math.nan,
            "_extra": {"estimator": icfg.estimator if icfg.utility == "influence" else icfg.utility,
                       "precision": icfg.precision,
                       "grad_precision": grad_prec, **extra}}


def run_utility(ctx, responses: StageDir, warmup: StageDir) -> dict:
    """The ablations `influence.utility: loss | judge`: the same candidates and output file, another
    signal (montessori.evaluation.utility). Appended per candidate and resumed by id, like influence."""
    from tqdm.auto import tqdm
    from montessori.evaluation.utility import judge_utility, loss_utility
    cfg, icfg = ctx.config, ctx.config.influence
    candidates = probing_pairs(responses, warmup)
    with resume(ctx.dir.file("influence.jsonl"), InfluenceResult, candidates) as (out, todo):
        if todo:
            ctx.log.info("%d of %d candidates to score by %s", len(todo), len(candidates), icfg.utility)
            if icfg.utility == "loss":
                model, tokenizer, _ = load_warmup(warmup.path, cfg.models.device)
                step = icfg.eval_batch_size
                for i in tqdm(range(0, len(todo), step), desc="utility (loss)", disable=not ctx.progress):
                    for r in loss_utility(model, tokenizer, todo[i:i + step], batch_size=step,
                                          max_length=icfg.max_length):
                        out.append(r)
            else:
                from montessori.evaluation.judge import make_judge
                judge = make_judge(icfg.judge.model or ctx.teacher_spec(), icfg.judge.base_url,
                                   api_key_env=icfg.judge.api_key_env, device=cfg.models.device)
                for pair in tqdm(todo, desc="utility (judge)", disable=not ctx.progress):
                    out.append(judge_utility(judge, [pair])[0])
        results = out.select(c.id for c in candidates)
    return influence_counts(results, icfg, "-", utility=icfg.utility)
