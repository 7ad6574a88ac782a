import json

import pytest

from conftest import shared_data
from montessori.cli import main
from montessori.errors import InputError
from montessori.readers import read_pairs, read_seeds


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_selfinstruct_and_chat_shapes(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"instruction": "Name a color.", "response": "Blue."},
    ])
    seeds = read_seeds(str(path)).records
    assert [s.text for s in seeds] == ["Translate to French. Good morning", "Add the numbers. 2 and 3",
                                      "Say hi.", "Name a color."]
    pairs = read_pairs(str(path)).records
    assert pairs[0].instruction == "Translate to French.\n\nGood morning" and pairs[0].response == "Bonjour"
    assert [p.response for p in pairs[1:]] == ["5", "Hi!", "Blue."]


def test_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.parquet"):
        assert [p.response for p in read_pairs(str(tmp_path / name)).records] == ["Answer 0", "Answer 1", "Answer 2"]


def test_local_hf_dataset_dir(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"instruction": "Be brief.", "output": "OK."}]).save_to_disk(str(tmp_path / "ds"))
    assert read_pairs(str(tmp_path / "ds")).records[0].response == "OK."


@pytest.mark.parametrize("rows, expected", [
    ([{"instruction": "ok", "output": "x"}, "{not json"], "line 2: not valid JSON"),
    ([{"instruction": "ok", "output": "x"}, {"input": "no instruction"}], "line 2, field 'instruction': missing"),
    ([{"instruction": 7, "output": "x"}], "line 1, field 'instruction': expected a string"),
    ([{"instruction": "ok", "output": ""}], "line 1, field 'output'"),
    ([{"instruction": "ok", "instances": []}], "field 'instances'"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as err:
        read_pairs(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_lenient_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, "{oops", {"output": "c"}])
    result = read_pairs(str(path), lenient=True)
    assert len(result.records) == 1 and len(result.skipped) == 2 and "line 2" in result.skipped[0]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="no usable records"):
        read_seeds(str(tmp_path / "empty.jsonl"))
    with pytest.raises(InputError, match="no such file"):
        read_seeds(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="unknown file type"):
        (tmp_path / "x.tsv").write_text("a\tb\n")  # CSV is read since `init --tasks`
        read_seeds(str(tmp_path / "x.tsv"))


def test_builtin_sets_are_large_and_clean():
    seeds = read_seeds().records
    reference = read_pairs().records
    assert len(seeds) >= 100 and len(reference) >= 64
    assert len({s.id for s in seeds}) == len(seeds) and len({r.id for r in reference}) == len(reference)


def test_shared_selfinstruct_seeds():
    seeds = read_seeds(str(shared_data("self_instruct_seed_tasks.jsonl"))).records
    assert len(seeds) == 175


def test_cli_bad_data_file_exits_2_naming_the_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "fine"}, {"instruction": None}])
    (tmp_path / "config.yaml").write_text(
        f"models: {{teacher: tiny-random:0, student: tiny-random:1, device: cpu}}\ndata: {{seeds: {bad}}}\n")
    assert main(["run", str(tmp_path / "config.yaml"), "--until", "instructions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "line 2" in err[0] and "instruction" in err[0]
