"""The whole method on the `tiny` preset through the CLI: every stage of two rounds, then the run store."""

import json

import pytest

from montessori.cli import main
from montessori.pipeline import STAGE_NAMES
from montessori.store import read_jsonl


def lines(path):
    return read_jsonl(path) if path.exists() else []


def test_tiny_two_rounds_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["init", str(run), "--preset", "tiny"]) == 0
    assert main(["run", str(run / "config.yaml"), "rounds=2"]) == 0
    for r in (1, 2):
        for stage in STAGE_NAMES:
            manifest = json.loads((run / f"round-{r}" / stage / "manifest.json").read_text())
            assert manifest["stage"] == stage and manifest["round"] == r
        rd = run / f"round-{r}"
        candidates = lines(rd / "instructions" / "candidates.jsonl")
        pairs = lines(rd / "responses" / "pairs.jsonl")
        split = json.loads((rd / "warmup" / "split.json").read_text())
        influence = lines(rd / "influence" / "influence.jsonl")
        # Counts add up across stages.
        counts = json.loads((rd / "instructions" / "manifest.json").read_text())["counts"]
        assert counts["kept"] == len(candidates) and counts["kept"] + counts["dropped"] == counts["samples"]
        assert {p["id"] for p in pairs} <= {c["id"] for c in candidates}
        assert len(split["warmup"]) == 4 and len(split["probing"]) == len(influence) == 8
        assert {i["id"] for i in influence} == set(split["probing"]) and not set(split["warmup"]) & set(split["probing"])
        prefs = lines(rd / "preferences" / "preferences.jsonl")
        assert prefs and all(p["chosen_influence"] > p["rejected_influence"] for p in prefs)
        assert (rd / "dpo" / "model" / "config.json").exists() and (rd / "sft" / "model" / "config.json").exists()
        assert len(lines(rd / "dataset" / "pairs.jsonl")) == 8
    # Round 2 starts from round 1's teacher and student.
    m2 = json.loads((run / "round-2" / "instructions" / "manifest.json").read_text())
    assert "round-1/dpo" in m2["inputs"]
    assert (run / "report.html").exists() and (run / "report.md").exists()
    # A second run has nothing to do.
    assert main(["run", str(run / "config.yaml"), "rounds=2"]) == 0
    assert "running" not in (run / "montessori.log").read_text().split("skipped")[-1]
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "pending" not in out
