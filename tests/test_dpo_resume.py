"""Stage-level resume: a run killed during `dpo` or `sft` and started again ends with the same
artifacts as a run that was never interrupted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from montessori.config import load_preset
from montessori.pipeline import run_pipeline
from montessori.records import Candidate, GenerationPrompt, InfluenceResult, Pair
from montessori.store import RunStore, read_jsonl, write_jsonl

OVERRIDES = ["preferences.rule=rank", "preferences.max_per_prompt=2", "sft.global_batch_size=2"]


def fake_upstream(run_dir) -> None:
    """What the generation and influence stages would have left: records + manifests."""
    store = RunStore(run_dir)
    prompts, cands, results = [], [], []
    for p in range(2):
        prompts.append(GenerationPrompt(id=f"p{p}", messages=[{"role": "user", "content": f"New task {p}?"}],
                                        example_ids=[], prefill="1."))
        for s, value in enumerate([0.4, 0.1, -0.2, 0.3]):
            cid = f"r1-p{p}-s{s}"
            cands.append(Candidate(id=cid, prompt_id=f"p{p}", completion=f" Describe item {p}{s} briefly.",
                                   instruction=f"Describe item {p}{s} briefly."))
            results.append(InfluenceResult(id=cid, influence=value + p, ref_loss_before=3.0, ref_loss_after=2.0))
    write_jsonl(store.stage(1, "instructions").file("prompts.jsonl"), prompts)
    write_jsonl(store.stage(1, "instructions").file("candidates.jsonl"), cands)
    write_jsonl(store.stage(1, "influence").file("influence.jsonl"), results)
    # responses/pairs.jsonl: the answered pair of each candidate (id = candidate id), as the responses stage
    # writes it; preferences reads it for the answer lengths
    write_jsonl(store.stage(1, "responses").file("pairs.jsonl"),
                [Pair(id=c.id, instruction=c.instruction, response=f"Answer to {c.id}.") for c in cands])
    write_jsonl(store.stage(1, "dataset").file("pairs.jsonl"),
                [Pair(id=f"d{i}", instruction=f"Name {i} fruits.", response="Apple, pear, plum.") for i in range(4)])
    for name in ("instructions", "responses", "influence", "dataset"):
        store.stage(1, name).write_manifest(fingerprint=f"fake-{name}", config_hash="x", inputs={}, counts={},
                                            started=0.0)


class Killed(KeyboardInterrupt):
    pass


def kill_after(monkeypatch, trainer_cls, steps: int) -> None:
    original = trainer_cls.training_step
    calls = {"n": 0}

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "training_step", training_step)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def losses(path) -> list[float]:
    return [m["loss"] for m in read_jsonl(path / "metrics.jsonl") if "loss" in m]


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_killed_stage_resumes_to_the_same_artifacts(stage, tmp_path, monkeypatch):
    from trl import DPOTrainer, SFTTrainer
    config = load_preset("tiny", OVERRIDES)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for run in (clean, killed):
        fake_upstream(run)
        if stage == "dpo":
            run_pipeline(config, run, only="preferences", progress=False)
    run_pipeline(config, clean, only=stage, progress=False)

    with monkeypatch.context() as m:
        kill_after(m, DPOTrainer if stage == "dpo" else SFTTrainer, steps=1)
        with pytest.raises(Killed):
            run_pipeline(config, killed, only=stage, progress=False)
    out = RunStore(killed).stage(1, stage)
    assert out.manifest() is None and not (out.path / "model").exists()  # nothing half-done looks finished

    run_pipeline(config, killed, only=stage, progress=False)
    a, b = RunStore(clean).stage(1, stage), RunStore(killed).stage(1, stage)
    assert b.manifest()["counts"]["steps"] == a.manifest()["counts"]["steps"] == 2
    wa, wb = weights(a.path / "model"), weights(b.path / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a.path) == losses(b.path)
    assert json.loads((a.path / "model" / "config.json").read_text()) == json.loads(
        (b.path / "model" / "config.json").read_text())
    # A finished stage is skipped on the next run: its artifacts stay as they are.
    mtime = (b.path / "model" / "model.safetensors").stat().st_mtime
    run_pipeline(config, killed, only=stage, progress=False)
    assert (b.path / "model" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_sigkilled_cli_run_resumes_to_the_same_artifacts(stage, tmp_path):
    """The real thing: `montessori run` killed with SIGKILL while the stage trains, then run again."""
    import subprocess
    import sys
    import time
    config = load_preset("tiny", OVERRIDES)
    runs = {}
    for name in ("clean", "killed"):
        run = tmp_path / name
        fake_upstream(run)
        (run / "config.yaml").write_text(config.to_yaml())
        runs[name] = run

    def cli(run, only):
        return [sys.executable, "-c", "import sys; from montessori.cli import main; sys.exit(main())",
                "run", str(run / "config.yaml"), "--only", only]

    for run in runs.values():
        if stage == "dpo":
            subprocess.run(cli(run, "preferences"), check=True, capture_output=True)
    subprocess.run(cli(runs["clean"], stage), check=True, capture_output=True)

    killed = runs["killed"]
    proc = subprocess.Popen(cli(killed, stage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "montessori.log"
    deadline = time.time() + 120
    while time.time() < deadline and f"{stage}: running" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(4)  # into model loading / training
    proc.kill()
    proc.wait()
    out = RunStore(killed).stage(1, stage)
    assert out.manifest() is None, "the stage finished before the kill: raise the sleep"
    subprocess.run(cli(killed, stage), check=True, capture_output=True)
    a, b = RunStore(runs["clean"]).stage(1, stage), out
    wa, wb = weights(a.path / "model"), weights(b.path / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a.path) == losses(b.path)
