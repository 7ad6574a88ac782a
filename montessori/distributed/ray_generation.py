"""Generation over many GPUs: a Backend whose engines are Ray actors, one per GPU (transformers or
vLLM) or per tensor-parallel group of `gpus_per_worker` GPUs (vLLM).

RayBackend implements the same `generate(requests, sampling)` as every backend, so the generation
stages use it unchanged. Each call is cut into chunks of `distributed.generation_chunk` prompts,
handed to whichever engine is free (scheduler.dispatch) and reassembled in request order; a chunk
whose engine died is generated again elsewhere. The chunks are fixed by the request order, and a
chunk is sampled exactly as a single-process backend samples a batch of those prompts (the
transformers backend seeds a batch from its first request, vLLM seeds each request), so the
output does not depend on how many engines there are or which one ran a chunk. With chunks at
least as large as a call, it equals the single-process run (vLLM: with any chunk size).

A call must hold several chunks to keep every engine busy: raise generation.batch_size (the
stages pass batch_size // n prompts per call) to about workers x generation_chunk x n.
"""

from __future__ import annotations

from montessori.distributed.scheduler import RayPool, dispatch, init_ray, start_actors, worker_count
from montessori.generation.backends.base import Backend, Completion, Request, Sampling


class GenerationActor:
    """One engine, built once: the backend `generation.backend` names, on this actor's GPU(s)."""

    def __init__(self, spec: str, generation: dict, models: dict, tensor_parallel: int = 1):
        from montessori.config import GenerationConfig, ModelsConfig
        from montessori.generation.backends import choose_backend, make_backend
        gen_cfg, models_cfg = GenerationConfig(**generation), ModelsConfig(**models)
        if tensor_parallel > 1:
            if choose_backend(gen_cfg) != "vllm":
                raise ValueError("distributed.gpus_per_worker > 1 needs generation.backend=vllm (tensor parallel)")
            from montessori.generation.backends.vllm import VLLMBackend
            # Ray gave this actor `tensor_parallel` GPUs; vLLM's own workers run as local processes on them.
            self.backend = VLLMBackend(spec, dtype=models_cfg.dtype, tensor_parallel_size=tensor_parallel,
                                       distributed_executor_backend="mp")
        else:
            self.backend = make_backend(spec, gen_cfg, models_cfg)

    def generate(self, items: list[tuple[int, Request, Sampling]]) -> list[tuple[int, list[Completion]]]:
        sampling = items[0][2]
        completions = self.backend.generate([r for _, r, _ in items], sampling)
        return [(i, c) for (i, _, _), c in zip(items, completions)]


class RayBackend(Backend):
    name = "ray"

    def __init__(self, spec: str, config, *, progress: bool = False):
        dcfg, gen = config.distributed, config.generation
        if gen.backend == "http" or (gen.backend == "auto" and gen.base_url):
            raise ValueError("distributed.ray with generation.backend=http: the server already spreads the "
                             "work; use it without Ray")
        init_ray(dcfg.address)
        n = worker_count(dcfg.num_workers, dcfg.gpus_per_worker, dcfg.cpus_per_worker)
        args = (spec, gen.model_dump(), config.models.model_dump(), dcfg.gpus_per_worker)
        self.pool = RayPool(start_actors(GenerationActor, lambda k: args, n, gpus_per_worker=dcfg.gpus_per_worker,
                                         cpus_per_worker=dcfg.cpus_per_worker), "generate")
        self.chunk, self.progress = dcfg.generation_chunk, progress
        self.stats = []  # DispatchStats of each call

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        out: dict[int, list[Completion]] = {}
        items = [(i, r, sampling) for i, r in enumerate(requests)]
        self.stats.append(dispatch(self.pool, items, lambda r: out.__setitem__(*r), chunk_size=self.chunk,
                                   progress=self.progress, desc="generation"))
        return [out[i] for i in range(len(requests))]

    def close(self) -> None:
        self.pool.close()
