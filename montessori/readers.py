"""Read seed tasks and instruction/response sets from the shapes people actually have.

Formats: JSONL, JSON (a list, or an object with a list under "data"/"train"/"rows"), CSV (a header
row naming the columns, e.g. `instruction,answer`), Parquet, a local HF dataset directory
(`datasets.save_to_disk`, or a folder of data files), or a Hub dataset named `hf:OWNER/NAME` (its train
split, through `datasets.load_dataset`: network or the HF cache). Any other name that is not a local
file or folder is an input error, never a network call (a typo such as `myseeds` used to wait for the Hub).

Text is UTF-8 (a CSV may start with a byte-order mark); a bad byte is reported with its file, line and
field. JSON nesting is bounded (MAX_JSON_DEPTH) and a CSV cell is not (the record limits are the
project's: data.max_seed_chars for seeds, token limits for reference and evaluation records).

Shapes (detected per record):
  Alpaca        instruction + input + output
  Self-Instruct instruction + instances[{input, output}]   (the first instance is used)
  Reference     instruction + response (or answer)
  Chat          messages [{role: user, ...}, {role: assistant, ...}]

A bad record raises InputError naming file, record and field; with lenient=True it is skipped and
counted in `ReadResult.skipped`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from montessori.errors import InputError
from montessori.records import Pair, SeedTask

BUILTIN = "builtin"
HUB_PREFIX = "hf:"  # `hf:OWNER/NAME`: a Hub dataset, asked for explicitly
# Deeper than any record shape here (chat: 3 levels), far below Python's recursion limit, which a line
# of 100000 `[` used to hit (a RecursionError traceback).
MAX_JSON_DEPTH = 100
# No CSV cell limit of its own: Python's default (131072 characters) refused records that the project's
# limits accept. The largest a C long holds on every platform.
CSV_FIELD_LIMIT = 2 ** 31 - 1
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


@dataclass
class ReadResult:
    records: list
    skipped: list[str] = field(default_factory=list)  # one message per skipped record


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("montessori.resources").joinpath(name)))


# Bytes that are not UTF-8 are decoded to lone surrogates (U+DC80-U+DCFF, "surrogateescape"), so a
# record parses as usual and the bad byte is then found in its field: the error names file, line, field.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _bad_utf8(value: Any, where: str = "") -> InputError | None:
    """The first string (or key) in a parsed record holding an undecodable byte, as an InputError."""
    if isinstance(value, str):
        found = _BAD_BYTE.search(value)
        if found:
            byte = ord(found.group()) - 0xDC00
            return InputError(f"not UTF-8 text (byte {byte:#04x} at character {found.start() + 1})",
                              field=where or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            bad = _bad_utf8(key, where) or _bad_utf8(item, f"{where}.{key}" if where else str(key))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad = _bad_utf8(item, f"{where}[{i}]")
            if bad:
                return bad
    return None


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):  # brackets inside strings do not nest
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _loads(text: str) -> Any:
    """json.loads with the nesting bounded (InputError), checked only where it could be deep."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise InputError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except RecursionError:  # the count above is only an estimate inside strings; Python's own limit
        raise InputError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg}{f' at line {err.lineno}' if err.lineno > 1 else ''})") from None


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (record label, row) pairs; the label is what errors print ("line 7", "row 3"). A row that
    cannot be read is yielded as its InputError (skipped with `lenient`); a file that cannot be read at
    all raises."""
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _iter_hf_dir(path)
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = _loads(_decode(raw))
                except InputError as err:
                    row = err
                yield f"line {lineno}", _bad_utf8(row) or row
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            data = _loads(_decode(raw))
        except InputError as err:
            raise err.at(file=path) from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "train", "rows", "examples") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            bad = _bad_utf8(_decode(raw))
            raise (bad.at(file=path) if bad else
                   InputError("expected a JSON list of records (or an object with a 'data' list)", file=path))
        for i, row in enumerate(data):
            bad = _bad_utf8(row)
            if bad:  # and its line: a .json file is read in an editor by lines (the file's first bad byte)
                bad = InputError(f"{bad.message} on line {_first_bad_line(raw)}", field=bad.field)
            yield f"item {i}", bad or row
    elif suffix == ".csv":
        yield from _iter_csv(path)
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


def _first_bad_line(raw: bytes) -> int | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return raw[:err.start].count(b"\n") + 1
    return None


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    bad_lines: list[int] = []  # physical lines holding a byte that is not UTF-8

    def lines(f: Iterable[bytes]) -> Iterator[str]:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Excel's "CSV UTF-8")
                raw = raw[3:]
            text = _decode(raw)
            if _BAD_BYTE.search(text):
                bad_lines.append(lineno)
            yield text

    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, "rb") as f:
            reader = csv.reader(lines(f))
            try:
                header = next(reader, None)
                if header is None:
                    return
                bad = _bad_utf8(header)
                if bad:
                    raise InputError(f"{bad.message} in the header row", file=path, record="line 1")
                first = reader.line_num + 1  # the line a row starts on (a quoted cell may span lines)
                for cells in reader:
                    # Cells beyond the header are dropped; missing ones are None (as csv.DictReader does).
                    row = {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}
                    if not any(cells):
                        first = reader.line_num + 1
                        continue
                    bad = _bad_utf8(row)
                    if bad:
                        line = next((n for n in bad_lines if first <= n <= reader.line_num), first)
                        yield f"line {line}", bad
                    else:
                        yield f"line {first}", row
                    first = reader.line_num + 1
            except csv.Error as err:
                raise InputError(f"not valid CSV ({err})", file=path, record=f"line {reader.line_num}") from None
    finally:
        csv.field_size_limit(previous)


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
    if source.startswith(HUB_PREFIX):
        return source, _iter_hub(source.removeprefix(HUB_PREFIX))
    path = Path(source).expanduser()
    if path.exists():
        return str(path), _iter_rows(path)
    hint = "" if path.suffix else f" (a Hugging Face Hub dataset is named {HUB_PREFIX}OWNER/NAME)"
    raise InputError(f"no such file or directory{hint}", file=source)


def _iter_hub(name: str) -> Iterator[tuple[str, Any]]:
    import datasets
    hub_log = logging.getLogger("huggingface_hub")  # its retries print two lines each; the error says it
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
        reason = (str(err).strip().splitlines() or [""])[0]
        raise InputError(f"Hub dataset '{name}' could not be loaded ({type(err).__name__}: {reason})",
                         file=HUB_PREFIX + name) from None
    finally:
        hub_log.setLevel(level)
    for i, row in enumerate(rows):
        yield f"row {i}", row


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
    with contextlib.closing(rows):  # a reader's cleanup (the CSV limit) runs when a record is refused, too
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
