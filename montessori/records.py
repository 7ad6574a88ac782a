"""Typed records that flow between stages. Stored one per line as JSON (see `montessori.store`).

`from_dict` validates: a missing field or a wrong type raises InputError naming the field, so the
reader can add file and line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from montessori.errors import InputError

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}

R = TypeVar("R", bound="Record")


@dataclass
class Record:
    kind: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        if not isinstance(data, dict):
            raise InputError(f"expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if not _type_ok(value, hints[f.name]):
                    raise InputError(f"expected {_type_name(hints[f.name])}, got {type(value).__name__}",
                                     field=f.name)
                kwargs[f.name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError("missing", field=f.name)
        return cls(**kwargs)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


@dataclass
class SeedTask(Record):
    """One seed instruction: instruction and optional input (joined by a space when shown)."""
    kind: ClassVar[str] = "seed"
    id: str
    instruction: str
    input: str = ""
    output: str = ""

    @property
    def text(self) -> str:
        return f"{self.instruction} {self.input}".strip()


@dataclass
class GenerationPrompt(Record):
    """What the teacher was asked: exact chat messages plus the text prefilled into its turn."""
    kind: ClassVar[str] = "prompt"
    id: str
    messages: list[Message]
    example_ids: list[str]
    style: str = "tagged"
    prefill: str = ""  # text placed at the start of the assistant turn (part of the prompt)
    round: int = 1


@dataclass
class Candidate(Record):
    """One sampled teacher completion and the instruction parsed from it (None when dropped)."""
    kind: ClassVar[str] = "candidate"
    id: str
    prompt_id: str
    completion: str  # raw text generated after the prompt (+prefill): what DPO trains on
    instruction: str | None
    round: int = 1
    example_ids: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    prefill: str = ""
    dropped: str | None = None  # reason: no_tag, too_short, too_long, banned_word, ..., duplicate


@dataclass
class Pair(Record):
    """An instruction/response pair (training example)."""
    kind: ClassVar[str] = "pair"
    id: str
    instruction: str
    response: str
    candidate_id: str | None = None
    prompt_id: str | None = None


@dataclass
class InfluenceResult(Record):
    kind: ClassVar[str] = "influence"
    id: str
    influence: float | None
    ref_loss_before: float | None
    ref_loss_after: float | None
    status: str = "ok"  # ok, or why the value is invalid (non_finite_loss, empty_response, ...)
    estimator: str = "exact"
    seconds: float | None = None


@dataclass
class PreferencePair(Record):
    kind: ClassVar[str] = "preference"
    id: str
    prompt_id: str
    prompt: list[Message]
    prefill: str
    chosen: str
    rejected: str
    chosen_id: str
    rejected_id: str
    chosen_influence: float
    rejected_influence: float
