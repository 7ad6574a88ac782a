"""Multi-GPU launch of the training stages: preset choice by model size, the launcher command lines,
and a real 2-process DDP run of the SFT stage on CPU (gloo) through torchrun / accelerate launch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from montessori.config import load_preset
from montessori.errors import InputError
from montessori.executors.launcher import (FSDP_MIN_PARAMS, SCRATCH, choose_strategy, count_params, launch_command,
                                           maybe_launch, preset_path, run_launched)
from montessori.pipeline import StageContext, stages_for
from montessori.records import Pair
from montessori.store import RunStore, atomic_write_text, read_jsonl, write_jsonl

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)


def config_dir(tmp_path, name, arch) -> str:
    from transformers import LlamaConfig
    LlamaConfig(**arch).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_preset_follows_model_size_unless_overridden(tmp_path, tiny_spec):
    sizes = {name: count_params(spec) for name, spec in
             [("tiny", tiny_spec), ("tinyllama", config_dir(tmp_path, "t", TINYLLAMA)),
              ("llama3-8b", config_dir(tmp_path, "l", LLAMA3_8B))]}
    assert 1.0e9 < sizes["tinyllama"] < 1.2e9 and 8.0e9 < sizes["llama3-8b"] < 8.1e9  # counted, not guessed
    assert [choose_strategy("auto", n) for n in sizes.values()] == ["ddp", "ddp", "fsdp"]
    assert choose_strategy(True, sizes["tiny"]) == "fsdp" and choose_strategy(False, FSDP_MIN_PARAMS) == "ddp"


def test_presets_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file
    ddp, fsdp = load_config_from_file(str(preset_path("ddp"))), load_config_from_file(str(preset_path("fsdp")))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # model/ stays a plain HF directory


def test_launch_commands():
    cmd = launch_command("accelerate", "fsdp", 8, ["RUN", "--round", "1", "--stage", "sft"])
    assert cmd[1:6] == ["-m", "accelerate.commands.launch", "--config_file", str(preset_path("fsdp")),
                        "--num_processes"] and cmd[6] == "8"
    assert cmd[-7:] == ["-m", "montessori.executors.launcher", "RUN", "--round", "1", "--stage", "sft"]
    cmd = launch_command("torchrun", "ddp", 4, ["RUN"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    with pytest.raises(InputError, match="FSDP needs distributed.launcher=accelerate"):
        launch_command("torchrun", "fsdp", 4, ["RUN"])


def sft_run(tmp_path, launcher: str):
    config = load_preset("tiny", [f"distributed.launcher={launcher}", "distributed.num_processes=2",
                                  "sft.global_batch_size=4", "sft.micro_batch_size=1"])
    atomic_write_text(tmp_path / "config.yaml", config.to_yaml())  # what `montessori run` writes first
    store = RunStore(tmp_path)
    data = store.stage(1, "dataset")
    write_jsonl(data.file("pairs.jsonl"), [Pair(f"d{i}", f"Say the number {i}.", f"The number is {i}.",
                                                prompt_id=f"p{i}") for i in range(8)])
    data.write_manifest(fingerprint="t", config_hash="t", inputs={}, counts={}, started=0.0)
    return StageContext(config, store, 1, store.stage(1, "sft"), tuple(s.name for s in stages_for(config)), False)


def check_two_rank_sft(tmp_path, counts):
    # 2 ranks x micro-batch 1 x accumulation 2 = the global batch of 4: 8 pairs, 2 optimizer steps.
    assert counts["_extra"]["world_size"] == 2 and counts["_extra"]["strategy"] == "ddp"
    assert counts["pairs"] == 8 and counts["steps"] == 2
    sft = tmp_path / "round-1" / "sft"
    assert (sft / "model" / "config.json").exists() and len(read_jsonl(sft / "metrics.jsonl")) >= 2
    assert not (tmp_path / SCRATCH).exists()  # rank 1's scratch copy is gone


def test_sft_on_two_processes_through_torchrun(tmp_path):
    from montessori.training.sft import run_sft
    ctx = sft_run(tmp_path, "torchrun")
    check_two_rank_sft(tmp_path, run_launched(run_sft.stage, ctx))


def test_sft_on_two_processes_through_accelerate_launch(tmp_path):
    from montessori.training.sft import run_sft
    ctx = sft_run(tmp_path, "accelerate")
    check_two_rank_sft(tmp_path, run_launched(run_sft.stage, ctx))


def here(name: str, launch: bool):
    """A stage as the executor sees it (context.Stage's name, function and launch need)."""
    return SimpleNamespace(name=name, function=lambda c: {"ran": "here"}, launch=launch, models=("student",))


def test_maybe_launch_runs_in_process_without_a_launcher_or_for_stages_that_are_not_launched(tmp_path):
    ctx = sft_run(tmp_path, "none")
    assert maybe_launch(here("sft", launch=True), ctx) == {"ran": "here"}
    ctx.config.distributed.launcher = "torchrun"
    assert maybe_launch(here("influence", launch=False), ctx) == {"ran": "here"}
    # what the executor decides follows the Stage's attribute, not its name
    from montessori.influence.stage import run_influence
    from montessori.training.dpo import run_dpo
    from montessori.training.sft import run_sft
    assert run_sft.stage.launch and run_dpo.stage.launch and not run_influence.stage.launch
    # the config with a launcher stays serialisable (the launched ranks read it back from disk)
    assert json.loads(json.dumps(ctx.config.model_dump(mode="json")))["distributed"]["launcher"] == "torchrun"


def test_distributed_ray_alone_chooses_the_executor_and_gives_the_stage_ray_workers(tmp_path):
    from montessori.pipeline import default_executor, run_in_process
    ctx = sft_run(tmp_path, "none")
    assert default_executor(ctx.config) is run_in_process
    ctx.config.distributed.ray = True  # no launcher: still not this process for influence and generation
    assert default_executor(ctx.config) is maybe_launch
    seen = maybe_launch(SimpleNamespace(name="responses", launch=False, function=lambda c: {"mapper": c.mapper}), ctx)
    # One contract: the mapper is all the executor hands over (generation's engines open through it too).
    assert seen["mapper"].name == "ray" and seen["mapper"].stats == []  # Ray starts when a stage maps
    assert seen["mapper"].batch_size == ctx.config.distributed.generation_chunk
    assert maybe_launch(here("sft", launch=True), ctx) == {"ran": "here"}
