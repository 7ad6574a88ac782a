"""What a stage is and what it is given: imported by the runner (`montessori.pipeline`) and by the
executors (`montessori.executors`), and importing neither, so neither imports the other."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from montessori.config import Config
from montessori.store import RunStore, StageDir


@dataclass(frozen=True)
class Stage:
    """A stage of the method, declared beside its function with `@stage(...)`; `montessori.pipeline.STAGES`
    lists the functions in the order a round runs them."""

    name: str
    function: Callable[[StageContext], dict]
    keys: tuple[str, ...]  # dotted config keys the stage reads (`sft.lr`, or a section `generation.steer`): fingerprinted
    inputs: tuple[str, ...] = ()  # stages of the same round whose output it reads
    round_inputs: tuple[str, ...] = ()  # stages of the previous round it reads (teacher, student)
    files: tuple[str, ...] = ()  # keys among `keys` naming input files: fingerprinted by content, read by preflight
    models: tuple[str, ...] = ()  # "teacher", "student": the models.* specs it loads (preflight checks those only)
    generates: bool = False  # samples from the teacher through generation.backend (preflight checks the backend)
    baseline: bool = False  # part of the Self-Instruct baseline (method: self-instruct): the teacher writes the data
    launch: bool = False  # may run on several ranks through accelerate / torchrun (TRL's trainers)
    next_round: str | None = None  # "teacher" / "student": its model/ is the next round's teacher / student


# Every stage declared so far, by name (filled as the stage modules are imported: montessori.method
# imports them all). StageContext reads `next_round` from here to find last round's teacher/student.
DECLARED: dict[str, Stage] = {}


def stage(name: str, **declaration) -> Callable[[Callable], Callable]:
    """Declare the decorated function a stage: `fn.stage` is its Stage (config keys, inputs, needs).

    The function takes the context, then one parameter per declared input it reads, named as the
    input: the runner passes that stage's folder (a StageDir of this round), so no stage names another
    stage's folder itself:

        @stage("dpo", keys=..., inputs=("preferences",))
        def run_dpo(ctx, preferences): ...    # preferences.path / "preferences.jsonl"

    It is called with the context alone (`run_dpo(ctx)`): the wrapper fills in the folders."""

    def declare(fn: Callable[..., dict]) -> Callable[[StageContext], dict]:
        reads = list(inspect.signature(fn).parameters)[1:]
        inputs = declaration.get("inputs", ())
        undeclared = [p for p in reads if p not in inputs]
        if undeclared:
            raise TypeError(f"stage {name}: parameters {undeclared} are not among its declared inputs {inputs}")

        @functools.wraps(fn)
        def run(ctx: StageContext) -> dict:
            return fn(ctx, **{p: ctx.input(p) for p in reads})

        run.stage = DECLARED[name] = Stage(name, run, **declaration)
        return run

    return declare


# The environment variable through which an executor tells a worker process how many GPUs it was given
# (executors.ray sets it; a generation engine runs vLLM tensor-parallel over them).
WORKER_GPUS = "MONTESSORI_WORKER_GPUS"


class Session(Protocol):
    """Workers an executor started for one (factory, method): each built factory() once."""

    def map(self, items: list, on_result: Callable[[Any], None], *, key: Callable[[Any], Hashable],
            desc: str, progress: bool, batch: bool) -> None: ...

    def close(self) -> None: ...


class Mapper(Protocol):
    """What an executor implements: `open(factory, method)` starts the workers of a session
    (executors.local: processes; executors.ray: actors; `InProcess`, the default: this process)."""

    def open(self, factory: Callable[[], Any], method: str) -> Session: ...


class InProcessSession:
    """factory() built once, here; each map gives its method every item in one call (an engine batches
    them itself), and passes each result on as it is yielded, once per key."""

    def __init__(self, factory: Callable[[], Any], method: str):
        self.worker = factory()
        self.fn = getattr(self.worker, method)

    def map(self, items: list, on_result: Callable[[Any], None], *, key: Callable[[Any], Hashable],
            desc: str = "items", progress: bool = False, batch: bool = False) -> None:
        from tqdm.auto import tqdm
        seen = set()
        for result in tqdm(self.fn(list(items)), total=len(items), desc=desc, unit="item", disable=not progress):
            if key(result) not in seen:
                seen.add(key(result))
                on_result(result)

    def close(self) -> None:
        close = getattr(self.worker, "close", None)  # an engine frees its model
        if close is not None:
            close()


class InProcess:
    def open(self, factory: Callable[[], Any], method: str) -> InProcessSession:
        return InProcessSession(factory, method)


def map_in_process(factory: Callable[[], Any], method: str, items: Sequence, on_result: Callable[[Any], None], *,
                   key: Callable[[Any], Hashable], desc: str = "items", progress: bool = False) -> None:
    """ctx.map in this process, as one call (nothing is built when there are no items)."""
    items = list(items)
    if not items:
        return
    session = InProcess().open(factory, method)
    try:
        session.map(items, on_result, key=key, desc=desc, progress=progress)
    finally:
        session.close()


@dataclass
class Workers:
    """A stage's handle on a session (StageContext.workers)."""
    session: Session
    progress: bool = False

    def map(self, items: Sequence, on_result: Callable[[Any], None], *,
            key: Callable[[Any], Hashable] = lambda result: result.id, desc: str = "items", batch: bool = False) -> None:
        items = list(items)
        if items:
            self.session.map(items, on_result, key=key, desc=desc, progress=self.progress, batch=batch)


@dataclass
class StageContext:
    """What a stage gets: the config, its folder, where to find its inputs, and `map`, through which it
    hands out work items and collects results (the executor chose where they run):

        ctx.map(factory, method, items, on_result, key=lambda r: r.id, desc="influence")

    factory: a picklable zero-argument callable (a module-level function, or a functools.partial of
      one) building a worker's expensive state once (a warm-up state, an engine);
    method: the name of the method of `factory()` called on a list of items; it returns (or yields)
      their results, one per item, in any order;
    on_result(result): called in this process, once per `key(result)`, as each result arrives (only
      the driver writes: an item sent twice, or re-run after its worker died, is written once).
    In this process (`InProcess`, the default) factory() is built once and given all items in one
    call; an executor sets `mapper` to spread them over workers (executors.local, executors.ray).

    A stage that maps many times over the same workers (generation: one call per batch of prompts, each
    waiting for the last) opens them once:

        with ctx.workers(factory, "generate") as engine:
            engine.map(items, on_result, key=..., batch=True)   # as often as it needs

    `batch=True` says the items are computed best together (a batch of prompts): a pool sends them in
    tasks of several items instead of one by one; every result is the same either way."""

    config: Config
    store: RunStore
    round: int
    dir: StageDir  # the stage's folder in the run store (RUN/round-R/STAGE, or its pending re-run)
    active: tuple[str, ...] = field(default_factory=tuple)
    progress: bool = True
    # Where `map` and `workers` run their items (see above); None: InProcess. Set by an executor, never
    # by a stage.
    mapper: Mapper | None = None

    @contextmanager
    def workers(self, factory: Callable[[], Any], method: str) -> Iterator[Workers]:
        """Workers that each build factory() once and serve every `map` of the block; closed after it."""
        session = (self.mapper or InProcess()).open(factory, method)
        try:
            yield Workers(session, self.progress)
        finally:
            session.close()

    def map(self, factory: Callable[[], Any], method: str, items: Sequence, on_result: Callable[[Any], None], *,
            key: Callable[[Any], Hashable] = lambda result: result.id, desc: str = "items") -> None:
        """Run `getattr(factory(), method)` over `items`, each result to `on_result` once per key."""
        items = list(items)
        if not items:  # nothing is built
            return
        with self.workers(factory, method) as workers:
            workers.map(items, on_result, key=key, desc=desc)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"montessori.{self.dir.stage}")

    def input(self, name: str, round: int | None = None) -> StageDir:
        return self.store.stage(self.round if round is None else round, name)

    def trainer_of(self, role: str) -> str | None:
        """The active stage whose model/ is the next round's `role` ("teacher": DPO; "student": SFT)."""
        return next((n for n in self.active if n in DECLARED and DECLARED[n].next_round == role), None)

    def teacher_spec(self, after_dpo: bool = False) -> str:
        """The teacher of this round: the base teacher in round 1, else the model last round trained
        for it (DPO's output). With after_dpo=True: this round's (used by the `dataset` stage)."""
        source, trainer = (self.round if after_dpo else self.round - 1), self.trainer_of("teacher")
        if source >= 1 and trainer is not None:
            return str(self.store.stage(source, trainer).path / "model")
        return self.config.models.teacher

    def student_spec(self) -> str:
        """The student entering this round: the base student in round 1, else last round's SFT output."""
        trainer = self.trainer_of("student")
        if self.round > 1 and trainer is not None:
            return str(self.store.stage(self.round - 1, trainer).path / "model")
        return self.config.models.student

    def base_student_spec(self) -> str:
        # docs/method.md, step 9: SFT starts from the *base* student of the round (= the student entering it).
        return self.student_spec()
