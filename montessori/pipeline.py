"""The method as a list of stages, and the runner that decides what must run again.

A stage is a function `run(ctx: StageContext) -> dict` (its counts, stored in the manifest). The
runner gives it a folder in the run store and skips it when its manifest's fingerprint (the config
sections it reads + the fingerprints of its inputs) is unchanged. A stage whose folder holds output
but no manifest was interrupted: it is called again and resumes from its append-only files. A stage
whose fingerprint changed is cleared first, so stale records never mix with new ones.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from montessori.config import Config, load_config
from montessori.errors import InputError, MontessoriError
from montessori.store import RunStore, StageDir, atomic_write_text

log = logging.getLogger("montessori")

FINGERPRINT_FILE = ".fingerprint"


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported when the stage runs
    sections: tuple[str, ...]  # config sections the stage reads
    inputs: tuple[str, ...] = ()  # stages of the same round whose output it reads
    round_inputs: tuple[str, ...] = ()  # stages of the previous round it reads (teacher, student)

    def function(self) -> Callable[[StageContext], dict]:
        module, func = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            raise NotImplementedError(self.name) from None


STAGES: tuple[Stage, ...] = (
    Stage("instructions", "montessori.generation.stage:run_instructions", ("models", "data", "generation", "seed"),
          round_inputs=("dpo",)),
    Stage("responses", "montessori.generation.stage:run_responses", ("models", "generation", "seed"),
          ("instructions",), round_inputs=("dpo",)),
    Stage("warmup", "montessori.influence.warmup:run_warmup", ("models", "split", "warmup", "seed"),
          ("responses",), round_inputs=("sft",)),
    Stage("influence", "montessori.influence.stage:run_influence", ("models", "data", "influence", "seed"),
          ("responses", "warmup")),
    Stage("pairs", "montessori.pairs.stage:run_pairs", ("pairs",), ("instructions", "influence")),
    Stage("dpo", "montessori.training.dpo:run_dpo", ("models", "dpo", "seed"), ("pairs",), round_inputs=("dpo",)),
    Stage("mechanism", "montessori.influence.mechanism:run_mechanism", ("models", "data", "generation", "influence",
          "mechanism", "seed"), ("instructions", "warmup", "dpo"), round_inputs=("dpo",)),
    Stage("data", "montessori.generation.stage:run_data", ("models", "data", "generation", "sft", "seed"),
          ("dpo",), round_inputs=("dpo",)),
    Stage("sft", "montessori.training.sft:run_sft", ("models", "sft", "seed"), ("data",), round_inputs=("sft",)),
    Stage("eval", "montessori.evaluation.stage:run_eval", ("models", "data", "eval"), ("sft",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# Self-Instruct baseline: the same teacher writes the training set; no influence, no DPO.
SELF_INSTRUCT = ("data", "sft", "eval")


def stages_for(config: Config) -> list[Stage]:
    if config.method == "self-instruct":
        return [s for s in STAGES if s.name in SELF_INSTRUCT]
    return list(STAGES)


@dataclass
class StageContext:
    """What a stage gets: the config, its folder, and where to find its inputs."""

    config: Config
    store: RunStore
    round: int
    stage: StageDir
    active: tuple[str, ...] = field(default_factory=tuple)
    progress: bool = True

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"montessori.{self.stage.stage}")

    def input(self, name: str, round: int | None = None) -> StageDir:
        return self.store.stage(self.round if round is None else round, name)

    def teacher_spec(self, after_dpo: bool = False) -> str:
        """The teacher of this round: the base teacher in round 1, else last round's DPO output.

        With after_dpo=True: this round's DPO output (used by the `data` stage)."""
        source = self.round if after_dpo else self.round - 1
        if source >= 1 and "dpo" in self.active:
            return str(self.store.stage(source, "dpo").path / "model")
        return self.config.models.teacher

    def student_spec(self) -> str:
        """The student entering this round: the base student in round 1, else last round's SFT output."""
        if self.round > 1:
            return str(self.store.stage(self.round - 1, "sft").path / "model")
        return self.config.models.student

    def base_student_spec(self) -> str:
        # METHOD.md step 9: SFT starts from the *base* student of the round (= the student entering it).
        return self.student_spec()


def _fingerprint(config: Config, stage: Stage, ctx: StageContext, active: tuple[str, ...]) -> tuple[str, dict]:
    inputs = {}
    for name in stage.inputs:
        if name in active:
            inputs[f"round-{ctx.round}/{name}"] = _done_fingerprint(ctx.input(name), stage, name)
    if ctx.round > 1:
        for name in stage.round_inputs:
            if name in active:
                inputs[f"round-{ctx.round - 1}/{name}"] = _done_fingerprint(ctx.input(name, ctx.round - 1), stage, name)
    config_hash = config.section_hash(*stage.sections)
    payload = json.dumps({"config": config_hash, "inputs": inputs, "round": ctx.round}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs | {"config": config_hash}


def _done_fingerprint(stage_dir: StageDir, stage: Stage, name: str) -> str:
    manifest = stage_dir.manifest()
    if manifest is None:
        raise InputError(f"stage '{stage.name}' of round {stage_dir.round} needs stage '{name}' "
                         f"of round {stage_dir.round}, which has not run: run with --until {name} first")
    return manifest["fingerprint"]


def run_pipeline(config: Config, run_dir: str | Path, *, only: str | None = None, until: str | None = None,
                 force: bool = False, progress: bool = True) -> RunStore:
    for flag, name in (("--only", only), ("--until", until)):
        if name is not None and name not in STAGE_NAMES:
            raise InputError(f"{flag} {name}: unknown stage (stages: {', '.join(STAGE_NAMES)})")
    preflight(config)
    store = RunStore(run_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(store.root / "config.resolved.yaml", config.to_yaml())  # never the user's file
    stages = stages_for(config)
    active = tuple(s.name for s in stages)
    if until is not None and until not in active:
        raise InputError(f"--until {until}: stage not part of method '{config.method}' ({', '.join(active)})")
    for round_ in range(1, config.rounds + 1):
        for stage in stages:
            if only is not None and stage.name != only:
                continue
            stage_dir = store.stage(round_, stage.name)
            ctx = StageContext(config, store, round_, stage_dir, active, progress)
            fingerprint, inputs = _fingerprint(config, stage, ctx, active)
            if stage_dir.is_done(fingerprint) and not force:
                log.info("round %d %s: done, skipped (inputs and config unchanged)", round_, stage.name)
            else:
                _run_stage(stage, ctx, fingerprint, inputs)
            if until == stage.name and round_ == config.rounds:
                return store
    return store


def preflight(config: Config) -> None:
    """Read every input data file before any stage runs: a bad record fails in seconds (exit 2), not
    after an hour of generation."""
    from montessori.readers import read_pairs, read_seeds
    lenient = config.data.lenient
    active = {s.name for s in stages_for(config)}
    if active & {"instructions", "data"}:
        read_seeds(config.data.seeds, lenient=lenient)
    if "influence" in active:
        read_pairs(config.data.reference, lenient=lenient)
    if "eval" in active:
        read_pairs(config.eval.prompts, lenient=lenient)


def _run_stage(stage: Stage, ctx: StageContext, fingerprint: str, inputs: dict) -> None:
    stage_dir = ctx.stage
    marker = stage_dir.path / FINGERPRINT_FILE
    if stage_dir.path.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        if stage_dir.has_output():
            log.info("round %d %s: config or inputs changed, clearing old output", ctx.round, stage.name)
        shutil.rmtree(stage_dir.path)
    elif stage_dir.is_done():
        stage_dir.invalidate()  # --force on an up-to-date stage
    elif stage_dir.has_output():
        log.info("round %d %s: resuming interrupted stage", ctx.round, stage.name)
    stage_dir.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint)
    try:
        fn = stage.function()
    except NotImplementedError:
        raise MontessoriError(f"stage '{stage.name}' is not implemented yet in this version; "
                              f"stages before it are done (see montessori status)") from None
    log.info("round %d %s: running", ctx.round, stage.name)
    started = time.time()
    from montessori.distributed.launch import maybe_launch  # accelerate/torchrun for dpo and sft when configured
    counts = maybe_launch(stage.name, ctx, fn) or {}
    extra = counts.pop("_extra", {}) if isinstance(counts, dict) else {}
    stage_dir.write_manifest(fingerprint=fingerprint, config_hash=inputs["config"],
                             inputs={k: v for k, v in inputs.items() if k != "config"},
                             counts=counts, started=started, extra=extra)
    log.info("round %d %s: done in %.1fs %s", ctx.round, stage.name, time.time() - started, counts)


def stage_status(store: RunStore) -> list[dict]:
    """State of every stage of the run's method (from RUN/config.resolved.yaml; all stages without it)."""
    names = STAGE_NAMES
    resolved = store.root / "config.resolved.yaml"
    if resolved.exists():
        try:
            names = tuple(s.name for s in stages_for(load_config(resolved)))
        except InputError:
            pass
    rows = []
    for round_ in store.rounds() or [1]:
        for name in names:
            sd = store.stage(round_, name)
            m = sd.manifest()
            if m is not None:
                state = "done"
            elif sd.has_output():
                state = "partial"
            else:
                state = "pending"
            counts = m["counts"] if m else _partial_counts(sd)
            rows.append({"round": round_, "stage": name, "state": state, "counts": counts,
                         "seconds": m.get("seconds") if m else None})
    return rows


def _partial_counts(sd: StageDir) -> dict:
    if not sd.path.exists():
        return {}
    return {p.stem: sum(1 for line in p.read_text().splitlines() if line.strip())
            for p in sorted(sd.path.glob("*.jsonl"))}
