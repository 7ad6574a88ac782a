"""The runner: runs the method's stages (montessori/method.py) round by round, and decides what must run again.

A stage is a function `run(ctx: StageContext) -> dict` (its counts, stored in the manifest), declared
with `@stage(...)` beside it. Before anything runs, preflight (montessori/preflight.py) checks what the
scheduled stages read. The runner gives each stage a folder in the run store and skips it when its
fingerprint (montessori/fingerprints.py) is unchanged: the values of the config keys the stage
declares, the content of the input files it reads, and the fingerprints of the stages whose output it
reads. A stage whose folder holds output but no manifest
was interrupted: it is called again and resumes from its append-only files. A finished stage whose
fingerprint changed runs again in a new folder (RUN/round-R/.STAGE.new) that replaces the old one
only once it is complete, so a failing re-run leaves the last good result in place.

Where a stage runs (in this process, or on several ranks through a launcher) is the executor's
business: `run_pipeline(..., executor=...)`; the stages and this runner do not know.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from montessori.config import Config, load_config
from montessori.context import Stage, StageContext
from montessori.errors import InputError, environment_error
from montessori.fingerprints import FINGERPRINT_FILE, fingerprint, not_run
from montessori.keys import NOT_FINGERPRINTED
from montessori import method
from montessori.method import STAGE_NAMES, STAGES, stages_for  # noqa: F401 (re-exported)
from montessori.preflight import preflight
from montessori.store import RunLock, RunStore, StageDir, atomic_write_text, count_records

log = logging.getLogger("montessori")

# Executor: runs a stage for its context and returns its counts; it may give the context a `mapper`
# (where ctx.map's work items go) and launch the stage on ranks where `stage.launch` allows.
Executor = Callable[[Stage, StageContext], dict]

__all__ = ["NOT_FINGERPRINTED", "STAGES", "STAGE_NAMES", "Stage", "StageContext", "plan", "preflight",
           "run_pipeline", "stage_status"]


def _check_upstream(config: Config, store: RunStore, schedule: list, active: tuple[str, ...]) -> None:
    """Refuse, before the run directory is touched, a stage whose input neither exists nor runs before
    it (`--only dpo` on a new directory): the same error `fingerprint` would raise mid-run."""
    runs: set[tuple[int, str]] = set()
    for round_, stage in schedule:
        needed = [(round_, n) for n in stage.inputs if n in active]
        needed += [(round_ - 1, n) for n in stage.round_inputs if n in active and round_ > 1]
        for r, name in needed:
            if (r, name) not in runs and not store.stage(r, name).is_done():
                raise not_run(stage, store.stage(r, name), name)
        runs.add((round_, stage.name))


def parse_stage_arg(flag: str, value: str | None, config: Config,
                    active: tuple[str, ...]) -> tuple[int | None, str] | None:
    """`STAGE` or `ROUND:STAGE` (e.g. `2:influence`) -> (round or None, stage)."""
    if value is None:
        return None
    round_text, _, name = value.rpartition(":")
    if name not in method.STAGE_NAMES:
        raise InputError(f"{flag} {value}: unknown stage (stages: {', '.join(method.STAGE_NAMES)}; "
                         f"a round may be given as ROUND:STAGE, e.g. 2:{method.STAGE_NAMES[0]})")
    if name not in active:
        raise InputError(f"{flag} {value}: stage not part of method '{config.method}' ({', '.join(active)})")
    if not round_text:
        return None, name
    if not round_text.isdigit() or not 1 <= int(round_text) <= config.rounds:
        raise InputError(f"{flag} {value}: round must be 1 to {config.rounds} (rounds={config.rounds})")
    return int(round_text), name


def run_in_process(stage: Stage, ctx: StageContext) -> dict:
    """The default executor: the stage's function, here (ctx.map's items too)."""
    return stage.function(ctx)


def default_executor(config: Config) -> Executor:
    if config.distributed.launcher == "none" and not config.distributed.ray:
        return run_in_process
    from montessori.executors.launcher import maybe_launch  # Ray for ctx.map and generation; ranks for Stage.launch
    return maybe_launch


def run_pipeline(config: Config, run_dir: str | Path, *, only: str | None = None, until: str | None = None,
                 force: bool = False, progress: bool = True, executor: Executor | None = None,
                 log_file: bool = False) -> RunStore:
    """Run the method's stages into `run_dir`, skipping those that are up to date.

    `until`/`only` take a stage name or ROUND:STAGE; a bare `until` stops in round 1, a bare `only`
    runs the stage in every round. Everything is checked before anything in the run directory changes,
    and the directory is locked for the duration (a second run on it is refused). `log_file`: also log to
    RUN/montessori.log, from when the run holds the directory (a refused run writes no line there)."""
    stages = method.stages_for(config)
    active = tuple(s.name for s in stages)
    only_at = parse_stage_arg("--only", only, config, active)
    until_at = parse_stage_arg("--until", until, config, active)
    preflight(config, [stage for _, stage in _schedule(config, only_at, until_at)])
    store = RunStore(run_dir)
    if store.root.exists() and not store.root.is_dir():
        raise InputError("not a directory (the run directory must be a folder)", file=store.root)
    _check_upstream(config, store, list(_schedule(config, only_at, until_at)), active)
    store.root.mkdir(parents=True, exist_ok=True)
    executor = executor or default_executor(config)
    with RunLock(store.root), _run_log(store.root if log_file else None):
        log.info("run dir %s (%s)", store.root, config.name)
        atomic_write_text(store.root / "config.resolved.yaml", config.to_yaml())  # never the user's file
        file_hashes: dict[str, str | None] = {}
        for round_, stage in _schedule(config, only_at, until_at):
            stage_dir = store.stage(round_, stage.name)
            stage_dir.recover()
            ctx = StageContext(config, store, round_, stage_dir, active, progress)
            fp, inputs = fingerprint(config, stage, ctx, active, file_hashes)
            if stage_dir.is_done(fp) and not force:
                log.info("round %d %s: done, skipped (inputs and config unchanged)", round_, stage.name)
                shutil.rmtree(stage_dir.pending().path, ignore_errors=True)  # an abandoned re-run
            else:
                _run_stage(stage, ctx, fp, inputs, executor)
    return store


@contextlib.contextmanager
def _run_log(root: Path | None):
    """RUN/montessori.log while the run holds the directory (appended to, across runs)."""
    if root is None:
        yield
        return
    handler = logging.FileHandler(root / "montessori.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("montessori").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("montessori").removeHandler(handler)
        handler.close()


def _schedule(config: Config, only_at, until_at):
    """(round, stage) in the order they run, as selected by --only and --until."""
    for round_ in range(1, config.rounds + 1):
        for stage in method.stages_for(config):
            if only_at is None or (stage.name == only_at[1] and only_at[0] in (None, round_)):
                yield round_, stage
            if until_at is not None and until_at[1] == stage.name and (until_at[0] or 1) == round_:
                return


def plan(config: Config, run_dir: str | Path, *, only: str | None = None, until: str | None = None,
         force: bool = False) -> list[tuple[int, str]]:
    """The (round, stage) pairs `run_pipeline` would run now, computed without running or changing
    anything: a stage runs when its fingerprint changed or a stage it reads runs before it."""
    active = tuple(s.name for s in method.stages_for(config))
    store = RunStore(run_dir)
    runs: list[tuple[int, str]] = []
    file_hashes: dict[str, str | None] = {}
    for round_, stage in _schedule(config, parse_stage_arg("--only", only, config, active),
                                   parse_stage_arg("--until", until, config, active)):
        upstream = {(round_, n) for n in stage.inputs} | {(round_ - 1, n) for n in stage.round_inputs}
        if force or upstream & set(runs):
            runs.append((round_, stage.name))
            continue
        ctx = StageContext(config, store, round_, store.stage(round_, stage.name), active, False)
        if not ctx.dir.is_done(fingerprint(config, stage, ctx, active, file_hashes)[0]):
            runs.append((round_, stage.name))
    return runs


def _run_stage(stage: Stage, ctx: StageContext, fp: str, inputs: dict, executor: Executor) -> None:
    final = ctx.dir
    # A finished result (stale, or re-run by --force) stays in place until its replacement is complete.
    work = final.pending() if final.is_done() else final
    marker = work.path / FINGERPRINT_FILE
    if work.path.exists() and (not marker.exists() or marker.read_text() != fp):
        if work.has_output():
            log.info("round %d %s: config or inputs changed, clearing unfinished output", ctx.round, stage.name)
        shutil.rmtree(work.path)
    elif work.has_output():
        log.info("round %d %s: resuming interrupted stage", ctx.round, stage.name)
    work.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fp)
    log.info("round %d %s: running%s", ctx.round, stage.name,
             " (the finished result stays until this one is complete)" if work is not final else "")
    started = time.time()
    try:
        counts = executor(stage, StageContext(ctx.config, ctx.store, ctx.round, work, ctx.active, ctx.progress)) or {}
    except Exception as err:
        # A full or read-only disk under a library's own error (safetensors, torch.save) or without a
        # file name: one OSError naming the path (else this stage's folder) and the OS's reason.
        env = environment_error(err, work.path)
        if env is None or env is err:
            raise
        raise env from err
    extra = counts.pop("_extra", {}) if isinstance(counts, dict) else {}
    work.write_manifest(fingerprint=fp, config_hash=inputs["config"],
                        inputs={k: v for k, v in inputs.items() if k != "config"},
                        counts=counts, started=started, extra=extra)
    if work is not final:
        final.replace_with(work)
    log.info("round %d %s: done in %.1fs %s", ctx.round, stage.name, time.time() - started, counts)


def stage_status(store: RunStore) -> list[dict]:
    """State of every stage of the run's method (from RUN/config.resolved.yaml; all stages without it)."""
    names = method.STAGE_NAMES
    resolved = store.root / "config.resolved.yaml"
    if resolved.exists():
        try:
            names = tuple(s.name for s in method.stages_for(load_config(resolved)))
        except InputError:
            pass
    rows = []
    for round_ in store.rounds() or [1]:
        for name in names:
            sd = store.stage(round_, name)
            try:
                m = sd.manifest()
            except InputError:  # status reports a damaged stage, it does not fail on it
                rows.append({"round": round_, "stage": name, "state": "damaged", "counts": {}, "seconds": None})
                continue
            if m is not None:
                state = "done"
            elif sd.has_output():
                state = "partial"
            else:
                state = "pending"
            counts = m.get("counts", {}) if m else _partial_counts(sd)
            rows.append({"round": round_, "stage": name, "state": state, "counts": counts,
                         "seconds": m.get("seconds") if m else None})
    return rows


def _partial_counts(sd: StageDir) -> dict:
    if not sd.path.exists():
        return {}
    return {p.stem: count_records(p) for p in sorted(sd.path.glob("*.jsonl"))}
