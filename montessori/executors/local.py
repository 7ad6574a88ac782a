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
class Batch:
    """What a worker returns for one task."""
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


def deliver(batches: Iterable[Batch], stats: PoolStats, on_result: Callable[[Any], None],
            key: Callable[[Any], Any], *, progress: bool = False, desc: str = "tasks") -> PoolStats:
    """Pass each batch's results to `on_result`, the first time each key arrives (exactly once)."""
    from tqdm.auto import tqdm
    seen = set()
    with tqdm(total=stats.items, desc=desc, unit="item", disable=not progress) as bar:
        for batch in batches:
            stats.per_worker[batch.worker] = stats.per_worker.get(batch.worker, 0) + len(batch.results)
            if batch.restarted:
                stats.restarted.add(batch.worker)
            for result in batch.results:
                if key(result) not in seen:
                    seen.add(key(result))
                    on_result(result)
            bar.update(len(batch.results))
    return stats


_worker: dict = {}  # this process's worker: its index and the method it runs


def _start(factory: Callable[[], Any], method: str, slots, ready) -> None:
    worker, gpu = slots.get()
    if gpu is not None:  # before anything touches CUDA (torch initialises it lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _worker.update(index=worker, fn=getattr(factory(), method), ready=ready)


def _run(items: list) -> Batch:
    return Batch(_worker["index"], False, _worker["fn"](items))


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
