"""`montessori init --tasks`: from 30 of a team's own tasks to a run, its analysis and its exported
data, the way a new user would go (the tiny preset end to end); bad task files fail before anything
is written."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from montessori.cli import main
from montessori.config import load_config
from montessori.readers import read_pairs, read_seeds
from shopfloor import TASKS, write_csv


def _config(run):
    return load_config(run / "config.yaml")


def test_init_splits_tasks_into_seeds_reference_and_held_out_eval(tmp_path, capsys):
    tasks = write_csv(tmp_path / "tasks.csv")
    run = tmp_path / "run"
    assert main(["init", str(run), "--tasks", str(tasks), "--preset", "tiny"]) == 0
    assert "30 tasks" in capsys.readouterr().out
    cfg = _config(run)
    assert cfg.data.seeds == cfg.data.reference == str(run / "tasks" / "reference.jsonl")
    assert cfg.eval.prompts == str(run / "tasks" / "eval.jsonl") and cfg.eval.max_examples is None
    assert cfg.data.max_reference is None and cfg.models.student == "tiny-random:1"
    reference = read_pairs(cfg.data.reference).records
    evaluation = read_pairs(cfg.eval.prompts).records
    assert (len(reference), len(evaluation)) == (22, 8)
    # Evaluation never sees what influence (or the teacher) used; together they are the file.
    assert not {p.instruction for p in reference} & {p.instruction for p in evaluation}
    assert sorted(p.instruction for p in reference + evaluation) == sorted(q for q, _ in TASKS)
    assert {s.id for s in read_seeds(cfg.data.seeds).records} == {p.id for p in reference}
    split = json.loads((run / "tasks" / "split.json").read_text())
    assert split["seed"] == 0 and split["eval"] == [p.id for p in evaluation] and len(split["source_sha256"]) == 64
    # The split is drawn with the recorded seed: the same seed gives the same split, another seed another.
    assert main(["init", str(tmp_path / "same"), "--tasks", str(tasks), "--preset", "tiny"]) == 0
    assert json.loads((tmp_path / "same" / "tasks" / "split.json").read_text())["eval"] == split["eval"]
    assert main(["init", str(tmp_path / "other"), "--tasks", str(tasks), "--preset", "tiny", "--split-seed", "1"]) == 0
    assert json.loads((tmp_path / "other" / "tasks" / "split.json").read_text())["eval"] != split["eval"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_preset_is_chosen_from_the_machine(tmp_path, capsys):
    assert main(["init", str(tmp_path / "run"), "--tasks", str(write_csv(tmp_path / "t.csv"))]) == 0
    assert "preset own-tasks (no CUDA device)" in capsys.readouterr().out
    assert _config(tmp_path / "run").models.student == "smollm2"


def test_every_reader_shape_is_accepted(tmp_path):
    rows = TASKS[:12]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                                              for q, a in rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"instruction": q, "response": a} for q, a in rows]}))
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]} for q, a in rows]),
                   tmp_path / "c.parquet")
    seen = []
    for name in ("a.jsonl", "b.json", "c.parquet"):
        run = tmp_path / f"run-{name}"
        assert main(["init", str(run), "--tasks", str(tmp_path / name), "--preset", "tiny"]) == 0
        cfg = _config(run)
        seen.append(sorted(p.instruction for p in read_pairs(cfg.data.reference).records + read_pairs(cfg.eval.prompts).records))
    assert seen[0] == seen[1] == seen[2] == sorted(q for q, _ in rows)


def _bad(tmp_path, name: str, text: str | None = None, rows=None):
    path = tmp_path / name
    if rows is not None:
        write_csv(path, rows)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("case, expected", [
    ("empty", "no usable records"),
    ("too_few", "9 tasks, at least 10 needed"),
    ("missing_answer", "line 5, field 'answer': missing or empty answer"),
    ("missing_answer_jsonl", "line 3, field 'output': missing or empty answer"),
    # Task 12 starts on line 14: task 8's answer (code) spans two lines.
    ("duplicate", "line 14, field 'instruction': duplicate instruction (the same as line 3)"),
])
def test_bad_task_files_fail_in_one_line_and_write_nothing(tmp_path, capsys, case, expected):
    rows = list(TASKS)
    if case == "empty":
        path = _bad(tmp_path, "tasks.csv", "")
    elif case == "too_few":
        path = _bad(tmp_path, "tasks.csv", rows=rows[:9])
    elif case == "missing_answer":
        rows[3] = (rows[3][0], "")
        path = _bad(tmp_path, "tasks.csv", rows=rows)
    elif case == "missing_answer_jsonl":
        path = _bad(tmp_path, "tasks.jsonl", "".join(json.dumps({"instruction": q} if i == 2 else
                                                                {"instruction": q, "output": a}) + "\n"
                                                     for i, (q, a) in enumerate(rows)))
    else:
        rows[11] = ("  " + rows[1][0].upper(), "another answer")  # the same task, written differently
        path = _bad(tmp_path, "tasks.csv", rows=rows)
    run = tmp_path / "run"
    assert main(["init", str(run), "--tasks", str(path), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and err.count("\n") == 1
    assert not run.exists()


def test_own_tasks_to_analysis_and_exported_data(tmp_path, capsys):
    """A new user's path: 30 shop-floor tasks -> init -> run (tiny) -> analyze -> export -> train."""
    tasks = write_csv(tmp_path / "shopfloor.csv")
    run = tmp_path / "run"
    assert main(["init", str(run), "--tasks", str(tasks), "--preset", "tiny"]) == 0
    assert main(["run", str(run / "config.yaml")]) == 0
    assert json.loads((run / "round-1" / "eval" / "results.json").read_text())["prompts"]["examples"] == 8
    capsys.readouterr()
    assert main(["analyze", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["measured"] + summary["invalid"] == 8
    assert sum(g["n"] for g in summary["features"]["task_type"]) == summary["measured"]
    seeds = {g["value"] for g in summary["features"]["seed"]}
    assert seeds <= set(json.loads((run / "tasks" / "split.json").read_text())["reference"])
    page = (run / "report.html").read_text()
    assert "Which data works: influence per kind of candidate" in page

    exported = {}
    for fmt in ("messages", "alpaca", "sharegpt", "hf"):
        out = tmp_path / ("hf" if fmt == "hf" else f"{fmt}.jsonl")
        assert main(["export", str(run), str(out), "--format", fmt]) == 0
        exported[fmt] = (datasets.load_from_disk(str(out)) if fmt == "hf"
                         else datasets.load_dataset("json", data_files=str(out), split="train"))
    n = len(exported["messages"])
    assert n >= 8 and all(len(ds) == n for ds in exported.values())
    measured = [r for r in exported["messages"] if r["influence"] is not None]
    assert len(measured) == summary["measured"] and {r["stage"] for r in exported["messages"]} == {"dataset", "responses"}

    # The messages file trains TRL's SFTTrainer unchanged, one step, on the tiny student.
    from trl import SFTConfig, SFTTrainer
    from montessori.models import load_model
    model, tokenizer = load_model(_config(run).models.student, device="cpu", dtype="float32")
    before = [p.detach().clone() for p in model.parameters()]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=128)
    result = SFTTrainer(model=model, args=args, train_dataset=exported["messages"], processing_class=tokenizer).train()
    assert result.global_step == 1 and result.training_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # Generate more of what works: a second run steered by the first one's measurements.
    more = tmp_path / "more"
    assert main(["init", str(more), "--tasks", str(tasks), "--preset", "tiny"]) == 0
    raw = yaml.safe_load((more / "config.yaml").read_text())
    raw["generation"]["steer"] = {"enabled": True, "source": str(run), "by": "seed", "min_count": 1}
    (more / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(more / "config.yaml"), "--until", "instructions"]) == 0
    manifest = json.loads((more / "round-1" / "instructions" / "manifest.json").read_text())
    assert manifest["steer"]["source"] == str(run) and manifest["steer"]["measured"] == summary["measured"]
    assert set(manifest["steer"]["kinds"]) == seeds
    unsteered = json.loads((run / "round-1" / "instructions" / "manifest.json").read_text())
    assert "steer" not in unsteered
