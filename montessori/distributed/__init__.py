"""Scale-out: influence and generation over many GPUs and machines (Ray, or local processes), and
multi-GPU launch of the training stages (accelerate / torchrun). docs/scaling.md explains when to use which.

    from montessori.distributed.ray_influence import score_distributed, InfluenceSettings
    results, stats = score_distributed("RUN/round-1/warmup", candidates, reference, InfluenceSettings())

Ray is an optional extra (pip install 'montessori[ray]'); nothing here imports it until it is used.
"""

from montessori.distributed.scheduler import DispatchStats, ProcessPool, RayPool, Task, WorkerLost, dispatch

__all__ = ["DispatchStats", "ProcessPool", "RayPool", "Task", "WorkerLost", "dispatch"]
