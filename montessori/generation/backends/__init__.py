"""Generation backends behind one interface (`Backend.generate(requests, sampling)`).

transformers (default; CPU and GPU), vLLM (in process; chosen by `backend: auto` when installed and a
GPU is present), llama.cpp (in process, a GGUF teacher on the CPU; chosen by `backend: auto` for a GGUF
teacher when llama-cpp-python is installed and no GPU is used) and any OpenAI-compatible HTTP server
(`backend: http` or a `base_url`).
"""

from __future__ import annotations

import os

from montessori.context import WORKER_GPUS
from montessori.errors import InputError
from montessori.generation.backends.base import Backend, Completion, Request, Sampling

__all__ = ["Backend", "Completion", "Engine", "MappedBackend", "Request", "Sampling", "choose_backend",
           "engine_settings", "make_backend"]


def choose_backend(gen_cfg, spec: str | None = None, models_cfg=None) -> str:
    """The backend that serves teacher `spec`. llamacpp runs GGUF models only: a teacher in HF form (the
    DPO-updated one of stage `dataset`) runs on transformers under `auto` and `llamacpp` alike."""
    from montessori.generation.backends import llamacpp
    gguf = spec is not None and llamacpp.is_gguf_spec(spec)
    if gen_cfg.backend == "llamacpp" and spec is not None and not gguf:
        return "transformers"
    if gen_cfg.backend != "auto":
        return gen_cfg.backend
    if gen_cfg.base_url:
        return "http"
    from montessori.generation.backends import vllm
    if vllm.available():
        return "vllm"
    # A GPU keeps its backends (vLLM, the transformers fast engine); on the CPU the quantized GGUF through
    # llama.cpp wrote 1.8-7x the tokens/s of the fp32 copy transformers makes of it (docs/benchmarks.md).
    if gguf and llamacpp.available() and not _uses_cuda(models_cfg):
        return "llamacpp"
    return "transformers"


def _uses_cuda(models_cfg) -> bool:
    device = getattr(models_cfg, "device", "auto")
    if device != "auto":
        return device == "cuda"
    import torch
    return torch.cuda.is_available()


def make_backend(spec: str, gen_cfg, models_cfg) -> Backend:
    """The backend of `generation.backend` serving model `spec`."""
    name = choose_backend(gen_cfg, spec, models_cfg)
    if name == "llamacpp":
        from montessori.generation.backends import llamacpp
        if not llamacpp.available():
            raise InputError("generation.backend is 'llamacpp' but llama-cpp-python is not installed "
                             "(pip install 'montessori[cpu]'; it builds llama.cpp from source, minutes)")
        return llamacpp.LlamaCppBackend.load(spec, threads=gen_cfg.threads, parallel=gen_cfg.batch_size)
    if name == "http":
        if not gen_cfg.base_url:
            raise InputError("generation.backend is 'http' but generation.base_url is not set "
                             "(e.g. http://127.0.0.1:8000/v1)")
        from montessori.generation.backends.http import HTTPBackend
        return HTTPBackend(gen_cfg.base_url, spec, api_key_env=gen_cfg.api_key_env,
                           concurrency=gen_cfg.http_concurrency, timeout=gen_cfg.http_timeout,
                           max_retries=gen_cfg.http_max_retries)
    if name == "vllm":
        from montessori.generation.backends import vllm
        if not vllm.available():
            raise InputError("generation.backend is 'vllm' but vLLM is not installed or no CUDA device is "
                             "present (pip install 'montessori[vllm]', or use backend: transformers)")
        return vllm.VLLMBackend(spec, dtype=models_cfg.dtype)
    from montessori.generation.backends.hf import TransformersBackend
    return TransformersBackend.load(spec, device=models_cfg.device, dtype=models_cfg.dtype, engine=gen_cfg.engine,
                                    compile=gen_cfg.compile, slots=gen_cfg.batch_size)


def continuous(name: str) -> bool:
    """Does backend `name` refill ended rows within a call (its text not depending on the batching)?"""
    if name == "llamacpp":
        from montessori.generation.backends.llamacpp import LlamaCppBackend
        return LlamaCppBackend.continuous
    return False


# The generation.* and models.* keys make_backend builds a backend from: all an engine is given
# (a stage reads no more of its config than it declares: tests/test_stage_keys.py).
ENGINE_KEYS = ("backend", "engine", "compile", "base_url", "batch_size", "threads", "api_key_env",
               "http_concurrency", "http_timeout", "http_max_retries")


def engine_settings(gen_cfg, models_cfg) -> tuple[dict, dict]:
    """(generation settings, models settings) of the backend, picklable for an engine elsewhere."""
    return ({k: getattr(gen_cfg, k) for k in ENGINE_KEYS},
            {"device": models_cfg.device, "dtype": models_cfg.dtype})


class Engine:
    """A generation worker of `ctx.workers`: the backend `generation.backend` names for `spec`, built
    once where the executor runs it (this process, or a Ray actor per GPU). `generate` samples a
    task's prompts of one call: items (index in the call, request, sampling). `generation`, `models`:
    engine_settings()."""

    def __init__(self, spec: str, generation: dict, models: dict):
        from montessori.config import GenerationConfig, ModelsConfig
        gen_cfg, models_cfg = GenerationConfig(**generation), ModelsConfig(**models)
        gpus = int(os.environ.get(WORKER_GPUS, "0"))
        if gpus > 1:  # the executor gave this worker several GPUs: one vLLM engine over all of them
            if choose_backend(gen_cfg, spec, models_cfg) != "vllm":
                raise ValueError("distributed.gpus_per_worker > 1 needs generation.backend=vllm (tensor parallel)")
            from montessori.generation.backends.vllm import VLLMBackend
            self.backend = VLLMBackend(spec, dtype=models_cfg.dtype, tensor_parallel_size=gpus,
                                       distributed_executor_backend="mp")
        else:
            self.backend = make_backend(spec, gen_cfg, models_cfg)

    def generate(self, items: list[tuple[int, Request, Sampling]]) -> list[tuple[int, list[Completion]]]:
        completions = self.backend.generate([r for _, r, _ in items], items[0][2])
        return [(i, c) for (i, _, _), c in zip(items, completions)]

    def close(self) -> None:
        self.backend.close()


class MappedBackend(Backend):
    """The generation stages' backend: each call's requests go to the engines of a `ctx.workers` block
    (context.Workers), which runs them in this process or spreads them over workers in tasks of several
    prompts (batch=True), and come back in request order."""

    def __init__(self, engines, name: str):
        self.engines, self.name, self.continuous = engines, name, continuous(name)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        out: dict[int, list[Completion]] = {}
        self.engines.map([(i, r, sampling) for i, r in enumerate(requests)], lambda r: out.__setitem__(*r),
                         key=lambda r: r[0], desc="generation", batch=True)
        return [out[i] for i in range(len(requests))]

    def close(self) -> None:
        pass  # the ctx.workers block closes the engines
