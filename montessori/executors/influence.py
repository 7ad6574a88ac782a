"""Stage `influence` over many GPUs and machines: one worker per GPU, each holding the warm-up state once.

    driver                          worker k (a Ray actor, or a local process: ray.py, local.py)
    ------                          --------
    probing pairs  -- 1 pair -->    InfluenceEngine(warm-up state, reference set), built once
    influence.jsonl <-- result --   engine.score(pair): step, evaluate, restore (engine.py)

Candidates go one at a time to whichever worker is free, results are appended to influence.jsonl
as they arrive, once per candidate id, and on Ray a worker that dies is restarted and its
in-flight candidates re-run (ray.py says what Ray does and what is ours). Every worker runs the
single-process engine on the same warm-up state, so a value does not depend on which worker, or
how many, computed it.

Workers read the warm-up folder themselves (RUN/round-R/warmup/): on a cluster the run directory
must be on storage every node sees (NFS, a shared volume), as it is for any multi-node training.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from montessori.executors.local import LocalPool, PoolStats, chunks
from montessori.executors.ray import RayPool, cluster_gpus, init_ray, worker_count
from montessori.influence.settings import InfluenceSettings
from montessori.influence.stage import influence_counts, probing_pairs, run_utility
from montessori.models.batching import encode_pairs
from montessori.records import InfluenceResult, Pair


class Scorer:
    """An InfluenceEngine plus the tokenizer that encodes pairs for it; scores a task of pairs
    (or of already encoded batching.Example, as bench/scale.py sends)."""

    def __init__(self, engine, tokenizer=None, max_length: int | None = None, die_once: str | None = None):
        self.engine, self.tokenizer, self.max_length, self.die_once = engine, tokenizer, max_length, die_once

    def score(self, items: list) -> list[InfluenceResult]:
        out = []
        examples = [encode_pairs(self.tokenizer, [item], self.max_length)[0] if isinstance(item, Pair) else item
                    for item in items]
        for result in self.engine.score_many(examples):
            if self.die_once and _claim(self.die_once):
                os._exit(17)  # fault injection (tests): the process vanishes mid-task, as on a node loss
            out.append(result)
        return out


def _claim(flag: str) -> bool:
    """True for the one process that creates `flag` (atomic), so a single worker dies, once."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def build_scorer(warmup_dir: str, reference: list[Pair], settings: InfluenceSettings,
                 die_once: str | None = None) -> Scorer:
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
    return Scorer(engine, tokenizer, settings.max_length, die_once)


def score_distributed(warmup_dir: str | Path, candidates: list[Pair], reference: list[Pair],
                      settings: InfluenceSettings, *, backend: str = "ray", address: str | None = None,
                      num_workers: int | None = None, gpus_per_worker: int = 1, cpus_per_worker: int = 1,
                      on_result=None, progress: bool = False, die_once: str | Path | None = None,
                      ray_init: dict | None = None) -> tuple[list[InfluenceResult], PoolStats]:
    """Score `candidates` on a pool of workers; returns (results in candidate order, PoolStats).

    backend "ray": actors on the Ray cluster at `address` (None: a local Ray instance).
    backend "mp": one local process per visible GPU (or `num_workers` CPU processes), no Ray needed.
    `on_result(r)` gets each candidate's result once, as it arrives.
    die_once: a file path, test-only fault injection: the first worker to score a candidate creates
    it and its process exits holding that candidate (a restarted worker finds the file and carries on).
    """
    if gpus_per_worker != 1:
        raise ValueError("influence workers use one GPU each (an 8B student's fp32 θ, m, v and shadow, "
                         "16 bytes per parameter, fit one 141 GB H200); set distributed.gpus_per_worker=1")
    factory = partial(build_scorer, str(warmup_dir), list(reference), settings, die_once and str(die_once))
    if backend == "ray":
        init_ray(address, **(ray_init or {}))
        pool = RayPool(factory, worker_count(num_workers, gpus_per_worker, cpus_per_worker), "score",
                       gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    elif backend == "mp":
        pool = local_pool(factory, num_workers)
    else:
        raise ValueError(f"backend {backend!r}: choose ray or mp")
    results: dict[str, InfluenceResult] = {}

    def collect(result: InfluenceResult) -> None:
        results[result.id] = result
        if on_result is not None:
            on_result(result)

    try:
        stats = pool.map(chunks(candidates, 1), collect, key=lambda r: r.id, progress=progress,
                         desc=f"influence ({settings.estimator})")
    finally:
        pool.close()
    return [results[c.id] for c in candidates], stats


def local_pool(factory, num_workers: int | None, method: str = "score") -> LocalPool:
    """One process per visible GPU (CUDA_VISIBLE_DEVICES=k), or `num_workers` CPU processes."""
    import torch
    gpus = torch.cuda.device_count()
    n = num_workers or max(1, gpus)
    return LocalPool(factory, n, method, [str(k % gpus) for k in range(n)] if gpus else None)


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
            workers, lost, on_gpu = stats.workers, len(stats.restarted), cluster_gpus() > 0
            ctx.log.info("%d candidates on %d Ray workers (%d restarted): %s", len(todo), workers, lost, stats.per_worker)
        wanted = {c.id for c in candidates}
        results = [r for r in out.records if r.id in wanted]
    grad_precision = settings.resolve(torch.device("cuda" if on_gpu else "cpu")).grad_precision
    return influence_counts(results, icfg, grad_precision, ray_workers=workers, ray_workers_lost=lost)
