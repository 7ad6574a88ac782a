"""Where a stage runs (`maybe_launch(stage, ctx)`, the pipeline's executor when distributed.* asks for
more than this process): with distributed.ray, what a stage hands to `ctx.map` / `ctx.workers` runs on
Ray actors (ray.ray_map: the influence stage's candidates, the generation stages' prompts on one engine
per GPU); a stage declared with `launch=True`
(TRL's trainers: dpo, sft) runs on several GPUs, which `montessori run` starts through
`accelerate launch` or `torchrun` itself, with a DDP or FSDP preset chosen by model size. No stage is
named here: what the executor does follows the Stage's attributes.

    driver (montessori run)                    every rank (python -m montessori.executors.launcher)
    -----------------------                    ------------------------------------------------------
    maybe_launch(sft stage, ctx)       ---->   reads RUN/config.resolved.yaml, builds the stage's context,
      accelerate launch --config_file            calls run_sft(ctx): TRL's trainers see WORLD_SIZE and
        accelerate/{ddp,fsdp}.yaml               wrap the model in DDP / FSDP themselves
        --num_processes N -m ...launch
    counts <---------------------------------  rank 0 writes the stage's folder and its counts;
                                               other ranks write a scratch copy, removed afterwards

Every rank runs the same stage function, so collective operations (a gathered state dict on save)
are matched on all ranks; only rank 0's files land in the run store.

The warm-up stage is not launched (launch=False): its loop (influence/warmup.py) is a plain
single-process AdamW loop, so N ranks would each train the same copy; it runs in the driver's process.

Preset by size: DDP below FSDP_MIN_PARAMS (each GPU holds the model and its fp32 AdamW state,
~16 bytes per parameter), FSDP from there (an 8B model's ~128 GB of state is sharded).
`distributed.fsdp: true/false` overrides the choice.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

from montessori.errors import InputError, MontessoriError

FSDP_MIN_PARAMS = 3e9
COUNTS_FILE = ".launch_counts.json"
SCRATCH = ".ranks"


def preset_path(strategy: str) -> Path:
    return Path(str(resources.files("montessori.executors").joinpath("accelerate", f"{strategy}.yaml")))


def count_params(spec: str) -> int:
    """Parameters of a model from its config alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from montessori.models.load import resolve_model_dir
    config = AutoConfig.from_pretrained(resolve_model_dir(spec))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def choose_strategy(fsdp, num_params: int) -> str:
    if fsdp == "auto":
        return "fsdp" if num_params >= FSDP_MIN_PARAMS else "ddp"
    return "fsdp" if fsdp else "ddp"


def num_processes(dcfg) -> int:
    if dcfg.num_processes:
        return dcfg.num_processes
    import torch
    return max(1, torch.cuda.device_count())


def launch_command(launcher: str, strategy: str, processes: int, entry: list[str]) -> list[str]:
    """The command line that starts `python -m montessori.executors.launcher ENTRY` on every rank.

    No `--cpu` for accelerate: it would start a single process; the stage's models.device decides
    the device, and on CPU the trainers join the ranks over gloo."""
    module = ["-m", "montessori.executors.launcher", *entry]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_path(strategy)),
               "--num_processes", str(processes)]
        return cmd + module
    if launcher == "torchrun":
        if strategy == "fsdp":
            raise InputError("distributed.launcher=torchrun runs DDP only; FSDP needs distributed.launcher=accelerate "
                             "(its preset configures the sharding), or set distributed.fsdp=false")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                *module]
    raise InputError(f"distributed.launcher={launcher!r}: choose none, accelerate or torchrun")


def trained_params(stage, ctx) -> int:
    """Parameters of the largest model the stage loads (`stage.models`: the round's teacher and/or student)."""
    specs = {"teacher": ctx.teacher_spec, "student": ctx.student_spec}
    return max(count_params(specs[model]()) for model in stage.models)


def run_launched(stage, ctx) -> dict:
    """Run a training stage (a context.Stage) on `num_processes` ranks and return rank 0's counts.
    Rank 0 writes the context's folder (the stage's, or the one replacing it)."""
    dcfg = ctx.config.distributed
    processes = num_processes(dcfg)
    strategy = choose_strategy(dcfg.fsdp, trained_params(stage, ctx))
    root = ctx.store.root
    fn = stage.function  # the ranks import it from where it is defined
    entry = [str(root), "--round", str(ctx.round), "--stage", stage.name,
             "--target", f"{fn.__module__}:{fn.__qualname__}", "--active", ",".join(ctx.active)]
    if ctx.dir.folder:
        entry += ["--folder", ctx.dir.folder]
    cmd = launch_command(dcfg.launcher, strategy, processes, entry)
    ctx.log.info("%s on %d processes (%s, %s): %s", stage.name, processes, dcfg.launcher, strategy, " ".join(cmd))
    counts_file = ctx.dir.path / COUNTS_FILE
    counts_file.unlink(missing_ok=True)
    # The ranks rebuild the stage's context from this exact config (overrides included).
    from montessori.store import atomic_write_text
    atomic_write_text(root / "config.resolved.yaml", ctx.config.to_yaml())
    env = dict(os.environ, MONTESSORI_NO_PROGRESS="" if ctx.progress else "1")
    result = subprocess.run(cmd, env=env)
    shutil.rmtree(root / SCRATCH, ignore_errors=True)
    if result.returncode != 0 or not counts_file.exists():
        raise MontessoriError(f"stage {stage.name} failed under {dcfg.launcher} (exit {result.returncode}); "
                              f"the ranks' errors are above")
    counts = json.loads(counts_file.read_text())
    counts_file.unlink()
    counts.setdefault("_extra", {}).update(launcher=dcfg.launcher, processes=processes, strategy=strategy)
    return counts


def maybe_launch(stage, ctx) -> dict:
    """The pipeline's executor for distributed.*: with distributed.ray, the stage's `ctx.map` and
    `ctx.workers` on Ray actors (its candidates, its generation engines); a stage with
    `launch` set under distributed.launcher on several ranks (unless we are already one of them);
    else the stage function in this process. Stages import no executor."""
    if ctx.config.distributed.ray:
        from montessori.executors.ray import ray_map
        ctx = replace(ctx, mapper=ray_map(ctx.config.distributed))
    if ctx.config.distributed.launcher == "none" or not stage.launch or "LOCAL_RANK" in os.environ:
        return run_here(stage, ctx)
    return run_launched(stage, ctx)


def run_here(stage, ctx) -> dict:
    """The stage's function in this process; what its workers did (a pool's `counts()`: workers,
    workers lost) is added to the counts' `_extra`, which the manifest records."""
    counts = stage.function(ctx) or {}
    pool_counts = getattr(ctx.mapper, "counts", None)
    if pool_counts is not None and pool_counts():
        counts.setdefault("_extra", {}).update(pool_counts())
    return counts


def local_executor(num_workers: int | None = None):
    """An executor running each stage here with its `ctx.map` on local processes (local.local_map:
    one per visible GPU, or `num_workers`): `run_pipeline(..., executor=local_executor(2))`."""
    from montessori.executors.local import local_map

    def run(stage, ctx) -> dict:
        return run_here(stage, replace(ctx, mapper=local_map(num_workers)))

    return run


def rank_context(run_dir: Path, round_: int, stage: str, rank: int, active: tuple[str, ...],
                 folder: str | None = None):
    """The stage's context on one rank: rank 0 writes the run store, the others a scratch copy."""
    from montessori.config import load_config
    from montessori.context import StageContext
    from montessori.store import RunStore, StageDir
    config = load_config(run_dir / "config.resolved.yaml")
    store = RunStore(run_dir)
    stage_dir = (StageDir(run_dir, round_, stage, folder) if rank == 0
                 else StageDir(run_dir / SCRATCH / f"rank-{rank}", round_, stage))
    stage_dir.path.mkdir(parents=True, exist_ok=True)
    progress = rank == 0 and not os.environ.get("MONTESSORI_NO_PROGRESS")
    return StageContext(config, store, round_, stage_dir, active, progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one training stage on this rank (started by a launcher).")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--stage", required=True, help="the stage's name (its folder)")
    ap.add_argument("--target", required=True, help="the stage's function, module:function")
    ap.add_argument("--active", required=True, help="the method's stages, comma-separated")
    ap.add_argument("--folder", help="the folder rank 0 writes, if not the stage's own")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    import montessori.method  # noqa: F401 (declares every stage: the context finds last round's models by them)
    ctx = rank_context(args.run_dir, args.round, args.stage, rank, tuple(args.active.split(",")), args.folder)
    module, _, name = args.target.partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    counts = fn(ctx) or {}
    counts.setdefault("_extra", {})["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        from montessori.store import atomic_write_json
        atomic_write_json(ctx.dir.path / COUNTS_FILE, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
