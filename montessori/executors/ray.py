"""Workers on Ray: one actor per GPU (or per tensor-parallel group), built once, fed by Ray's ActorPool.

What Ray gives, and we do not re-implement:
- dynamic dispatch: `ActorPool.map_unordered` hands the next task to whichever actor is free, so
  fast GPUs take more, and yields results as they finish. Each actor is in the pool twice (SLOTS),
  so it has its next task queued while it runs one instead of idling for a driver round trip;
- re-run of a dead worker's tasks: actors are created with `max_restarts` and `max_task_retries`;
  when an actor's process dies (a node lost, a process killed) Ray starts it again, its __init__
  rebuilds the state, and Ray re-runs the tasks it held on it (tests/test_ray_influence.py kills
  one mid-task). After RESTARTS deaths of one actor Ray gives up and the call fails: a task that
  kills every process it runs on (an OOM) must not loop forever;
- one result per task: a task's ObjectRef resolves once, however many times the task ran.

What is ours (local.deliver): only the driver writes, each result once by its key, so a stage
resumed from its file or an item sent twice never writes a line twice.

Measured against the dispatcher this replaced (bench/actorpool.py, 2 actors, this 2-core CPU box
under load): with each actor in the pool once, a task of 5 / 20 ms took 7.6-8.3 / 25.0-26.0 ms
per actor against 6.1 / 22.8-23.2 ms for its two-deep queue; with two slots per actor, 6.2-6.5 /
22.2-22.8 ms, the same. Accepted difference: a dead actor's tasks wait for that actor's restart
(Ray places it on any node with free resources) instead of going to the survivors at once; after
a node loss with no spare GPU they wait until the node (or the autoscaler) brings one back.

Generation runs through the same pool: a generation stage opens `ctx.workers(engine, "generate")`
(generation/backends: each actor builds the engine `generation.backend` names once) and maps each
call's prompts with batch=True, which sends them in tasks of `distributed.generation_chunk` prompts,
reassembled in request order by the stage. The chunks are fixed by the request order, and a chunk is
sampled exactly as a single-process backend samples a batch of those prompts (the transformers backend
seeds a batch from its first request, vLLM seeds each request), so the output does not depend on how
many engines there are or which one ran a chunk. With chunks at least as large as a call, it equals the
single-process run (vLLM: with any chunk size). A call must hold several chunks to keep every engine
busy: raise generation.batch_size (the stages pass batch_size // n prompts per call) to about
workers x generation_chunk x n. An actor given several GPUs (distributed.gpus_per_worker) runs vLLM
tensor-parallel over them (WORKER_GPUS).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from montessori.context import WORKER_GPUS
from montessori.errors import MontessoriError
from montessori.executors.local import PoolMap, PoolStats, TaskResult, WorkerLost, deliver

RESTARTS = 3  # per actor: a few node losses or preemptions in a run; more means something is broken
SLOTS = 2  # tasks in flight per actor: one running, one queued on the actor


def require_ray():
    try:
        import ray
    except ImportError:
        raise MontessoriError("distributed.ray=true needs Ray: pip install 'montessori[ray]'") from None
    return ray


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect once: a local Ray instance by default, `address` ("auto", "ray://head:10001") for a cluster."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, **kwargs)


def cluster_gpus() -> int:
    return int(require_ray().cluster_resources().get("GPU", 0))


def worker_count(num_workers: int | None, gpus_per_worker: int, cpus_per_worker: int) -> int:
    """num_workers, else as many workers as the cluster's GPUs (its CPUs when it has none) allow."""
    if num_workers:
        return num_workers
    gpus = cluster_gpus()
    if gpus:
        return max(1, gpus // max(1, gpus_per_worker))
    return max(1, int(require_ray().cluster_resources().get("CPU", 1)) // max(1, cpus_per_worker))


class Worker:
    """The actor: builds `factory()` once (again after a restart), then runs its `method` on tasks."""

    def __init__(self, factory: Callable[[], Any], worker: int, method: str, threads: int = 1, gpus: int = 0):
        import ray
        import torch
        os.environ[WORKER_GPUS] = str(gpus)  # before factory(): a generation engine spans them (tensor parallel)
        # As many torch threads as CPUs reserved: Ray leaves an inherited OMP_NUM_THREADS alone, and
        # actors that each take every core oversubscribe the machine (and sum in another order).
        torch.set_num_threads(max(1, threads))
        self.worker, self.restarted = worker, ray.get_runtime_context().was_current_actor_reconstructed
        self.fn = getattr(factory(), method)

    def run(self, items: list) -> TaskResult:
        return TaskResult(self.worker, self.restarted, list(self.fn(items)))


class RayPool:
    """`n` actors of Worker(factory, k, method) (GPUs only where the cluster has any)."""

    def __init__(self, factory: Callable[[], Any], n: int, method: str, *, gpus_per_worker: int = 1,
                 cpus_per_worker: int = 1):
        ray = require_ray()
        from ray.util import ActorPool
        gpus = gpus_per_worker if cluster_gpus() else 0
        remote = ray.remote(Worker).options(num_gpus=gpus, num_cpus=cpus_per_worker,
                                            max_restarts=RESTARTS, max_task_retries=RESTARTS)
        self.ray, self.workers = ray, n
        self.actors = [remote.remote(factory, k, method, cpus_per_worker, gpus) for k in range(n)]
        self.pool = ActorPool(self.actors * SLOTS)  # an actor's tasks run in order, one at a time

    def map(self, tasks: list[list], on_result: Callable[[Any], None], key: Callable[[Any], Any], *,
            progress: bool = False, desc: str = "tasks") -> PoolStats:
        stats = PoolStats(self.workers, len(tasks), sum(map(len, tasks)))
        try:
            return deliver(self.pool.map_unordered(lambda actor, task: actor.run.remote(task), tasks), stats,
                           on_result, key, progress=progress, desc=desc)
        except self.ray.exceptions.RayActorError as err:  # it failed to start, or died more than RESTARTS times
            raise WorkerLost(f"a Ray worker is gone: {_last_line(err)}; what was written is kept") from err

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()


def ray_map(dcfg) -> PoolMap:
    """ctx.map on Ray actors (config distributed.*: address, num_workers, gpus_per_worker,
    cpus_per_worker, generation_chunk); Ray starts only when a stage maps something. An actor gets
    gpus_per_worker GPUs: generation's vLLM engines run tensor-parallel over them; the influence scorer
    uses one, so keep it 1 unless the teacher needs several (docs/scaling.md)."""

    def open_pool(factory: Callable[[], Any], method: str) -> RayPool:
        init_ray(dcfg.address)
        return RayPool(factory, worker_count(dcfg.num_workers, dcfg.gpus_per_worker, dcfg.cpus_per_worker), method,
                       gpus_per_worker=dcfg.gpus_per_worker, cpus_per_worker=dcfg.cpus_per_worker)

    return PoolMap(open_pool, "ray", dcfg.generation_chunk)


def _last_line(err: BaseException) -> str:
    """The gist of a Ray error: its last non-empty line (the actor's own exception when it failed
    to start, else why it died)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]
