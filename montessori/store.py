"""The run store: a run directory with one folder per round and stage, each with a manifest.

Layout (a public contract; docs/run-directory.md documents it):

    RUN/config.resolved.yaml        the resolved config of the latest `montessori run`
    RUN/montessori.log              the run's log
    RUN/.lock                       held (flock) by the one `montessori run` writing here; holds its PID
    RUN/round-R/STAGE/manifest.json written last: config hash, input hashes, counts, timings, version
    RUN/round-R/STAGE/*.jsonl       the stage's records
    RUN/round-R/.STAGE.new/         a re-run of a finished stage, swapped in for STAGE once complete

Files are written atomically (temp file + rename) or append-only, flushed per record and resumed by
record id, so an interrupted stage loses at most the record in flight.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from montessori import __version__
from montessori.errors import InputError
from montessori.records import Record, R

MANIFEST = "manifest.json"


def located(err: OSError, path: Path) -> OSError:
    """The same OS error, naming the file: a write to a full disk fails without a file name."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise located(err, path) from None


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, records: Iterable[Record | dict]) -> int:
    lines = [json.dumps(r.to_dict() if isinstance(r, Record) else r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _lines(path: Path) -> list[bytes]:
    """The file's lines as bytes: a torn tail may end inside a multi-byte character, so nothing is
    decoded before the tail is known."""
    return path.read_bytes().splitlines()


def read_jsonl(path: Path, cls: type[R] | None = None) -> list:
    """Read records; a torn last line (a crash mid-write) is ignored, any other bad line is an error."""
    out = []
    if not path.exists():
        return out
    lines = _lines(path)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if lineno == len(lines):  # torn tail from an interrupted append
                break
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise InputError(f"not valid JSON ({reason})", file=path, record=f"line {lineno}") from None
        if cls is None:
            out.append(data)
            continue
        try:
            out.append(cls.from_dict(data))
        except InputError as err:
            raise err.at(file=path, record=f"line {lineno}") from None
    return out


class JsonlAppender:
    """Append-only record file, flushed per record, resumable by id."""

    def __init__(self, path: Path, cls: type[R] | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = read_jsonl(path, cls)
        self.records = existing
        self.ids = {r.id if isinstance(r, Record) else r["id"] for r in existing}
        # Rewrite without a torn tail so appends start on a clean line.
        if path.exists() and len(existing) != _count_lines(path):
            write_jsonl(path, existing)
        self._f = open(path, "a", encoding="utf-8")

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.ids

    def append(self, record: Record | dict) -> None:
        data = record.to_dict() if isinstance(record, Record) else record
        try:
            self._f.write(json.dumps(data, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as err:
            raise located(err, self.path) from None
        self.records.append(record)
        self.ids.add(data["id"])

    def close(self) -> None:
        try:
            self._f.close()  # flushes what a failed write left in the buffer: may fail the same way
        except OSError as err:
            raise located(err, self.path) from None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def select(self, ids: Iterable[str]) -> list:
        """The records of these ids, in file order."""
        wanted = set(ids)
        return [r for r in self.records if (r.id if isinstance(r, Record) else r["id"]) in wanted]


@contextlib.contextmanager
def resume(path: Path, cls: type[R] | None, items: Iterable, key=lambda item: item.id
           ) -> Iterator[tuple[JsonlAppender, list]]:
    """A stage's output file, resumed by id: yields (out, todo), the appender on `path` and the items
    whose `key(item)` is not in it yet, in order. Append each result to `out` as it is ready; after
    the work, `out.select(...)` gives the records of the ids the stage was asked for.

        with resume(ctx.dir.file("influence.jsonl"), InfluenceResult, candidates) as (out, todo):
            ctx.map(factory, "score", todo, out.append)
            results = out.select(c.id for c in candidates)"""
    with JsonlAppender(path, cls) as out:
        yield out, [item for item in items if key(item) not in out]


def _count_lines(path: Path) -> int:
    return sum(1 for line in _lines(path) if line.strip())


def count_records(path: Path) -> int:
    """Non-empty lines of a JSONL file, torn tail included (for `status`, which must not fail)."""
    return _count_lines(path) if path.is_file() else 0


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                h.update(str(p.relative_to(path)).encode())
                h.update(file_hash(p).encode())
        return h.hexdigest()[:16]
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class StageDir:
    """One stage of one round: its folder, manifest and records."""

    root: Path
    round: int
    stage: str
    folder: str | None = None  # None = the stage's own folder; else a sibling the stage writes instead

    @property
    def path(self) -> Path:
        return self.root / f"round-{self.round}" / (self.folder or self.stage)

    def pending(self) -> StageDir:
        """Where a re-run of a finished stage writes, so the last good result stays until it is replaced."""
        return StageDir(self.root, self.round, self.stage, f".{self.stage}.new")

    def replace_with(self, new: StageDir) -> None:
        """Swap a completed re-run in for this stage's folder (two renames, then the old copy goes)."""
        old = self.path.with_name(f".{self.stage}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(new.path, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def recover(self) -> None:
        """Finish a swap a crash interrupted between its two renames."""
        old = self.path.with_name(f".{self.stage}.old")
        if old.exists() and not self.path.exists():
            new = self.pending()
            os.replace(new.path if new.is_done() else old, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError("damaged manifest (not valid JSON): delete the stage's folder to re-run it",
                             file=self.manifest_path) from None

    def is_done(self, fingerprint: str | None = None) -> bool:
        m = self.manifest()
        return m is not None and (fingerprint is None or m.get("fingerprint") == fingerprint)

    def has_output(self) -> bool:
        return self.path.exists() and any(p.name != MANIFEST for p in self.path.iterdir())

    def write_manifest(self, *, fingerprint: str, config_hash: str, inputs: dict[str, str],
                       counts: dict[str, Any], started: float, extra: dict | None = None) -> dict:
        manifest = {
            "stage": self.stage,
            "round": self.round,
            "fingerprint": fingerprint,
            "config_hash": config_hash,
            "inputs": inputs,
            "counts": counts,
            "started": started,
            "finished": time.time(),
            "seconds": round(time.time() - started, 3),
            "version": __version__,
            **(extra or {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def invalidate(self) -> None:
        if self.manifest_path.exists():
            self.manifest_path.unlink()


class RunLock:
    """One writer per run directory: an exclusive flock on RUN/.lock, released when the holder exits
    or dies (the OS drops it), with the holder's PID written in the file for the message."""

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self._f = None

    def __enter__(self) -> RunLock:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise InputError(f"in use by another montessori run (pid {holder}); wait for it to finish "
                             f"or stop it, then run again", file=self.path.parent) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()  # closing the descriptor releases the lock
            self._f = None


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage(self, round: int, stage) -> StageDir:
        """A stage's folder in a round, by the stage's name or by its function: views name the function
        that writes what they read (`store.stage(1, run_influence)`), so it is one jump away."""
        return StageDir(self.root, round, stage if isinstance(stage, str) else stage.stage.name)

    def rounds(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[6:]) for p in self.root.glob("round-*") if p.is_dir() and p.name[6:].isdigit())

    def is_run(self) -> bool:
        """Whether the folder looks like a run directory (a resolved config or a round folder)."""
        return (self.root / "config.resolved.yaml").is_file() or bool(self.rounds())

    def iter_stages(self, stages: Iterable[str]) -> Iterator[StageDir]:
        for r in self.rounds():
            for s in stages:
                yield self.stage(r, s)
