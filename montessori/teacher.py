"""Which teacher `montessori init --tasks` writes into a first run: the strongest it can reach.

1. An OpenAI-compatible endpoint the user names (`--teacher-url`, `--teacher-model`): a local Ollama,
   llama.cpp server, vLLM or `montessori serve`, or an API. The key is read, at run time, from the
   environment variable `generation.api_key_env` names.
2. Else, on a machine without CUDA, the local GGUF teacher Qwen2.5-Coder-1.5B-Instruct when its packages
   (`montessori[qwen]`) or its file ($MONTESSORI_GGUF_DIR) are there: through llama.cpp when
   llama-cpp-python (`montessori[cpu]`) is installed, else through transformers, with a warning that
   fp32 on a CPU is several times slower.
3. Else the embedded SmolLM2-135M, with a warning: it shows the pipeline and does not write useful data
   (issue 27: its shop-floor candidates were 2% positive and the student ended worse).

A preset named with `--preset`, or the GPU preset on a CUDA machine, keeps its own teacher (an endpoint
given still replaces it). Nothing here loads, assembles or converts a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from montessori.errors import InputError

LOCAL_TEACHER = "qwen2.5-coder-1.5b"


@dataclass(frozen=True)
class TeacherChoice:
    changes: dict = field(default_factory=dict)  # merged into the preset's config
    line: str = ""  # which teacher and why, one line
    warning: str | None = None  # one line, when the run will not teach much or will be slow


def local_teacher_installed() -> bool:
    """Are Qwen2.5-Coder-1.5B's packages or its GGUF file here (nothing assembled or read)?"""
    from montessori.models.load import NAMED_MODELS, named_gguf_path
    named = NAMED_MODELS[LOCAL_TEACHER]
    return named_gguf_path(named) is not None or named.chunks() is not None


def llama_cpp_installed() -> bool:
    from montessori.generation.backends import llamacpp
    return llamacpp.available()


def choose_teacher(*, preset: str, preset_teacher: str, api_key_env: str, url: str | None = None,
                   model: str | None = None, machine_pick: bool = True, cuda: bool = False,
                   local: bool | None = None, llama_cpp: bool | None = None) -> TeacherChoice:
    """The teacher of a run made from the user's tasks. `machine_pick`: the preset was chosen for this
    machine (no --preset); `local` / `llama_cpp`: whether the local teacher / llama-cpp-python are
    installed (None = look)."""
    if (url is None) != (model is None):
        raise InputError("--teacher-url and --teacher-model go together: the endpoint's /v1 address and the "
                         "name of the model it serves")
    if url is not None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--teacher-url {url}: expected an http:// or https:// address ending in /v1")
        key = "set" if os.environ.get(api_key_env) else "not set (fine for a local server)"
        return TeacherChoice(
            {"models": {"teacher": model}, "generation": {"backend": "http", "base_url": url}},
            f"teacher: {model} at {url}, the endpoint you gave (API key from ${api_key_env}: {key}; stage dpo "
            f"trains the teacher, so '{model}' must also load here as a model spec)")
    if not machine_pick or cuda:
        why = "--preset" if not machine_pick else "CUDA device"
        return TeacherChoice({}, f"teacher: {preset_teacher}, preset {preset}'s ({why})")
    local = local_teacher_installed() if local is None else local
    if local:
        llama_cpp = llama_cpp_installed() if llama_cpp is None else llama_cpp
        changes = {"models": {"teacher": LOCAL_TEACHER}, "generation": {"backend": "auto"}}
        if llama_cpp:
            return TeacherChoice(changes, f"teacher: {LOCAL_TEACHER} through llama.cpp, the strongest local "
                                          "teacher installed (quantized, on the CPU)")
        return TeacherChoice(changes, f"teacher: {LOCAL_TEACHER} through transformers, the strongest local "
                                      "teacher installed",
                             "llama-cpp-python is not installed, so the teacher runs dequantized to fp32: "
                             "several times slower on a CPU (hours for this run); "
                             "pip install 'montessori[cpu]' (builds llama.cpp, minutes)")
    return TeacherChoice({"models": {"teacher": "smollm2"}},
                         "teacher: smollm2, the embedded SmolLM2-135M (no stronger teacher installed)",
                         "the embedded 135M teacher demonstrates the pipeline and does not write useful data: "
                         "pip install 'montessori[qwen,cpu]' for Qwen2.5-Coder-1.5B, or give "
                         "--teacher-url URL --teacher-model NAME")
