"""A dynamic work queue over long-lived workers: Ray actors, or local processes (one per GPU).

Every worker builds its expensive state once (a warm-up state, a generation engine) and then runs
tasks. The driver hands the next task to whichever worker is free, so fast workers take more; it
keeps `depth` tasks queued on each worker so none waits for a round trip to the driver; it passes
each task's results to `on_result` as soon as they arrive (the run store appends them); and when a
worker dies it puts the tasks that worker held back at the front of the queue for the others.

Exactly once: a task's results are delivered the first time they arrive and ignored after that, so
a task re-queued after its worker died (but whose results had already come back) is never written
twice, and a task whose results never came back is re-run. Which backend runs the workers is a
constructor argument; this loop is the same for both.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from montessori.errors import MontessoriError

log = logging.getLogger("montessori.distributed")


@dataclass
class Task:
    id: int
    items: list


@dataclass
class Done:
    worker: int
    task: Task
    results: list | None = None
    lost: str | None = None  # why the worker is gone (it died holding this task)


class WorkerLost(MontessoriError):
    pass


class WorkerPool(Protocol):
    def alive(self) -> list[int]: ...

    def submit(self, worker: int, task: Task) -> None: ...

    def wait(self) -> list[Done]: ...  # blocks until at least one task finished or was lost

    def close(self) -> None: ...


@dataclass
class DispatchStats:
    tasks: int = 0
    items: int = 0
    workers: int = 0
    lost_workers: list[int] = field(default_factory=list)
    requeued_tasks: int = 0
    per_worker: dict[int, int] = field(default_factory=dict)  # items finished by each worker


def dispatch(pool: WorkerPool, items: Sequence, on_result: Callable[[Any], None], *, chunk_size: int = 1,
             depth: int = 2, progress: bool = False, desc: str = "tasks") -> DispatchStats:
    """Run `items` in chunks of `chunk_size` on the pool's workers; `on_result(r)` for each result."""
    from tqdm.auto import tqdm
    pending = deque(Task(k, list(items[i:i + chunk_size])) for k, i in enumerate(range(0, len(items), chunk_size)))
    stats = DispatchStats(tasks=len(pending), items=len(items), workers=len(pool.alive()))
    held: dict[int, dict[int, Task]] = {w: {} for w in pool.alive()}
    finished: set[int] = set()
    last_reason = None
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress)
    try:
        while pending or any(held.values()):
            if not held:
                raise WorkerLost(f"all {stats.workers} workers died; {len(pending)} tasks left unfinished; "
                                 f"last reason: {last_reason}")
            for level in range(1, depth + 1):  # breadth first: every free worker gets one before any gets two
                for w, mine in held.items():
                    if pending and len(mine) < level:
                        task = pending.popleft()
                        pool.submit(w, task)
                        mine[task.id] = task
            for done in pool.wait():
                if done.lost is not None:
                    last_reason = done.lost
                    orphans = held.pop(done.worker, {})
                    if orphans or done.worker not in stats.lost_workers:
                        log.warning("worker %d lost (%s); re-queuing its %d tasks", done.worker, done.lost,
                                    len(orphans))
                    if done.worker not in stats.lost_workers:
                        stats.lost_workers.append(done.worker)
                    redo = [t for t in sorted(orphans.values(), key=lambda t: t.id) if t.id not in finished]
                    pending.extendleft(reversed(redo))
                    stats.requeued_tasks += len(redo)
                    continue
                held.get(done.worker, {}).pop(done.task.id, None)
                if done.task.id in finished:
                    continue
                finished.add(done.task.id)
                if any(t.id == done.task.id for t in pending):  # re-queued, yet its results did arrive
                    pending = deque(t for t in pending if t.id != done.task.id)
                for result in done.results:
                    on_result(result)
                stats.per_worker[done.worker] = stats.per_worker.get(done.worker, 0) + len(done.task.items)
                bar.update(len(done.task.items))
    finally:
        bar.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Ray actors


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


def start_actors(cls, args_for: Callable[[int], tuple], n: int, *, gpus_per_worker: int, cpus_per_worker: int):
    """n actors of `cls` (GPUs only where the cluster has any); worker k gets `args_for(k)`."""
    ray = require_ray()
    gpus = gpus_per_worker if cluster_gpus() else 0
    remote = ray.remote(cls).options(num_gpus=gpus, num_cpus=cpus_per_worker, max_restarts=0)
    return [remote.remote(*args_for(k)) for k in range(n)]


class FactoryActor:
    """A generic Ray actor: builds `factory(worker)` once, then runs its `method` on each task (the same
    factory a ProcessPool takes, so a script can run the same workers with or without Ray)."""

    def __init__(self, factory: Callable[[int], Any], worker: int, method: str):
        self.fn = getattr(factory(worker), method)

    def run(self, items: list) -> list:
        return self.fn(items)


def start_factory_actors(factory: Callable[[int], Any], n: int, method: str, *, gpus_per_worker: int = 1,
                         cpus_per_worker: int = 1) -> RayPool:
    return RayPool(start_actors(FactoryActor, lambda k: (factory, k, method), n, gpus_per_worker=gpus_per_worker,
                                cpus_per_worker=cpus_per_worker), "run")


class RayPool:
    def __init__(self, actors: list, method: str):
        self.ray = require_ray()
        self.actors = dict(enumerate(actors))
        self.method = method
        self.refs: dict[Any, tuple[int, Task]] = {}

    def alive(self) -> list[int]:
        return list(self.actors)

    def submit(self, worker: int, task: Task) -> None:
        ref = getattr(self.actors[worker], self.method).remote(task.items)
        self.refs[ref] = (worker, task)

    def wait(self) -> list[Done]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            worker, task = self.refs.pop(ref)
            try:
                out.append(Done(worker, task, self.ray.get(ref)))
            except self.ray.exceptions.RayActorError as err:  # the actor process is gone
                self.actors.pop(worker, None)
                out.append(Done(worker, task, lost=_last_line(err)))
        return out

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()


def _last_line(err: BaseException) -> str:
    """The gist of a Ray error (its last non-empty line: the actor's own exception when it failed
    to start, else why it died)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]


# ---------------------------------------------------------------------------------------------
# Local processes (torch.multiprocessing, spawn): the same workers without Ray, e.g. on one host


def _process_main(worker: int, gpus: str | None, factory_blob: bytes, method: str, inbox, outbox) -> None:
    if gpus is not None:  # before anything touches CUDA (torch initialises it lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        fn = getattr(pickle.loads(factory_blob)(worker), method)
    except Exception:
        outbox.put((worker, None, "error", traceback.format_exc()))
        return
    outbox.put((worker, None, "ready", None))
    while (msg := inbox.get()) is not None:
        task_id, items = msg
        try:
            outbox.put((worker, task_id, "ok", fn(items)))
        except Exception:
            outbox.put((worker, task_id, "error", traceback.format_exc()))


class ProcessPool:
    """`n` spawned processes; worker k builds `factory(k)` once (factory must pickle: a module-level
    function or a functools.partial of one). `gpus[k]` is worker k's CUDA_VISIBLE_DEVICES."""

    def __init__(self, factory: Callable[[int], Any], n: int, method: str, gpus: Sequence[str | None] | None = None,
                 poll_seconds: float = 0.5):
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        blob = pickle.dumps(factory)
        self.outbox = ctx.Queue()
        self.inboxes, self.procs = {}, {}
        self.held: dict[int, dict[int, Task]] = {}
        self.poll = poll_seconds
        for k in range(n):
            self.inboxes[k] = ctx.Queue()
            self.procs[k] = ctx.Process(target=_process_main, daemon=True,
                                        args=(k, gpus[k] if gpus else None, blob, method, self.inboxes[k], self.outbox))
            self.procs[k].start()
            self.held[k] = {}

    def alive(self) -> list[int]:
        return list(self.held)

    def submit(self, worker: int, task: Task) -> None:
        self.held[worker][task.id] = task
        self.inboxes[worker].put((task.id, task.items))

    def wait(self) -> list[Done]:
        while True:
            try:
                worker, task_id, kind, payload = self.outbox.get(timeout=self.poll)
            except queue.Empty:
                lost = self._reap()
                if lost:
                    return lost
                continue
            if kind == "error":
                raise MontessoriError(f"worker {worker} failed:\n{payload}")
            if kind == "ready" or worker not in self.held:
                continue
            task = self.held[worker].pop(task_id)
            return [Done(worker, task, payload)]

    def _reap(self) -> list[Done]:
        """Workers whose process exited: every task they held is lost."""
        out = []
        for worker in list(self.held):
            code = self.procs[worker].exitcode
            if code is not None:
                tasks = self.held.pop(worker)
                out += [Done(worker, t, lost=f"process exited with code {code}") for t in tasks.values()]
                if not tasks:
                    out.append(Done(worker, Task(-1, []), lost=f"process exited with code {code}"))
        return out

    def close(self) -> None:
        for worker, inbox in self.inboxes.items():
            if self.procs[worker].exitcode is None:
                inbox.put(None)
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.exitcode is None:
                proc.terminate()
        self.held.clear()
