"""One name per concept (0.2): the renamed stages, sections and spellings, and what becomes of configs
and run directories written by montessori 0.1 (tests/fixtures/config-0.1.resolved.yaml is the resolved
config a 0.1 `montessori run` of the tiny preset wrote)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from montessori.cli import main
from montessori.config import load_config, load_preset
from montessori.errors import InputError
from montessori.export import collect
from montessori.pipeline import STAGE_NAMES, STAGES, stage_status

OLD_CONFIG = Path(__file__).resolve().parent / "fixtures" / "config-0.1.resolved.yaml"


def test_a_0_1_config_loads_as_the_same_config_and_fingerprints_the_same():
    old, new = load_config(OLD_CONFIG), load_preset("tiny")
    assert "pairs:" in OLD_CONFIG.read_text() and "precision: fp32" in OLD_CONFIG.read_text()
    assert old.model_dump() == new.model_dump()
    for stage in STAGES:
        assert old.keys_dump(stage.keys) == new.keys_dump(stage.keys), stage.name


def test_old_spellings_are_read_as_the_new_ones():
    old = load_preset("tiny", ["pairs.rule=sign", "influence.precision=bf16", "influence.grad_precision=fp32",
                               "influence.ref_grad_dtype=bf16", "warmup.precision=fp32", "models.dtype=bf16",
                               "generation.data_max_prompts_per_pair=2"])
    new = load_preset("tiny", ["preferences.rule=sign", "influence.precision=bfloat16",
                               "influence.grad_precision=float32", "influence.ref_grad_dtype=bfloat16",
                               "warmup.precision=float32", "models.dtype=bfloat16",
                               "generation.dataset_max_prompts_per_pair=2"])
    assert old.model_dump() == new.model_dump() and new.preferences.rule == "sign"
    assert "pairs" not in new.model_dump() and "fp32" not in new.to_yaml()


def test_one_seed_generation_seed_is_gone():
    assert "seed" not in load_preset("tiny").generation.model_dump()
    assert load_preset("tiny", ["generation.seed=0", "seed=3"]).seed == 3  # 0.1: 0 + 3, the same
    with pytest.raises(InputError, match="generation.seed.*top-level seed"):
        load_preset("tiny", ["generation.seed=2"])  # 0.1 added it to `seed`: the sum means something else now


@pytest.fixture()
def old_run(finished_tiny_run, tmp_path) -> Path:
    """A finished run as montessori 0.1 left it: stage folders pairs/ and data/, the 0.1 config."""
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    for new, old in (("preferences", "pairs"), ("dataset", "data")):
        (run / "round-1" / new).rename(run / "round-1" / old)
    shutil.copy(OLD_CONFIG, run / "config.resolved.yaml")
    return run


def test_status_report_and_export_read_a_0_1_run_directory(old_run, capsys):
    from montessori.store import RunStore
    rows = stage_status(RunStore(old_run))
    assert [r["stage"] for r in rows] == list(STAGE_NAMES) and {r["state"] for r in rows} == {"done"}
    assert main(["status", str(old_run)]) == 0
    assert main(["report", str(old_run)]) == 0
    assert "Preference pairs" in (old_run / "report.md").read_text()
    rows = collect(old_run)
    assert {r["stage"] for r in rows} == {"dataset", "responses"}
    assert sum(r["stage"] == "dataset" for r in rows) == len((old_run / "round-1" / "data" / "pairs.jsonl")
                                                             .read_text().splitlines())


def test_run_refuses_a_0_1_run_directory_in_one_line_and_touches_nothing(old_run, capsys):
    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(old_run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(old_run.rglob("*")) if p.is_file() and p.name not in ("montessori.log", ".lock")}
    before = snapshot()
    assert main(["run", str(old_run / "config.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "montessori 0.1" in err[0] and "round-1/pairs" in err[0] and "--run-dir" in err[0]
    assert snapshot() == before
    # Into a new directory the 0.1 config file runs as it is (stopped after the first stage here).
    assert main(["run", str(OLD_CONFIG), "--run-dir", str(old_run.parent / "new"),
                 "--until", "instructions"]) == 0
    manifest = json.loads((old_run.parent / "new" / "round-1" / "instructions" / "manifest.json").read_text())
    assert manifest["stage"] == "instructions"


def test_the_notebook_api_defaults_are_what_the_cli_runs():
    """compute_influence(...) without settings runs InfluenceSettings(): the influence.* defaults."""
    from dataclasses import fields
    from montessori.config import InfluenceConfig
    from montessori.influence.settings import InfluenceSettings
    settings, config = InfluenceSettings(), InfluenceConfig()
    shared = [f.name for f in fields(settings) if f.name in InfluenceConfig.model_fields]
    assert len(shared) >= 10 and {n: getattr(settings, n) for n in shared} == {n: getattr(config, n) for n in shared}
    assert InfluenceSettings(precision="fp32", grad_precision="bf16").grad_precision == "bfloat16"


def test_the_old_stage_names_on_the_command_line_say_the_new_ones(capsys):
    from montessori.pipeline import plan
    for old, new in (("pairs", "preferences"), ("data", "dataset")):
        with pytest.raises(InputError, match=f"'{old}' is called '{new}'"):
            plan(load_preset("tiny"), "/nonexistent", until=old)
