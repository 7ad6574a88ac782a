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

Generation: RayBackend implements the same `generate(requests, sampling)` as every backend, so
the generation stages use it unchanged (the executor hands it to them: launcher.maybe_launch).
Each call is cut into chunks of `distributed.generation_chunk` prompts and reassembled in request
order. The chunks are fixed by the request order, and a chunk is sampled exactly as a
single-process backend samples a batch of those prompts (the transformers backend seeds a batch
from its first request, vLLM seeds each request), so the output does not depend on how many
engines there are or which one ran a chunk. With chunks at least as large as a call, it equals the
single-process run (vLLM: with any chunk size). A call must hold several chunks to keep every
engine busy: raise generation.batch_size (the stages pass batch_size // n prompts per call) to
about workers x generation_chunk x n.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from montessori.errors import MontessoriError
from montessori.executors.local import PoolMap, PoolStats, TaskResult, WorkerLost, chunks, deliver
from montessori.generation.backends.base import Backend, Completion, Request, Sampling

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

    def __init__(self, factory: Callable[[], Any], worker: int, method: str, threads: int = 1):
        import ray
        import torch
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
        self.actors = [remote.remote(factory, k, method, cpus_per_worker) for k in range(n)]
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
    cpus_per_worker); Ray starts only when a stage maps something. (gpus_per_worker > 1 is for
    generation's tensor-parallel engines, RayBackend.)"""

    def open_pool(factory: Callable[[], Any], method: str) -> RayPool:
        if dcfg.gpus_per_worker != 1:
            raise ValueError("ctx.map's workers use one GPU each (influence: an 8B student's fp32 θ, m, v and "
                             "shadow, 16 bytes per parameter, fit one 141 GB H200); set distributed.gpus_per_worker=1")
        init_ray(dcfg.address)
        return RayPool(factory, worker_count(dcfg.num_workers, 1, dcfg.cpus_per_worker), method,
                       gpus_per_worker=1, cpus_per_worker=dcfg.cpus_per_worker)

    return PoolMap(open_pool, "ray")


def _last_line(err: BaseException) -> str:
    """The gist of a Ray error: its last non-empty line (the actor's own exception when it failed
    to start, else why it died)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]


# ---------------------------------------------------------------------------------------------
# Generation


class ChunkGenerator:
    """One engine, built once: the backend `generation.backend` names, on this actor's GPU(s)."""

    def __init__(self, spec: str, generation: dict, models: dict, tensor_parallel: int = 1):
        from montessori.config import GenerationConfig, ModelsConfig
        from montessori.generation.backends import choose_backend, make_backend
        gen_cfg, models_cfg = GenerationConfig(**generation), ModelsConfig(**models)
        if tensor_parallel > 1:
            if choose_backend(gen_cfg) != "vllm":
                raise ValueError("distributed.gpus_per_worker > 1 needs generation.backend=vllm (tensor parallel)")
            from montessori.generation.backends.vllm import VLLMBackend
            # Ray gave this actor `tensor_parallel` GPUs; vLLM's own workers run as local processes on them.
            self.backend = VLLMBackend(spec, dtype=models_cfg.dtype, tensor_parallel_size=tensor_parallel,
                                       distributed_executor_backend="mp")
        else:
            self.backend = make_backend(spec, gen_cfg, models_cfg)

    def generate(self, items: list[tuple[int, Request, Sampling]]) -> list[tuple[int, list[Completion]]]:
        sampling = items[0][2]
        completions = self.backend.generate([r for _, r, _ in items], sampling)
        return [(i, c) for (i, _, _), c in zip(items, completions)]


class RayBackend(Backend):
    name = "ray"

    def __init__(self, spec: str, config, *, progress: bool = False):
        dcfg, gen = config.distributed, config.generation
        if gen.backend == "http" or (gen.backend == "auto" and gen.base_url):
            raise ValueError("distributed.ray with generation.backend=http: the server already spreads the "
                             "work; use it without Ray")
        init_ray(dcfg.address)
        factory = partial(ChunkGenerator, spec, gen.model_dump(), config.models.model_dump(), dcfg.gpus_per_worker)
        self.pool = RayPool(factory, worker_count(dcfg.num_workers, dcfg.gpus_per_worker, dcfg.cpus_per_worker),
                            "generate", gpus_per_worker=dcfg.gpus_per_worker, cpus_per_worker=dcfg.cpus_per_worker)
        self.chunk, self.progress = dcfg.generation_chunk, progress
        self.stats: list[PoolStats] = []  # one per call

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        out: dict[int, list[Completion]] = {}
        tasks = chunks([(i, r, sampling) for i, r in enumerate(requests)], self.chunk)
        self.stats.append(self.pool.map(tasks, lambda r: out.__setitem__(*r), key=lambda r: r[0],
                                        progress=self.progress, desc="generation"))
        return [out[i] for i in range(len(requests))]

    def close(self) -> None:
        self.pool.close()
