"""Influence over many GPUs and machines: one worker per GPU, each holding the warm-up state once.

    driver                          worker k (a Ray actor, or a local process)
    ------                          --------
    probing pairs  -- 1 pair -->    InfluenceEngine(warm-up state, reference set), built once
    influence.jsonl <-- result --   engine.score(pair): step, evaluate, restore (engine.py)

Candidates are handed out one at a time to whichever worker is free (scheduler.dispatch), results
are appended to influence.jsonl as they arrive, and a worker that dies has its in-flight candidates
re-run elsewhere. Every worker runs the single-process engine on the same warm-up state, so a
value does not depend on which worker, or how many, computed it.

Workers read the warm-up folder themselves (RUN/round-R/warmup/): on a cluster the run directory
must be on storage every node sees (NFS, a shared volume), as it is for any multi-node training.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

from montessori.distributed.scheduler import (ProcessPool, RayPool, cluster_gpus, dispatch, init_ray, start_actors,
                                              worker_count)
from montessori.influence.settings import InfluenceSettings
from montessori.influence.stage import influence_counts, probing_pairs, run_utility
from montessori.models.batching import encode_pairs
from montessori.records import InfluenceResult, Pair


class Scorer:
    """An InfluenceEngine plus the tokenizer that encodes pairs for it; scores a task of pairs
    (or of already encoded batching.Example, as bench/scale.py sends)."""

    def __init__(self, engine, tokenizer=None, max_length: int | None = None, die_after: int | None = None):
        self.engine, self.tokenizer, self.max_length = engine, tokenizer, max_length
        self.die_after, self.scored = die_after, 0

    def score(self, items: list) -> list[InfluenceResult]:
        out = []
        examples = [encode_pairs(self.tokenizer, [item], self.max_length)[0] if isinstance(item, Pair) else item
                    for item in items]
        for result in self.engine.score_many(examples):
            if self.die_after is not None and self.scored >= self.die_after:
                os._exit(17)  # fault injection (tests): the process vanishes mid-task, as on a node loss
            out.append(result)
            self.scored += 1
        return out


def build_scorer(warmup_dir: str, reference: list[Pair], settings: InfluenceSettings,
                 die_after: int | None = None) -> Scorer:
    """The single-process stage's engine, built from the saved warm-up folder (same encoding, same
    padding id, same precision), so values equal `compute_influence`'s."""
    from montessori.influence.engine import AdamWState, InfluenceEngine
    from montessori.influence.warmup import load_warmup
    model, tokenizer, state = load_warmup(Path(warmup_dir), settings.device)
    if settings.compile is True:
        model.base_model.compile(dynamic=True)
    engine = InfluenceEngine(model, AdamWState.from_state_dict(state, list(model.parameters())),
                             encode_pairs(tokenizer, reference, settings.reference_max_length or settings.max_length),
                             pad_id=tokenizer.pad_token_id or 0, settings=settings)
    del state  # the engine keeps the moments it needs
    return Scorer(engine, tokenizer, settings.max_length, die_after)


class InfluenceActor:
    """The Ray actor: builds its Scorer once in __init__, then scores tasks."""

    def __init__(self, warmup_dir: str, reference: list[Pair], settings: dict, die_after: int | None = None):
        self.scorer = build_scorer(warmup_dir, reference, InfluenceSettings(**settings), die_after)

    def score(self, items: list) -> list[InfluenceResult]:
        return self.scorer.score(items)


def score_distributed(warmup_dir: str | Path, candidates: list[Pair], reference: list[Pair],
                      settings: InfluenceSettings, *, backend: str = "ray", address: str | None = None,
                      num_workers: int | None = None, gpus_per_worker: int = 1, cpus_per_worker: int = 1,
                      on_result=None, progress: bool = False, die_after: dict[int, int] | None = None,
                      ray_init: dict | None = None):
    """Score `candidates` on a pool of workers; returns (results in candidate order, DispatchStats).

    backend "ray": actors on the Ray cluster at `address` (None: a local Ray instance).
    backend "mp": one local process per visible GPU (or `num_workers` CPU processes), no Ray needed.
    die_after: {worker index: k}, test-only fault injection: that worker's process exits on its
    (k+1)-th candidate, holding its in-flight tasks.
    """
    if gpus_per_worker != 1:
        raise ValueError("influence workers use one GPU each (an 8B student's fp32 θ, m, v and shadow, "
                         "16 bytes per parameter, fit one 141 GB H200); set distributed.gpus_per_worker=1")
    die_after = die_after or {}
    results: dict[str, InfluenceResult] = {}

    def collect(result: InfluenceResult) -> None:
        results[result.id] = result
        if on_result is not None:
            on_result(result)

    if backend == "ray":
        init_ray(address, **(ray_init or {}))
        n = worker_count(num_workers, gpus_per_worker, cpus_per_worker)
        ray = __import__("ray")
        ref = ray.put(list(reference))
        actors = start_actors(InfluenceActor, lambda k: (str(warmup_dir), ref, asdict(settings), die_after.get(k)),
                              n, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
        pool = RayPool(actors, "score")
    elif backend == "mp":
        pool = local_pool(partial(build_scorer, str(warmup_dir), list(reference), settings), num_workers,
                          die_after=die_after)
    else:
        raise ValueError(f"backend {backend!r}: choose ray or mp")
    try:
        stats = dispatch(pool, candidates, collect, progress=progress, desc=f"influence ({settings.estimator})")
    finally:
        pool.close()
    return [results[c.id] for c in candidates], stats


def local_pool(factory, num_workers: int | None, die_after: dict[int, int] | None = None,
               method: str = "score") -> ProcessPool:
    """One process per visible GPU (CUDA_VISIBLE_DEVICES=k), or `num_workers` CPU processes."""
    import torch
    gpus = torch.cuda.device_count()
    n = num_workers or max(1, gpus)
    return ProcessPool(partial(_faulty, factory, die_after or {}), n, method,
                       [str(k % gpus) for k in range(n)] if gpus else None)


def _faulty(factory, die_after: dict[int, int], worker: int):
    scorer = factory()
    scorer.die_after = die_after.get(worker)
    return scorer


def run_influence_ray(ctx) -> dict:
    """Stage `influence` on Ray (config distributed.ray=true): the same inputs, outputs and counts as
    montessori.influence.stage.run_influence, with the candidates spread over the cluster."""
    import torch

    from montessori.readers import read_pairs
    from montessori.store import JsonlAppender
    cfg, icfg, dcfg = ctx.config, ctx.config.influence, ctx.config.distributed
    if icfg.utility != "influence":  # the ablations' signals run in this process
        return run_utility(ctx)
    settings = InfluenceSettings.from_config(cfg)
    candidates = probing_pairs(ctx)
    workers, lost, on_gpu = 0, 0, False
    with JsonlAppender(ctx.stage.file("influence.jsonl"), InfluenceResult) as out:
        todo = [c for c in candidates if c.id not in out]
        if todo:
            reference = read_pairs(cfg.data.reference, lenient=cfg.data.lenient, limit=cfg.data.max_reference)
            _, stats = score_distributed(ctx.input("warmup").path, todo, reference.records, settings, backend="ray",
                                         address=dcfg.address, num_workers=dcfg.num_workers,
                                         gpus_per_worker=dcfg.gpus_per_worker, cpus_per_worker=dcfg.cpus_per_worker,
                                         on_result=out.append, progress=ctx.progress)
            workers, lost, on_gpu = stats.workers, len(stats.lost_workers), cluster_gpus() > 0
            ctx.log.info("%d candidates on %d Ray workers (%d lost): %s", len(todo), workers, lost, stats.per_worker)
        wanted = {c.id for c in candidates}
        results = [r for r in out.records if r.id in wanted]
    grad_precision = settings.resolve(torch.device("cuda" if on_gpu else "cpu")).grad_precision
    return influence_counts(results, icfg, grad_precision, ray_workers=workers, ray_workers_lost=lost)
