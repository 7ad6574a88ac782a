"""Where stages run: in this process (the default), on Ray actors, on local processes, or on the
ranks of a launcher. Executors import stages, never the reverse; docs/scaling.md says when to use which.

    launcher.py   maybe_launch: the pipeline's executor; accelerate / torchrun ranks for dpo and sft
    influence.py  stage `influence` over workers (score_distributed, run_influence_ray)
    ray.py        RayPool (Ray's ActorPool over restartable actors) and RayBackend for generation
    local.py      LocalPool (processes on this host, no Ray) and what the pools share

    from montessori.executors.influence import score_distributed
    results, stats = score_distributed("RUN/round-1/warmup", candidates, reference, InfluenceSettings())

Ray is an optional extra (pip install 'montessori[ray]'); nothing here imports it until it is used.
"""
