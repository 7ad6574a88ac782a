"""Re-run decisions (issue 17): a stage's fingerprint covers exactly the config keys it declares, the
content of the files it reads and the fingerprints of the stages it reads; nothing else."""

from __future__ import annotations

import dataclasses

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from montessori.config import Config, load_config, load_preset
from montessori.pipeline import NOT_FINGERPRINTED, STAGE_NAMES, STAGES, plan, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
ROUND_1 = [(1, name) for name in STAGE_NAMES]


def config_of(run: Path, *overrides: str) -> Config:
    return load_config(run / "config.yaml", list(overrides))


def onward(name: str) -> list[tuple[int, str]]:
    return ROUND_1[STAGE_NAMES.index(name):]


def test_a_finished_run_has_nothing_to_run(finished_tiny_run):
    assert plan(config_of(finished_tiny_run), finished_tiny_run) == []
    # Keys no stage reads (how an endpoint is reached, labels) re-run nothing either.
    assert plan(config_of(finished_tiny_run, "generation.http_timeout=5", "name=other"), finished_tiny_run) == []


def test_changing_sft_lr_reruns_only_sft_and_eval(finished_tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    config = config_of(run, "sft.lr=2e-4")
    assert plan(config, run) == [(1, "sft"), (1, "eval")]

    def finished() -> dict[str, float]:
        return {n: json.loads((run / "round-1" / n / "manifest.json").read_text())["finished"] for n in STAGE_NAMES}
    before = finished()
    run_pipeline(config, run, progress=False)
    after = finished()
    assert {n for n in STAGE_NAMES if after[n] != before[n]} == {"sft", "eval"}
    assert plan(config, run) == []


def test_editing_the_reference_file_in_place_reruns_influence_onward(finished_tiny_run):
    reference = finished_tiny_run / "reference.jsonl"
    original = reference.read_bytes()
    try:
        lines = original.splitlines(keepends=True)
        reference.write_bytes(lines[1] + lines[0] + b"".join(lines[2:]))  # same records, another order
        assert plan(config_of(finished_tiny_run), finished_tiny_run) == onward("influence")
    finally:
        reference.write_bytes(original)
    assert plan(config_of(finished_tiny_run), finished_tiny_run) == []


def test_editing_the_seed_file_in_place_reruns_what_reads_it(finished_tiny_run):
    seeds = finished_tiny_run / "seeds.jsonl"
    original = seeds.read_bytes()
    try:
        seeds.write_bytes(original + b'{"instruction": "Name three rivers."}\n')
        assert plan(config_of(finished_tiny_run), finished_tiny_run) == ROUND_1
        # dataset reads the seeds too: with only its own stage selected it is stale by its own fingerprint.
        assert plan(config_of(finished_tiny_run), finished_tiny_run, only="dataset") == [(1, "dataset")]
        assert plan(config_of(finished_tiny_run), finished_tiny_run, only="sft") == []
    finally:
        seeds.write_bytes(original)


def test_changing_the_top_level_seed_reruns_only_what_samples(finished_tiny_run):
    config = config_of(finished_tiny_run, "seed=7")
    stale = {name for name in STAGE_NAMES if plan(config, finished_tiny_run, only=name)}
    # mechanism samples fresh candidates too; warm-up, DPO and SFT have their own seeds
    assert stale == {"instructions", "responses", "mechanism", "dataset", "eval"}


def test_data_max_reference_reruns_influence_onward_only(finished_tiny_run):
    config = config_of(finished_tiny_run, "data.max_reference=4")
    assert plan(config, finished_tiny_run) == onward("influence")


def test_the_teacher_stages_do_not_depend_on_the_student(finished_tiny_run):
    config = config_of(finished_tiny_run, "models.student=tiny-random:2")
    assert plan(config, finished_tiny_run) == onward("warmup")
    assert plan(config, finished_tiny_run, only="dpo") == []


def test_until_stops_in_round_1_unless_a_round_is_named(tmp_path):
    config = load_preset("tiny", ["rounds=2"])
    assert plan(config, tmp_path, until="influence") == onward("instructions")[:4]
    assert plan(config, tmp_path, until="2:influence") == ROUND_1 + [(2, n) for n in STAGE_NAMES[:4]]
    from montessori.errors import InputError
    with pytest.raises(InputError, match="needs stage 'dataset' of round 2"):  # as run_pipeline would say
        plan(config, tmp_path, only="2:sft")
    with pytest.raises(InputError, match="round must be 1 to 2"):
        plan(config, tmp_path, until="3:influence")


def test_until_influence_with_two_rounds_runs_nothing_after_round_1_influence(tmp_path, monkeypatch):
    """The real runner, on stages that only record that they ran."""
    from montessori import pipeline
    ran.clear()
    from montessori import method
    stages = tuple(dataclasses.replace(s, function=record_stage) for s in STAGES)
    monkeypatch.setattr(method, "STAGES", stages)
    monkeypatch.setattr(pipeline, "preflight", lambda config, stages=None: None)
    run_pipeline(load_preset("tiny", ["rounds=2"]), tmp_path, until="influence", progress=False)
    assert ran == onward("instructions")[:4]
    run_pipeline(load_preset("tiny", ["rounds=2"]), tmp_path, until="2:responses", progress=False)
    assert ran[4:] == ROUND_1[4:] + [(2, "instructions"), (2, "responses")]


ran: list[tuple[int, str]] = []


def record_stage(ctx):
    ran.append((ctx.round, ctx.dir.stage))
    return {}


def leaf_keys(model, prefix: str = "") -> list[str]:
    from montessori.config import Section
    keys = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        keys += leaf_keys(value, key + ".") if isinstance(value, Section) else [key]
    return keys


def test_every_config_key_is_read_by_a_stage_or_named_as_not_fingerprinted():
    declared = {k for s in STAGES for k in s.keys}
    for key in leaf_keys(load_preset("tiny")):
        covered = any(key == d or key.startswith(d + ".") for d in declared | set(NOT_FINGERPRINTED))
        assert covered, f"config key {key} is read by no stage: declare it in a Stage's keys or in NOT_FINGERPRINTED"
    for stage in STAGES:
        for key in stage.keys:
            load_preset("tiny").value(key)  # every declared key exists
        assert set(stage.files) <= set(stage.keys)


def test_the_launcher_does_not_import_the_runner():
    code = "import sys, montessori.executors.launcher; sys.exit('montessori.pipeline' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
