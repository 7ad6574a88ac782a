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


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory) -> Path:
    """A finished one-round `tiny` run whose seed and reference files are its own copies (so a test can
    edit them in place); RUN/config.yaml names them. Read it, or copy it before changing it."""
    import shutil
    from montessori.config import load_preset
    from montessori.pipeline import run_pipeline
    from montessori.readers import builtin_path
    run = tmp_path_factory.mktemp("finished") / "run"
    run.mkdir()
    for name in ("seeds.jsonl", "reference.jsonl"):
        shutil.copy(builtin_path(name), run / name)
    overrides = [f"data.seeds={run / 'seeds.jsonl'}", f"data.reference={run / 'reference.jsonl'}"]
    config = load_preset("tiny", overrides)
    (run / "config.yaml").write_text(config.to_yaml())
    run_pipeline(config, run, progress=False)
    return run


@pytest.fixture(scope="module")
def tiny_backend(tiny_spec):
    """The tiny model behind the transformers backend, on the CPU (the server and HTTP client tests)."""
    from montessori.generation.backends.hf import TransformersBackend
    return TransformersBackend.load(tiny_spec, device="cpu", dtype="float32")


@pytest.fixture()
def serve(tiny_backend):
    """Start `montessori serve`'s app on 127.0.0.1 (a free port) in a thread: serve(**make_server options)."""
    import threading
    from montessori.generation.serve import make_server
    servers = []

    def start(**kwargs):
        server = make_server(tiny_backend, "tiny", **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
