"""Shared fixtures: tiny random Llama models with the real SmolLM2 tokenizer, built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_spec() -> str:
    """Model spec of a tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer."""
    from montessori.models.load import resolve_model_dir
    resolve_model_dir("tiny-random:0")
    return "tiny-random:0"


@pytest.fixture(scope="session")
def tiny_dir(tiny_spec) -> Path:
    from montessori.models.load import resolve_model_dir
    return Path(resolve_model_dir(tiny_spec))


@pytest.fixture()
def tiny_model(tiny_spec):
    """A fresh (model, tokenizer) pair in fp32 on CPU; each test may modify it."""
    from montessori.models import load_model
    return load_model(tiny_spec, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(tiny_spec):
    from montessori.models import load_tokenizer
    return load_tokenizer(tiny_spec)


@pytest.fixture()
def tiny_config():
    from montessori.config import load_preset
    return load_preset("tiny")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"../shared/data/{name} is not present (public data beside the checkout)")
    return path
