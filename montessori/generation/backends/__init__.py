"""Generation backends behind one interface (`Backend.generate(requests, sampling)`).

transformers (default; CPU and GPU), vLLM (in process; chosen by `backend: auto` when installed and a
GPU is present) and any OpenAI-compatible HTTP server (`backend: http` or a `base_url`).
"""

from __future__ import annotations

from montessori.errors import InputError
from montessori.generation.backends.base import Backend, Completion, Request, Sampling

__all__ = ["Backend", "Completion", "Request", "Sampling", "choose_backend", "make_backend"]


def choose_backend(gen_cfg) -> str:
    if gen_cfg.backend != "auto":
        return gen_cfg.backend
    if gen_cfg.base_url:
        return "http"
    from montessori.generation.backends import vllm
    return "vllm" if vllm.available() else "transformers"


def make_backend(spec: str, gen_cfg, models_cfg) -> Backend:
    """The backend of `generation.backend` serving model `spec`."""
    name = choose_backend(gen_cfg)
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
