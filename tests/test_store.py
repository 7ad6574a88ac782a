"""Run store: atomic files, append-only resume, manifests, skipping and clearing stages."""

import json

import pytest

from montessori.config import load_preset
from montessori.pipeline import Stage, run_pipeline, stage_status
from montessori.records import Pair
from montessori.store import JsonlAppender, RunStore, read_jsonl, write_jsonl

CALLS = {"n": 0, "fail_after": None}


def counting_stage(ctx):
    """A stage that writes 10 records, one at a time, resuming by id."""
    n = ctx.config.generation.num_prompts
    with JsonlAppender(ctx.dir.file("pairs.jsonl"), Pair) as out:
        for i in range(n):
            rid = f"p{i}"
            if rid in out:
                continue
            if CALLS["fail_after"] is not None and len(out.ids) >= CALLS["fail_after"]:
                raise KeyboardInterrupt  # like Ctrl-C in the middle of the stage
            CALLS["n"] += 1
            out.append(Pair(id=rid, instruction=f"task {i}", response=str(i * i)))
        return {"pairs": len(out.ids)}


def summing_stage(ctx):
    pairs = read_jsonl(ctx.input("instructions").file("pairs.jsonl"), Pair)
    write_jsonl(ctx.dir.file("sum.jsonl"), [{"id": "sum", "total": sum(int(p.response) for p in pairs)}])
    return {"total": sum(int(p.response) for p in pairs)}


@pytest.fixture()
def toy_stages(monkeypatch):
    from montessori import method
    stages = (Stage("instructions", counting_stage, ("generation",)),
              Stage("responses", summing_stage, ("models",), ("instructions",)))
    monkeypatch.setattr(method, "STAGES", stages)
    monkeypatch.setattr(method, "STAGE_NAMES", tuple(s.name for s in stages))
    CALLS.update(n=0, fail_after=None)
    return load_preset("tiny", ["generation.num_prompts=10"])


def test_interrupted_stage_resumes_to_the_same_result(tmp_path, toy_stages):
    config = toy_stages
    run_pipeline(config, tmp_path / "clean")
    CALLS.update(n=0, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, tmp_path / "resumed")
    assert CALLS["n"] == 4
    status = {r["stage"]: r["state"] for r in stage_status(RunStore(tmp_path / "resumed"))}
    assert status["instructions"] == "partial" and status["responses"] == "pending"
    CALLS.update(n=0, fail_after=None)
    run_pipeline(config, tmp_path / "resumed")
    assert CALLS["n"] == 6  # only the missing records were computed
    for stage, name in (("instructions", "pairs.jsonl"), ("responses", "sum.jsonl")):
        clean = (tmp_path / "clean" / "round-1" / stage / name).read_text()
        assert (tmp_path / "resumed" / "round-1" / stage / name).read_text() == clean


def test_torn_last_line_is_dropped_on_resume(tmp_path, toy_stages):
    CALLS.update(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(toy_stages, tmp_path)
    path = tmp_path / "round-1" / "instructions" / "pairs.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "p3", "instr')  # a crash mid-write
    CALLS.update(fail_after=None)
    run_pipeline(toy_stages, tmp_path)
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == [f"p{i}" for i in range(10)]


def test_done_stage_is_skipped_and_changed_config_reruns(tmp_path, toy_stages):
    run_pipeline(toy_stages, tmp_path)
    manifest = json.loads((tmp_path / "round-1" / "instructions" / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 10} and manifest["version"] and manifest["seconds"] >= 0
    assert set(manifest) >= {"config_hash", "inputs", "counts", "started", "finished", "fingerprint"}
    CALLS["n"] = 0
    run_pipeline(toy_stages, tmp_path)
    assert CALLS["n"] == 0
    # A change in a section the stage does not read does not re-run it ...
    run_pipeline(toy_stages.model_copy(update={"dpo": toy_stages.dpo.model_copy(update={"beta": 0.5})}), tmp_path)
    assert CALLS["n"] == 0
    # ... a change in one it reads clears the old output and re-runs it and everything downstream.
    smaller = toy_stages.model_copy(update={"generation": toy_stages.generation.model_copy(update={"num_prompts": 3})})
    run_pipeline(smaller, tmp_path)
    assert CALLS["n"] == 3
    assert json.loads((tmp_path / "round-1" / "responses" / "sum.jsonl").read_text())["total"] == 0 + 1 + 4


def test_only_needs_its_inputs(tmp_path, toy_stages):
    from montessori.errors import InputError
    with pytest.raises(InputError, match="needs stage 'instructions'"):
        run_pipeline(toy_stages, tmp_path, only="responses")
    run_pipeline(toy_stages, tmp_path, until="instructions")
    assert not (tmp_path / "round-1" / "responses").exists()
    run_pipeline(toy_stages, tmp_path, only="responses")
    assert (tmp_path / "round-1" / "responses" / "manifest.json").exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"id": "a"}])
    write_jsonl(tmp_path / "x.jsonl", [{"id": "b"}])
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
    assert read_jsonl(tmp_path / "x.jsonl") == [{"id": "b"}]
