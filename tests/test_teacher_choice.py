"""`montessori init --tasks` writes the strongest teacher it can reach and says which and why in one line:
an endpoint given, else the local Qwen GGUF teacher when installed (llama.cpp or, slower, transformers),
else the embedded model with a warning that it only demonstrates the pipeline."""

from __future__ import annotations

import pytest
import torch

from montessori import teacher
from montessori.cli import main
from montessori.config import load_config
from montessori.errors import InputError
from montessori.teacher import choose_teacher
from shopfloor import write_csv

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")


def init(tmp_path, *flags):
    return main(["init", str(tmp_path / "run"), "--tasks", str(write_csv(tmp_path / "t.csv")), *flags])


def test_an_endpoint_given_is_the_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert init(tmp_path, "--teacher-url", "http://127.0.0.1:11434/v1", "--teacher-model", "qwen2.5:7b") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("teacher:"))
    assert "qwen2.5:7b at http://127.0.0.1:11434/v1" in line and "$OPENAI_API_KEY: not set" in line
    assert "warning" not in out
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.models.teacher, cfg.generation.backend, cfg.generation.base_url) == \
        ("qwen2.5:7b", "http", "http://127.0.0.1:11434/v1")
    assert cfg.models.student == "smollm2"


def test_an_endpoint_needs_both_flags_and_an_http_address(tmp_path, capsys):
    assert init(tmp_path, "--teacher-url", "http://127.0.0.1:8000/v1") == 2
    assert "--teacher-url and --teacher-model go together" in capsys.readouterr().err
    assert init(tmp_path, "--teacher-url", "127.0.0.1:8000", "--teacher-model", "m") == 2
    assert "expected an http:// or https:// address" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("llama_cpp", [True, False])
def test_the_installed_local_teacher_is_chosen(tmp_path, capsys, monkeypatch, llama_cpp):
    # "Installed": its GGUF file in $MONTESSORI_GGUF_DIR. init only looks for it; nothing loads it.
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "qwen2.5-coder-1.5b-instruct.gguf").write_bytes(b"")
    monkeypatch.setenv("MONTESSORI_GGUF_DIR", str(tmp_path / "gguf"))
    monkeypatch.setattr(teacher, "llama_cpp_installed", lambda: llama_cpp)
    assert init(tmp_path) == 0
    out = capsys.readouterr().out
    assert "preset own-tasks (no CUDA device)" in out
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.models.teacher, cfg.generation.backend, cfg.models.student) == ("qwen2.5-coder-1.5b", "auto", "smollm2")
    if llama_cpp:
        assert "teacher: qwen2.5-coder-1.5b through llama.cpp" in out and "warning" not in out
    else:
        assert "teacher: qwen2.5-coder-1.5b through transformers" in out
        assert "warning: llama-cpp-python is not installed" in out and "montessori[cpu]" in out


def test_without_a_stronger_teacher_the_embedded_one_comes_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(teacher, "local_teacher_installed", lambda: False)
    assert init(tmp_path) == 0
    out = capsys.readouterr().out
    assert "teacher: smollm2, the embedded SmolLM2-135M" in out
    warning = [x for x in out.splitlines() if x.startswith("warning:")]
    assert len(warning) == 1 and "demonstrates the pipeline and does not write useful data" in warning[0]
    assert load_config(tmp_path / "run" / "config.yaml").models.teacher == "smollm2"


def test_a_preset_named_keeps_its_teacher(tmp_path, capsys):
    assert init(tmp_path, "--preset", "tiny") == 0
    assert "teacher: tiny-random:0, preset tiny's (--preset)" in capsys.readouterr().out
    assert load_config(tmp_path / "run" / "config.yaml").models.teacher == "tiny-random:0"


def test_the_decision_reads_what_is_installed():
    kw = dict(preset="own-tasks", preset_teacher="qwen2.5-coder-1.5b", api_key_env="KEY")
    assert choose_teacher(**kw, local=True, llama_cpp=True).warning is None
    assert "fp32" in choose_teacher(**kw, local=True, llama_cpp=False).warning
    assert choose_teacher(**kw, local=False).changes == {"models": {"teacher": "smollm2"}}
    assert choose_teacher(**kw, cuda=True).changes == {}
    with pytest.raises(InputError, match="go together"):
        choose_teacher(**kw, model="m")


def test_teacher_flags_without_tasks_are_refused(tmp_path, capsys):
    assert main(["init", str(tmp_path / "run"), "--teacher-url", "http://x/v1", "--teacher-model", "m"]) == 2
    assert "use them with --tasks FILE" in capsys.readouterr().err
