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


# --- issue 26: what a reader refuses, and how ------------------------------------------------------

def test_a_csv_cell_over_pythons_default_limit_is_read_and_a_seed_is_held_to_max_seed_chars(tmp_path):
    """csv's own limit (131072 characters) refused a 200000-character reference answer with a traceback;
    the record limits are the project's (reference records are cut to tokens, seeds to max_seed_chars)."""
    path = tmp_path / "big.csv"
    path.write_text('instruction,answer\n"Summarise the text.","' + "word " * 40_000 + '"\n')
    assert len(read_pairs(str(path)).records[0].response) == 200_000
    with pytest.raises(InputError) as err:
        read_seeds(str(path), max_chars=20_000)
    assert str(err.value) == (f"{path}, line 2, field 'output': 200000 characters, over data.max_seed_chars=20000 "
                              f"(shorten the record or raise the key)")
    import csv
    assert csv.field_size_limit() == 131072  # read with its own bound, put back after


@pytest.mark.parametrize("name, text, where", [
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "\n", ", line 2: "),
    ("deep.json", "[" * 100_000, ": "),
    ("deep-record.jsonl", '{"instruction": "a", "output": "b", "x": ' + "[" * 150 + "]" * 150 + "}\n", ", line 1: "),
], ids=["jsonl-line", "json-file", "jsonl-field"])
def test_json_nested_too_deep_is_one_input_error_not_a_recursion_error(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}{where}JSON nested more than 100 levels deep"
    brackets = tmp_path / "in-strings.jsonl"  # brackets inside strings do not nest
    brackets.write_text(json.dumps({"instruction": "[" * 500, "output": "{" * 500}) + "\n")
    assert read_pairs(str(brackets)).records[0].response == "{" * 500


@pytest.mark.parametrize("name, data, expected", [
    ("cell.csv", b'instruction,answer\nName a colour.,Red.\nTea?,Caf\xe9\n',
     "line 3, field 'answer': not UTF-8 text (byte 0xe9 at character 4)"),
    ("multiline.csv", b'instruction,answer\n"Two\nlines, caf\xe9?",Yes.\n',
     "line 3, field 'instruction': not UTF-8 text (byte 0xe9 at character 15)"),
    ("header.csv", b'instr\xe9uction,answer\nName a colour.,Red.\n',
     "line 1: not UTF-8 text (byte 0xe9 at character 6) in the header row"),
    ("chat.jsonl", b'{"instruction": "a", "output": "b"}\n{"messages": [{"role": "user", "content": "Caf\xe9"}]}\n',
     "line 2, field 'messages[0].content': not UTF-8 text (byte 0xe9 at character 4)"),
    ("list.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "Caf\xe9", "output": "b"}\n]',
     "item 1, field 'instruction': not UTF-8 text (byte 0xe9 at character 4) on line 3"),
], ids=["csv-cell", "csv-multiline-cell", "csv-header", "jsonl-chat", "json-list"])
def test_a_bad_byte_is_named_by_file_line_and_field(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        read_pairs(str(path))
    assert str(err.value) == f"{path}, {expected}"


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,answer\r\nName a colour.,Red.\r\n".encode("utf-8-sig"))
    (pair,) = read_pairs(str(path)).records
    assert (pair.instruction, pair.response) == ("Name a colour.", "Red.")


def test_a_name_that_is_no_file_is_an_input_error_never_a_hub_call(tmp_path, monkeypatch):
    import datasets
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or [{"instruction": "a",
                                                                                       "output": "b"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        read_seeds("myseeds")  # a typo of myseeds.jsonl: it waited 26 s for the Hub, then a traceback
    assert str(err.value) == "myseeds: no such file or directory (a Hugging Face Hub dataset is named hf:OWNER/NAME)"
    assert asked == []
    assert read_pairs("hf:owner/name").records[0].response == "b" and asked == [("owner/name",)]


def test_a_hub_dataset_that_cannot_be_loaded_is_one_line(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/x' on the Hub (LocalEntryNotFoundError)\nmore detail")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(InputError) as err:
        read_seeds("hf:nobody/x")
    assert str(err.value) == ("hf:nobody/x: Hub dataset 'nobody/x' could not be loaded (ConnectionError: Couldn't "
                              "reach 'nobody/x' on the Hub (LocalEntryNotFoundError))")
