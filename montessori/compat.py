"""The few APIs that differ across the supported dependency range (pyproject.toml; tested at both ends:
the floor environment of `make test` and the newest releases).

Each function asks the installed library what it has instead of comparing version strings, so a
backport or a pre-release does not fool it.
"""

from __future__ import annotations

import dataclasses
from functools import cache


@cache
def _training_fields() -> frozenset[str]:
    from transformers import TrainingArguments
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def checkpointing_args(enabled: bool) -> dict:
    """The TrainingArguments keyword that switches activation (gradient) checkpointing. Newer
    transformers name it `activation_checkpointing` and keep `gradient_checkpointing` as a deprecated
    alias (to be removed in v6); older ones, 5.17 among them, know only `gradient_checkpointing`."""
    name = "activation_checkpointing" if "activation_checkpointing" in _training_fields() else "gradient_checkpointing"
    return {name: enabled}


def enable_checkpointing(model) -> None:
    """Turn on activation checkpointing of a transformers model: `activation_checkpointing_enable`
    where it exists (`gradient_checkpointing_enable` is then its deprecated alias, which warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
