"""What `montessori eval` accepts as a student: a model spec, an HF directory, or a run directory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from montessori.errors import InputError
from montessori.store import RunStore
from montessori.training.sft import run_sft


@dataclass
class Student:
    name: str  # shown in tables and plots
    spec: str  # what load_model gets
    run_dir: Path | None = None  # set when the student came from a run directory


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("round-*")) or (path / "config.resolved.yaml").exists()) \
        and not (path / "config.json").exists()


def latest_student(run_dir: Path) -> Path:
    """The run's final student: the latest round's sft/model (a run is evaluated by what it produced)."""
    for round_ in reversed(RunStore(run_dir).rounds()):
        model = RunStore(run_dir).stage(round_, run_sft).path / "model"
        if (model / "config.json").exists():
            return model
    raise InputError(f"{run_dir}: run directory has no trained student yet (no round-*/sft/model); "
                     "run `montessori run` until the sft stage first")


def resolve_student(spec: str) -> Student:
    path = Path(spec).expanduser()
    if is_run_dir(path):
        return Student(name=path.resolve().name, spec=str(latest_student(path)), run_dir=path)
    name = path.name if path.is_dir() else spec
    return Student(name=name, spec=spec)


def unique_names(students: list[Student]) -> list[Student]:
    """Two students called `model` (sft/model of two runs) get their parent folders in the name."""
    seen: dict[str, int] = {}
    for s in students:
        seen[s.name] = seen.get(s.name, 0) + 1
    for i, s in enumerate(students):
        if seen[s.name] > 1:
            s.name = f"{s.name}#{i + 1}"
    return students


def model_fingerprint(spec: str) -> str:
    """Identity of a model's weights, cheap for 16 GB checkpoints: config.json text plus each weight
    file's name, size and mtime. A model re-trained into the same folder gets a new fingerprint."""
    from montessori.models.load import resolve_model_dir
    source = resolve_model_dir(spec)
    h = hashlib.sha256()
    path = Path(source)
    if not path.is_dir():  # a Hub id: its name is all we know
        h.update(str(source).encode())
        return h.hexdigest()[:16]
    h.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = weights.stat()
        h.update(json.dumps([weights.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:16]
