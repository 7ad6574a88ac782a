"""The generation stages on the `tiny` preset: outputs, counts, the 6 + 2 mix, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from montessori.cli import main
from montessori.generation.prompts import parse_completion
from montessori.pipeline import run_pipeline
from montessori.store import JsonlAppender, read_jsonl

FILES = {"instructions": ("prompts.jsonl", "candidates.jsonl", "dropped.jsonl"), "responses": ("pairs.jsonl",)}


def records(run, stage="instructions", name="candidates.jsonl", round=1):
    return read_jsonl(run / f"round-{round}" / stage / name)


def test_tiny_until_responses_writes_candidates_and_pairs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    assert main(["run", str(run / "config.yaml"), "--until", "responses"]) == 0
    kept, dropped, prompts = records(run), records(run, name="dropped.jsonl"), records(run, name="prompts.jsonl")
    pairs = records(run, "responses", "pairs.jsonl")
    assert len(kept) >= 12  # warm-up 4 + probing 8
    manifest = json.loads((run / "round-1" / "instructions" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["kept"] == len(kept) and counts["dropped"] == len(dropped)
    assert counts["samples"] == counts["prompts"] * 4 == len(prompts) * 4 == len(kept) + len(dropped)
    assert 0 < counts["format_compliance"] <= 1 and counts["tokens"] > 0 and counts["tokens_per_s"] > 0
    assert manifest["prompt_style"] == "list" and manifest["backend"] == "transformers"
    # Pairs answer the kept candidates, in order, linked by id and prompt.
    assert [p["id"] for p in pairs] == [c["id"] for c in kept]
    assert all(p["candidate_id"] == p["id"] and p["prompt_id"] == c["prompt_id"] and p["instruction"] == c["instruction"]
               for p, c in zip(pairs, kept))
    # Once two synthetic instructions exist, prompts show 6 seeds + 2 earlier kept candidates.
    kept_ids = {c["id"] for c in kept}
    for p in prompts:
        synthetic = [e for e in p["example_ids"] if not e.startswith("seed-")]
        assert len(p["example_ids"]) == 8 and len(synthetic) in (0, 2)
        assert all(e in kept_ids and e.rsplit("-s", 1)[0] < p["id"] for e in synthetic)
    assert any(len([e for e in p["example_ids"] if not e.startswith("seed-")]) == 2 for p in prompts)
    # A list-style candidate is the continuation after the prefill.
    assert kept[0]["prefill"] == "9." and kept[0]["instruction"] == parse_completion("list", kept[0]["completion"])
    assert main(["status", str(run)]) == 0
    assert "format_compliance" in capsys.readouterr().out


class Killed(BaseException):
    pass


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_config, monkeypatch, engine):
    config = tiny_config.model_copy(deep=True)
    config.generation.engine = engine
    config.generation.num_prompts = 4  # 2 batches of 2 prompts x 4 samples
    config.generation.instructions.max_new_tokens = config.generation.responses.max_new_tokens = 8
    run_pipeline(config, tmp_path / "straight", until="responses", progress=False)

    append = JsonlAppender.append
    # Appends: 2 prompts + 8 candidates per batch. Kill in the second batch of instructions; then (after
    # its remaining 8 appends) at the 11th pair, in the second batch of responses.
    for kill_at in (13, 8 + 11):
        calls = {"n": 0}

        def dying_append(self, record, _append=append, _at=kill_at, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise Killed
            _append(self, record)

        monkeypatch.setattr(JsonlAppender, "append", dying_append)
        with pytest.raises(Killed):
            run_pipeline(config, tmp_path / "resumed", until="responses", progress=False)
    monkeypatch.setattr(JsonlAppender, "append", append)
    assert not (tmp_path / "resumed" / "round-1" / "responses" / "manifest.json").exists()
    run_pipeline(config, tmp_path / "resumed", until="responses", progress=False)
    for stage, names in FILES.items():
        for name in names:
            straight = records(tmp_path / "straight", stage, name)
            resumed = records(tmp_path / "resumed", stage, name)
            assert resumed == straight, (stage, name)
            assert len({r["id"] for r in resumed}) == len(resumed)
    assert len(records(tmp_path / "straight", "responses", "pairs.jsonl")) == len(records(tmp_path / "straight"))


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume(tmp_path):
    """A real kill of `montessori run` while it writes candidates; the re-run finishes without duplicates."""
    run = tmp_path / "run"
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    config = run / "config.yaml"
    args = [str(config), "generation.num_prompts=16", "generation.batch_size=4", "--until", "instructions"]
    proc = subprocess.Popen([sys.executable, "-m", "montessori.cli", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    target = run / "round-1" / "instructions" / "candidates.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and len(target.read_text().splitlines()) >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    assert main(["run", *args]) == 0
    kept, dropped = records(run), records(run, name="dropped.jsonl")
    ids = [c["id"] for c in kept + dropped]
    assert len(ids) == len(set(ids)) == 16 * 4
    assert sorted(ids) == sorted(f"r1-p{i:05d}-s{j}" for i in range(16) for j in range(4))
    if not killed:
        pytest.skip("the run finished before it could be killed")


def test_data_stage_writes_exactly_num_pairs(tmp_path, tiny_config):
    """Stage `data` (docs/method.md, step 8): prompt batches until sft.num_pairs instructions are kept, then answers."""
    config = tiny_config.model_copy(deep=True)
    config.method = "self-instruct"  # stages data, sft, eval: the data stage needs no DPO output here
    config.generation.instructions.max_new_tokens = config.generation.responses.max_new_tokens = 8
    config.sft.num_pairs = 10
    run_pipeline(config, tmp_path / "run", until="dataset", progress=False)
    data = tmp_path / "run" / "round-1" / "dataset"
    pairs, kept = read_jsonl(data / "pairs.jsonl"), read_jsonl(data / "candidates.jsonl")
    assert len(pairs) == 10 and [p["id"] for p in pairs] == [c["id"] for c in kept[:10]]
    assert all(p["id"].startswith("r1-data-p") for p in pairs)
    counts = json.loads((data / "manifest.json").read_text())["counts"]
    # Batches of 2 prompts x 4 samples until 10 are kept: it stops after the batch that crossed 10.
    assert counts["kept"] >= 10 and counts["kept"] - 8 < 10 and counts["pairs"] == 10 and counts["short"] == 0
    assert counts["prompts"] == len(read_jsonl(data / "prompts.jsonl")) and counts["prompts"] % 2 == 0

    config.sft.num_pairs = 40
    config.generation.dataset_max_prompts_per_pair = 0.05  # at most 2 prompts: too few for 40 pairs
    run_pipeline(config, tmp_path / "capped", until="dataset", progress=False)
    counts = json.loads((tmp_path / "capped" / "round-1" / "dataset" / "manifest.json").read_text())["counts"]
    assert counts["prompts"] == 2 and counts["pairs"] == counts["kept"] <= 8 and counts["short"] == 40 - counts["pairs"]


def test_library_generation_returns_what_the_stages_write(tmp_path, tiny_config):
    """sample_instructions / answer_candidates return the records stages `instructions` / `responses`
    write for the same config and round (the value-returning form of the generation stages)."""
    from montessori.generation.backends import make_backend
    from montessori.generation.stage import answer_candidates, sample_instructions
    from montessori.records import Candidate, Pair
    run_pipeline(tiny_config, tmp_path / "run", until="responses", progress=False)
    backend = make_backend(tiny_config.models.teacher, tiny_config.generation, tiny_config.models)
    candidates = sample_instructions(backend, tiny_config)
    assert candidates and candidates == read_jsonl(tmp_path / "run/round-1/instructions/candidates.jsonl", Candidate)
    pairs = answer_candidates(backend, tiny_config, candidates)
    assert pairs == read_jsonl(tmp_path / "run/round-1/responses/pairs.jsonl", Pair)
