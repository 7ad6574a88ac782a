"""`montessori init DIR --tasks FILE`: a run that starts from 20-50 of your own tasks with good answers.

The tasks are split once, with a recorded seed, into a held-out evaluation split and the rest. The
rest is the seed pool (the teacher is shown their instructions) and the reference set (influence
measures each candidate against their answers: the learning goal). The evaluation split is neither
shown to the teacher nor used by influence, so `eval` measures tasks the run never saw.

Written inside DIR (nothing is written before the whole file is validated):

    DIR/tasks/reference.jsonl  the seed pool and reference set (Alpaca shape: id, instruction, input, output)
    DIR/tasks/eval.jsonl       the held-out evaluation split (same shape)
    DIR/tasks/split.json       source file and its sha256, split seed, the ids of both splits
    DIR/config.yaml            the preset with data.seeds, data.reference and eval.prompts pointing there
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import yaml

from montessori.config import PRESETS, config_from_dict, preset_text
from montessori.errors import InputError
from montessori.readers import read_tasks
from montessori.records import SeedTask
from montessori.store import atomic_write_json, atomic_write_text, write_jsonl

MIN_TASKS = 10
EVAL_FRACTION = 0.25
MIN_EVAL = 3
# A first run on GPU measures which kinds of data help; it does not need the paper's 8000 probing
# candidates: 512 give each of the nine task types tens of measurements. The CPU presets keep theirs.
GPU_SIZES = {"rounds": 1, "generation": {"num_prompts": 256}, "split": {"warmup": 128, "probing": 512},
             "sft": {"num_pairs": 2000}}
SIZES = {"tinyllama-1b": GPU_SIZES, "llama3-8b": GPU_SIZES}


def machine_preset() -> tuple[str, str]:
    """(preset, why): own-tasks (sized for a local teacher on a 2-core CPU) without CUDA, the TinyLlama
    student on a CUDA machine."""
    import torch
    if torch.cuda.is_available():
        return "tinyllama-1b", f"CUDA device {torch.cuda.get_device_name(0)}"
    return "own-tasks", "no CUDA device"


def split_tasks(tasks: list[SeedTask], seed: int, eval_fraction: float) -> tuple[list[SeedTask], list[SeedTask]]:
    """(reference, evaluation), both in file order; the evaluation split is drawn with `seed`."""
    n_eval = max(MIN_EVAL, round(len(tasks) * eval_fraction))
    held_out = set(random.Random(seed).sample(range(len(tasks)), n_eval))
    return ([t for i, t in enumerate(tasks) if i not in held_out],
            [t for i, t in enumerate(tasks) if i in held_out])


def _merge(raw: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict):
            _merge(raw.setdefault(key, {}), value)
        else:
            raw[key] = value


def init_from_tasks(dir: str | Path, tasks_file: str, *, preset: str | None = None, seed: int = 0,
                    eval_fraction: float = EVAL_FRACTION, force: bool = False, teacher_url: str | None = None,
                    teacher_model: str | None = None) -> str:
    """Validate the task file, split it, write DIR/tasks/* and DIR/config.yaml; returns a summary line, the
    teacher's line (montessori.teacher) and, when the teacher will not teach much or is slow, a warning."""
    if not 0 < eval_fraction < 1:
        raise InputError(f"--eval-fraction {eval_fraction}: must be between 0 and 1")
    tasks = read_tasks(tasks_file).records
    if len(tasks) < MIN_TASKS:
        raise InputError(f"{len(tasks)} tasks, at least {MIN_TASKS} needed (20-50 short, concrete tasks "
                         f"with good answers work best)", file=tasks_file)
    reference, evaluation = split_tasks(tasks, seed, eval_fraction)
    if len(reference) < MIN_EVAL:
        raise InputError(f"--eval-fraction {eval_fraction} leaves {len(reference)} of {len(tasks)} tasks "
                         f"for the seeds and reference set: lower it")
    why, machine_pick = "--preset", preset is None
    if preset is None:
        preset, why = machine_preset()
    if preset not in PRESETS:
        raise InputError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    root = Path(dir).resolve()
    target, folder = root / "config.yaml", root / "tasks"
    if target.exists() and not force:
        raise InputError(f"{target}: already exists (use --force to overwrite)")

    # Absolute paths: the run reads them from whatever directory `montessori run` starts in.
    raw = yaml.safe_load(preset_text(preset))
    _merge(raw, SIZES.get(preset, {}))
    from montessori.teacher import choose_teacher
    teacher = choose_teacher(preset=preset, preset_teacher=raw["models"]["teacher"], url=teacher_url,
                             model=teacher_model, machine_pick=machine_pick, cuda=why.startswith("CUDA"),
                             api_key_env=(raw.get("generation") or {}).get("api_key_env", "OPENAI_API_KEY"))
    _merge(raw, teacher.changes)
    _merge(raw, {"name": root.name,
                 "data": {"seeds": str(folder / "reference.jsonl"), "reference": str(folder / "reference.jsonl"),
                          "max_seeds": None, "max_reference": None},
                 "eval": {"prompts": str(folder / "eval.jsonl"), "max_examples": None}})
    config = config_from_dict(raw, f"preset {preset} with tasks")  # a bug if it fails: before writing

    def shape(t: SeedTask) -> dict:
        return {"id": t.id, "instruction": t.instruction, "input": t.input, "output": t.output}

    write_jsonl(folder / "reference.jsonl", [shape(t) for t in reference])
    write_jsonl(folder / "eval.jsonl", [shape(t) for t in evaluation])
    atomic_write_json(folder / "split.json", {
        "source": str(Path(tasks_file).resolve()), "source_sha256": _sha256(Path(tasks_file)),
        "seed": seed, "eval_fraction": eval_fraction, "tasks": len(tasks),
        "reference": [t.id for t in reference], "eval": [t.id for t in evaluation]})
    header = (f"# From preset {preset} ({why}) by `montessori init --tasks {tasks_file}`: data.seeds and\n"
              f"# data.reference are the {len(reference)} reference tasks, eval.prompts the {len(evaluation)} "
              f"held out (tasks/split.json).\n# {teacher.line}\n")
    atomic_write_text(target, header + config.to_yaml())
    return (f"read {len(tasks)} tasks from {tasks_file}: {len(reference)} seeds and reference answers, "
            f"{len(evaluation)} held out for evaluation (split seed {seed}); preset {preset} ({why}); "
            f"wrote {target}; run it with: montessori run {target}\n{teacher.line}"
            + (f"\nwarning: {teacher.warning}" if teacher.warning else ""))


def _sha256(path: Path) -> str:
    if path.is_dir():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_init_tasks(args) -> int:
    print(init_from_tasks(args.dir, args.tasks, preset=args.preset, seed=args.split_seed,
                          eval_fraction=args.eval_fraction, force=args.force, teacher_url=args.teacher_url,
                          teacher_model=args.teacher_model))
    return 0


def add_arguments(p) -> None:
    """The `init` options this module adds (cli.py's init parser calls it)."""
    p.add_argument("--tasks", metavar="FILE", help="start from your own tasks with answers (JSONL, JSON, CSV "
                   "instruction,answer, Parquet): seeds, reference set and a held-out evaluation split")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out evaluation split (--tasks)")
    p.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION,
                   help=f"share of the tasks held out for evaluation (--tasks; at least {MIN_EVAL})")
    p.add_argument("--teacher-url", metavar="URL", help="the teacher at an OpenAI-compatible endpoint (/v1 "
                   "address; --tasks): Ollama, llama.cpp server, vLLM, an API; key from $generation.api_key_env")
    p.add_argument("--teacher-model", metavar="NAME", help="the model the --teacher-url endpoint serves")

