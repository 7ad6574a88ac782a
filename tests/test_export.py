"""`montessori export`: a run's pairs as messages / alpaca / sharegpt JSONL, a datasets directory and
Parquet, with provenance, loadable by `datasets`, identical when exported twice."""

from __future__ import annotations

import json

import datasets
import pytest

from montessori.cli import main
from montessori.export import FORMATS
from shopfloor import MEASURED, TASKS, make_measured_run

JSONL = ("messages", "alpaca", "sharegpt")


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.is_dir() else {path.name: path.read_bytes()}


@pytest.fixture()
def run(tmp_path):
    return make_measured_run(tmp_path / "run")


def _load(path, fmt):
    if fmt == "hf":
        return datasets.load_from_disk(str(path))
    kind = "parquet" if fmt == "parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_with_provenance_and_reexports_identically(run, tmp_path, fmt, capsys):
    out = tmp_path / f"out-{fmt}"
    assert main(["export", str(run), str(out), "--format", fmt]) == 0
    assert "exported 17 pairs" in capsys.readouterr().out  # 3 data + 2 warm-up + 12 probing
    ds = _load(out, fmt)
    assert len(ds) == 17
    rows = list(ds)
    data, probing = rows[0], next(r for r in rows if r["split"] == "probing")
    # Provenance: the updated teacher wrote the training set (no influence); probing pairs carry theirs.
    assert data["stage"] == "dataset" and data["influence"] is None and data["teacher"].endswith("round-1/dpo/model")
    assert data["round"] == 1 and data["task_type"] == "open question"
    assert probing["stage"] == "responses" and probing["teacher"] == "tiny-random:0"
    assert probing["influence"] == MEASURED[0][2] and probing["task_type"] == "code"
    assert sum(r["split"] == "warmup" for r in rows) == 2
    if fmt == "alpaca":
        assert (data["instruction"], data["input"], data["output"]) == (TASKS[0][0], "", TASKS[0][1])
    elif fmt == "sharegpt":
        assert data["conversations"] == [{"from": "human", "value": TASKS[0][0]}, {"from": "gpt", "value": TASKS[0][1]}]
    else:
        assert data["messages"] == [{"role": "user", "content": TASKS[0][0]},
                                    {"role": "assistant", "content": TASKS[0][1]}]
    # Deterministic: a second export is byte for byte the same.
    again = tmp_path / f"again-{fmt}"
    assert main(["export", str(run), str(again), "--format", fmt]) == 0
    first, second = _files(out), _files(again)
    assert list(first.values()) == list(second.values())


def test_stages_filter_and_errors(run, tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    assert main(["export", str(run), str(out), "--format", "alpaca", "--stages", "dataset"]) == 0
    assert [json.loads(line)["stage"] for line in out.read_text().splitlines()] == ["dataset"] * 3
    assert main(["export", str(run), str(tmp_path / "x"), "--format", "alpaca", "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub needs --format hf" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y"), "--format", "messages"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "z"), "--format", "messages", "--stages", "sft"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["export", str(run), str(precious), "--format", "hf"]) == 2
    assert "not a dataset directory" in capsys.readouterr().err and (precious / "notes.txt").exists()
