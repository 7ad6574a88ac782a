"""Long-lived workers on this host without Ray (one process per GPU), and what every pool shares.

A pool's workers each build their expensive state once (a warm-up state, a generation engine) and
then run tasks, each a list of items. `pool.map(tasks, on_result, key)` hands every task to a free
worker and passes each result to `on_result` as it arrives, once per `key(result)`: only the driver
writes, so a task that ran twice (retried after its worker died) or an item sent twice is written once.

LocalPool is the standard library's ProcessPoolExecutor (spawn; the workers take tasks from one
shared queue, so fast workers take more). It does not re-run a dead process's tasks: a process that
dies breaks the pool and the call fails with WorkerLost (on one host a dead worker is an OOM or a
bug, not a lost node; the stages resume from what was written). Ray's pool (ray.py) re-runs them.
It exists for hosts without Ray: the GPU image bench/scale.py runs on has none.

A stage sees none of this: it calls `ctx.map(factory, method, items, on_result)` or maps several
times inside `with ctx.workers(factory, method)` (context.py), and an executor sets the context's
`mapper` to a PoolMap over a pool (`local_map` here, `ray_map` in ray.py), which opens the pool for
the block, sends one item per task (or `batch_size` for generation's prompts) and closes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from montessori.errors import MontessoriError


class WorkerLost(MontessoriError):
    pass


@dataclass
class TaskResult:
    """What a worker returns for one task: the results of its items, and who computed them."""
    worker: int
    restarted: bool  # this worker's process is a restart (Ray restarted it after it died)
    results: list


@dataclass
class PoolStats:
    workers: int
    tasks: int = 0
    items: int = 0
    per_worker: dict[int, int] = field(default_factory=dict)  # items finished by each worker
    restarted: set[int] = field(default_factory=set)  # workers whose process died and was restarted


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def deliver(done: Iterable[TaskResult], stats: PoolStats, on_result: Callable[[Any], None],
            key: Callable[[Any], Any], *, progress: bool = False, desc: str = "tasks") -> PoolStats:
    """Pass each finished task's results to `on_result`, the first time each key arrives (exactly once)."""
    from tqdm.auto import tqdm
    seen = set()
    with tqdm(total=stats.items, desc=desc, unit="item", disable=not progress) as bar:
        for task in done:
            stats.per_worker[task.worker] = stats.per_worker.get(task.worker, 0) + len(task.results)
            if task.restarted:
                stats.restarted.add(task.worker)
            for result in task.results:
                if key(result) not in seen:
                    seen.add(key(result))
                    on_result(result)
            bar.update(len(task.results))
    return stats


@dataclass
class PoolSession:
    """A pool's workers for one (factory, method), open for the maps of a stage's `ctx.workers` block."""
    pool: Any
    stats: list[PoolStats]
    batch_size: int

    def map(self, items: Sequence, on_result: Callable[[Any], None], *, key: Callable[[Any], Any],
            desc: str = "items", progress: bool = False, batch: bool = False) -> None:
        # One item per task (the next goes to whichever worker is free), or `batch_size` items per task
        # for items computed best together (generation's prompts).
        tasks = chunks(list(items), self.batch_size if batch else 1)
        self.stats.append(self.pool.map(tasks, on_result, key, progress=progress, desc=desc))

    def close(self) -> None:
        self.pool.close()


@dataclass
class PoolMap:
    """The executors' side of `ctx.map` / `ctx.workers` (context.StageContext): `open(factory, method)`
    starts a pool (`open_pool`: every worker builds factory() once); each map sends its items to
    whichever worker is free and delivers each key once; the stage's block closes it. `stats`: one
    PoolStats per map, which the executor adds to the stage's counts as `{name}_workers`,
    `{name}_workers_lost`."""
    open_pool: Callable[[Callable[[], Any], str], Any]
    name: str = "pool"
    batch_size: int = 1  # items per task for maps of items computed together (batch=True)
    stats: list[PoolStats] = field(default_factory=list)

    def open(self, factory: Callable[[], Any], method: str) -> PoolSession:
        return PoolSession(self.open_pool(factory, method), self.stats, self.batch_size)

    def __call__(self, factory: Callable[[], Any], method: str, items: Sequence, on_result: Callable[[Any], None],
                 *, key: Callable[[Any], Any], desc: str = "items", progress: bool = False) -> None:
        """One map on a pool opened for it (what ctx.map does through `open`)."""
        items = list(items)
        if not items:
            return
        session = self.open(factory, method)
        try:
            session.map(items, on_result, key=key, desc=desc, progress=progress)
        finally:
            session.close()

    def counts(self) -> dict:
        """What the stage's manifest records of its workers (nothing when the stage mapped nothing)."""
        if not self.stats:
            return {}
        return {f"{self.name}_workers": max(s.workers for s in self.stats),
                f"{self.name}_workers_lost": sum(len(s.restarted) for s in self.stats)}


def local_map(num_workers: int | None = None, batch_size: int = 8) -> PoolMap:
    """ctx.map on this host's processes: one per visible GPU (CUDA_VISIBLE_DEVICES=k), or
    `num_workers` (CPU processes without GPUs); `batch_size` prompts per generation task."""

    def open_pool(factory: Callable[[], Any], method: str) -> LocalPool:
        import torch
        gpus = torch.cuda.device_count()
        n = num_workers or max(1, gpus)
        return LocalPool(factory, n, method, [str(k % gpus) for k in range(n)] if gpus else None)

    return PoolMap(open_pool, "local", batch_size)


_worker: dict = {}  # this process's worker: its index and the method it runs


def _start(factory: Callable[[], Any], method: str, slots, ready) -> None:
    worker, gpu = slots.get()
    if gpu is not None:  # before anything touches CUDA (torch initialises it lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _worker.update(index=worker, fn=getattr(factory(), method), ready=ready)


def _run(items: list) -> TaskResult:
    return TaskResult(_worker["index"], False, list(_worker["fn"](items)))


def _ready() -> None:
    _worker["ready"].wait()  # each worker holds one of these until all have arrived: one per worker


class LocalPool:
    """`n` spawned processes, each building `factory()` once (factory must pickle: a module-level
    function or a functools.partial of one) and running its `method` on tasks. `gpus[k]` is worker
    k's CUDA_VISIBLE_DEVICES."""

    def __init__(self, factory: Callable[[], Any], n: int, method: str, gpus: Sequence[str | None] | None = None):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for k in range(n):
            slots.put((k, gpus[k] if gpus else None))
        self.workers = n
        self.executor = ProcessPoolExecutor(n, mp_context=context, initializer=_start,
                                            initargs=(factory, method, slots, context.Barrier(n)))
        try:  # returns once every worker has built its state (a benchmark's clock starts after setup)
            for future in [self.executor.submit(_ready) for _ in range(n)]:
                future.result()
        except BrokenProcessPool as err:
            raise WorkerLost(f"a local worker process died while building its state ({err})") from err

    def map(self, tasks: list[list], on_result: Callable[[Any], None], key: Callable[[Any], Any], *,
            progress: bool = False, desc: str = "tasks") -> PoolStats:
        stats = PoolStats(self.workers, len(tasks), sum(map(len, tasks)))
        futures = [self.executor.submit(_run, task) for task in tasks]
        try:
            return deliver((f.result() for f in as_completed(futures)), stats, on_result, key,
                           progress=progress, desc=desc)
        except BrokenProcessPool as err:
            raise WorkerLost(f"a local worker process died ({err}); its tasks are not re-run without Ray "
                             f"(distributed.ray); what was written is kept") from err

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)
