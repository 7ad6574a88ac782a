"""Read seed tasks and instruction/response sets from the shapes people actually have.

Formats: JSONL, JSON (a list, or an object with a list under "data"/"train"/"rows"), CSV (a header
row naming the columns, e.g. `instruction,answer`), Parquet, a local
HF dataset directory (`datasets.save_to_disk`, or a folder of data files); anything else that is not a
path is treated as a Hub dataset id and passed to `datasets.load_dataset` (needs network).

Shapes (detected per record):
  Alpaca        instruction + input + output
  Self-Instruct instruction + instances[{input, output}]   (the first instance is used)
  Reference     instruction + response (or answer)
  Chat          messages [{role: user, ...}, {role: assistant, ...}]

A bad record raises InputError naming file, record and field; with lenient=True it is skipped and
counted in `ReadResult.skipped`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from montessori.errors import InputError
from montessori.records import Pair, SeedTask

BUILTIN = "builtin"


@dataclass
class ReadResult:
    records: list
    skipped: list[str] = field(default_factory=list)  # one message per skipped record


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("montessori.resources").joinpath(name)))


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (record label, row) pairs; the label is what errors print ("line 7", "row 3")."""
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _iter_hf_dir(path)
    elif suffix == ".jsonl":
        with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    row = InputError(f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})")
                except json.JSONDecodeError as err:
                    row = InputError(f"not valid JSON ({err.msg})")
                yield f"line {lineno}", row
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})",
                             file=path) from None
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg} at line {err.lineno})", file=path) from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "train", "rows", "examples") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            raise InputError("expected a JSON list of records (or an object with a 'data' list)", file=path)
        for i, row in enumerate(data):
            yield f"item {i}", row
    elif suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            first = 2  # the line a row starts on (a quoted cell may span lines)
            for row in reader:
                # Cells beyond the header (key None) are dropped.
                yield f"line {first}", {k: v for k, v in row.items() if k is not None}
                first = reader.line_num + 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise InputError(f"not a readable Parquet file ({err})", file=path) from None
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
    else:
        raise InputError(f"unknown file type '{suffix}' (use .jsonl, .json, .csv, .parquet or an HF dataset dir)", file=path)


def _iter_hf_dir(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            ds = datasets.load_dataset(str(path), split="train")
    except Exception as err:  # datasets raises many types (EmptyDatasetError, ValueError, ...) for a bad folder
        reason = (str(err).splitlines() or [""])[0]
        raise InputError(f"a folder, not a readable dataset ({type(err).__name__}: {reason}); give a .jsonl, "
                         f".json or .parquet file or a datasets.save_to_disk folder", file=path) from None
    for i, row in enumerate(ds):
        yield f"row {i}", row


def _iter_source(source: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    path = Path(source).expanduser()
    if path.exists():
        return str(path), _iter_rows(path)
    if source.startswith((".", "/", "~")) or path.suffix:
        raise InputError("no such file or directory", file=source)

    def hub() -> Iterator[tuple[str, Any]]:  # a Hub dataset id (network or HF cache needed)
        import datasets
        for i, row in enumerate(datasets.load_dataset(source, split="train")):
            yield f"row {i}", row
    return source, hub()


def _text(row: dict, key: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise InputError("missing", field=key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", field=key)
    return value


def _chat(row: dict) -> tuple[str, str]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError("expected a non-empty list of {role, content}", field="messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    answers = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not users or not isinstance(users[0].get("content"), str):
        raise InputError("no user message with string content", field="messages")
    answer = answers[0].get("content") if answers else ""
    return users[0]["content"], answer if isinstance(answer, str) else ""


def _instruction_and_answer(row: Any) -> tuple[str, str, str]:
    """(instruction, input, answer) from any supported shape."""
    if not isinstance(row, dict):
        raise InputError(f"expected an object, got {type(row).__name__}")
    if "messages" in row and "instruction" not in row:
        user, answer = _chat(row)
        return user, "", answer
    instruction = _text(row, "instruction")
    if "instances" in row:
        instances = row["instances"]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise InputError("expected a non-empty list of {input, output}", field="instances")
        return instruction, _text(instances[0], "input", required=False), _text(instances[0], "output", required=False)
    return instruction, _text(row, "input", required=False), _text(row, _answer_key(row), required=False)


def _answer_key(row: dict) -> str:
    return next((k for k in ("output", "response", "answer") if k in row), "output")


def _check_length(record, max_chars: int | None):
    """Refuse a seed with a text field over `data.max_seed_chars`: seeds go verbatim into prompts."""
    if max_chars is None:
        return record
    for name in ("instruction", "input", "output", "response"):
        value = getattr(record, name, None)
        if isinstance(value, str) and len(value) > max_chars:
            raise InputError(f"{len(value)} characters, over data.max_seed_chars={max_chars} "
                             f"(shorten the record or raise the key)", field=name)
    return record


def _read(source: str, convert, lenient: bool, limit: int | None, max_chars: int | None = None) -> ReadResult:
    name, rows = _iter_source(source)
    result = ReadResult([])
    for label, row in rows:
        if limit is not None and len(result.records) >= limit:
            break
        try:
            if isinstance(row, InputError):
                raise row
            record = _check_length(convert(label, row), max_chars)
        except InputError as err:
            located = err.at(file=name, record=label)
            if not lenient:
                raise located from None
            result.skipped.append(str(located))
            continue
        result.records.append(record)
    if not result.records:
        raise InputError("no usable records", file=name)
    return result


def read_seeds(source: str = BUILTIN, *, lenient: bool = False, limit: int | None = None,
               max_chars: int | None = None) -> ReadResult:
    """Seed tasks; the instruction must be non-empty."""
    source = str(builtin_path("seeds.jsonl")) if source == BUILTIN else source

    def convert(label: str, row: Any) -> SeedTask:
        instruction, inp, answer = _instruction_and_answer(row)
        if not instruction.strip():
            raise InputError("empty", field="instruction")
        rid = str(row.get("id", label.replace(" ", "-"))) if isinstance(row, dict) else label
        return SeedTask(id=rid, instruction=instruction.strip(), input=inp.strip(), output=answer)

    return _read(source, convert, lenient, limit, max_chars)


def read_pairs(source: str = BUILTIN, *, lenient: bool = False, limit: int | None = None) -> ReadResult:
    """Instruction/response pairs with trusted answers (reference and evaluation sets)."""
    source = str(builtin_path("reference.jsonl")) if source == BUILTIN else source

    def convert(label: str, row: Any) -> Pair:
        instruction, inp, answer = _instruction_and_answer(row)
        if not instruction.strip():
            raise InputError("empty", field="instruction")
        if not answer.strip():
            raise InputError("missing or empty answer", field=_answer_key(row))
        prompt = f"{instruction.strip()}\n\n{inp.strip()}" if inp.strip() else instruction.strip()
        rid = str(row.get("id", label.replace(" ", "-")))
        return Pair(id=rid, instruction=prompt, response=answer)

    return _read(source, convert, lenient, limit)


def read_tasks(source: str) -> ReadResult:
    """Tasks with trusted answers (`montessori init --tasks`): every record needs an instruction and
    an answer, and no instruction (with its input) may appear twice. Ids: the record's `id`, else
    task-N by position."""
    seen: dict[str, str] = {}  # normalized instruction -> the label of its first record

    def convert(label: str, row: Any) -> SeedTask:
        instruction, inp, answer = _instruction_and_answer(row)
        if not instruction.strip():
            raise InputError("empty", field="instruction")
        if not answer.strip():
            raise InputError("missing or empty answer", field=_answer_key(row))
        key = " ".join(f"{instruction} {inp}".lower().split())
        if key in seen:
            raise InputError(f"duplicate instruction (the same as {seen[key]})", field="instruction")
        seen[key] = label
        rid = str(row["id"]) if row.get("id") is not None else f"task-{len(seen):03d}"
        return SeedTask(id=rid, instruction=instruction.strip(), input=inp.strip(), output=answer.strip())

    result = _read(source, convert, lenient=False, limit=None)
    ids = [t.id for t in result.records]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"duplicate id '{dup}'", file=source)
    return result
