"""Where stages run: in this process (the default), on Ray actors, on local processes, or on the
ranks of a launcher. An executor is called as `executor(stage, ctx)` (stage: a context.Stage) and
knows no stage by name: it gives the context a `mapper` (how `ctx.map` hands out a stage's work
items, context.py) and, for a stage whose `launch` is set, may start it on several ranks.
docs/scaling.md says when to use which.

    launcher.py   maybe_launch: the pipeline's executor (Ray maps for distributed.ray; accelerate /
                  torchrun ranks for stages with launch=True); local_executor: a local process pool
    ray.py        ray_map, RayPool (Ray's ActorPool over restartable actors), for influence and generation
    local.py      local_map, LocalPool (processes on this host, no Ray), and what the pools share (PoolMap)

    from functools import partial
    from montessori.executors.local import local_map
    from montessori.influence.scorer import build_scorer
    scored = {}
    local_map(2)(partial(build_scorer, "RUN/round-1/warmup", reference, InfluenceSettings()), "score",
                 candidates, lambda r: scored.__setitem__(r.id, r), key=lambda r: r.id)

Ray is an optional extra (pip install 'montessori[ray]'); nothing here imports it until it is used.
"""
