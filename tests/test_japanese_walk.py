"""The seed's user, end to end: 19 Japanese shop-floor tasks (tests/data/shopfloor_ja.csv, one of them a
reworded repeat of another) -> `init --tasks` -> a run on the tiny preset -> `analyze` (the verdict on
top) -> `export`, through the CLI as a user types it. The tiny teacher writes random tokens, so what is
checked on Japanese is what the run did with the user's tasks: the prompts, the features of the seeds,
the held-out repeat found by dedup over characters, and lengths in characters."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from montessori.cli import main
from montessori.features import text_length
from montessori.store import read_jsonl
from montessori.verdict import KINDS

TASKS = Path(__file__).parent / "data" / "shopfloor_ja.csv"


def test_japanese_tasks_from_init_to_export(tmp_path, capsys):
    run = tmp_path / "shop"
    assert main(["init", str(run), "--tasks", str(TASKS), "--preset", "tiny"]) == 0
    assert "read 19 tasks" in capsys.readouterr().out
    # Kept under a minute on 2 cores, where DPO is most of the run: 4 examples a prompt, not 8 (SmolLM2's
    # tokenizer spends 1.6 tokens on a Japanese character: 8 of these tasks make a 641-token prompt, past
    # the tiny preset's dpo.max_length=512, which DPO refuses naming the key; 4 make 326), and one
    # preference pair per prompt (one DPO step, not four: 13 s instead of 44 s, measured under load).
    assert main(["run", str(run / "config.yaml"), "generation.examples_per_prompt=4",
                 "preferences.max_per_prompt=1"]) == 0

    # The teacher was asked for Japanese: in every generation prompt, and each writing stage says so.
    round1 = run / "round-1"
    for stage in ("instructions", "dataset"):
        prompts = read_jsonl(round1 / stage / "prompts.jsonl")
        assert prompts and all("Write every instruction in Japanese" in p["messages"][0]["content"] for p in prompts)
    for stage in ("instructions", "responses", "dataset"):
        assert json.loads((round1 / stage / "manifest.json").read_text())["language"] == "Japanese"
    assert json.loads((round1 / "eval" / "results.json").read_text())["prompts"]["examples"] == 5

    capsys.readouterr()
    assert main(["analyze", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # The user's tasks by kind: the Japanese rules type them (before, all 14 were "other").
    tasks = summary["tasks"]
    assert tasks["language"] == "Japanese" and tasks["count"] == 14
    assert "other" not in tasks["task_types"] and len(tasks["task_types"]) >= 6
    # Dedup over characters finds the reworded repeat that the split held out (ください / 下さい).
    (repeat,) = tasks["held_out_repeats"]
    assert repeat["held_out_instruction"] == "旋盤のびびりマークの原因を三つ挙げて下さい。"
    assert repeat["reference_instruction"] == "旋盤のびびりマークの原因を三つ挙げてください。"
    # The verdict, from this run's own eval results and influence.
    verdict = summary["verdict"]
    assert verdict["kind"] in KINDS and verdict["next_step"]
    assert "on the 5 held-out tasks" in verdict["lines"][0] and verdict["lines"][1].startswith("Careful:")
    assert f"Of the {summary['measured']} candidates the teacher wrote" in " ".join(verdict["lines"])
    assert summary["measured"] + summary["invalid"] == 8
    # Lengths in characters (a wide one counts two), for every measured candidate.
    features = read_jsonl(run / "analysis" / "candidates.jsonl")
    assert len(features) == summary["measured"]
    assert all(f["instruction_chars"] == text_length(f["instruction"]) > 0 for f in features)
    assert all(f["response_chars"] == text_length(f["response"]) for f in features)

    assert main(["analyze", str(run)]) == 0
    assert capsys.readouterr().out.startswith("Verdict\n")
    page = (run / "report.html").read_text()
    assert page.index("<div class=verdict>") < page.index("Rounds at a glance")

    out = tmp_path / "shop.jsonl"
    assert main(["export", str(run), str(out), "--format", "messages"]) == 0
    exported = datasets.load_dataset("json", data_files=str(out), split="train")
    assert {r["stage"] for r in exported} == {"dataset", "responses"}
    assert len([r for r in exported if r["influence"] is not None]) == summary["measured"]
    assert all(r["task_type"] for r in exported)
