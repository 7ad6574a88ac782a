"""What Ray's ActorPool costs against keeping two tasks queued per actor (the hand-written dispatcher
it replaced): milliseconds per task per actor for tasks of 0, 5 and 20 ms of busy work on 2 actors.

    OMP_NUM_THREADS=1 python bench/actorpool.py

ActorPool keeps one task in flight per pool entry, so an actor listed once idles for one driver
round trip between tasks; listed twice (executors/ray.py) it has the next task queued, as the
depth-2 loop does.
"""

from __future__ import annotations

import time

import ray
from ray.util import ActorPool


@ray.remote(num_cpus=1)
class Busy:
    def run(self, x: int, seconds: float) -> int:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            pass
        return x


def actor_pool(actors, n: int, seconds: float) -> None:
    for _ in ActorPool(actors).map_unordered(lambda a, x: a.run.remote(x, seconds), range(n)):
        pass


def actor_pool_two_slots(actors, n: int, seconds: float) -> None:
    """Each actor twice in the pool: a second task waits on the actor while the first runs."""
    actor_pool(actors * 2, n, seconds)


def depth_two(actors, n: int, seconds: float) -> None:
    todo, held = list(range(n)), {}
    for a in actors * 2:
        if todo:
            held[a.run.remote(todo.pop(), seconds)] = a
    while held:
        [ref], _ = ray.wait(list(held), num_returns=1)
        actor = held.pop(ref)
        ray.get(ref)
        if todo:
            held[actor.run.remote(todo.pop(), seconds)] = actor


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    actors = [Busy.remote() for _ in range(2)]
    ray.get([a.run.remote(0, 0) for a in actors])
    print("| task | ActorPool | ActorPool, 2 slots per actor | depth 2 (ray.wait loop) |\n|---|---|---|---|")
    for seconds in (0.0, 0.005, 0.02):
        n = 400 if seconds < 0.01 else 100
        row = []
        for run in (actor_pool, actor_pool_two_slots, depth_two):
            start = time.perf_counter()
            run(actors, n, seconds)
            row.append((time.perf_counter() - start) / n * len(actors) * 1e3)
        print(f"| {seconds * 1e3:.0f} ms | " + " | ".join(f"{ms:.2f}" for ms in row) + " |")


if __name__ == "__main__":
    main()
