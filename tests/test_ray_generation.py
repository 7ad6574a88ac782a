"""Generation on a local Ray cluster of 2 transformers engines (tiny random Llama, CPU): the
responses stage's own function, its teacher opened through `ctx.workers` on the Ray executor's mapper
(the one executor contract), writes the pairs a single-process backend writes, with both engines
taking chunks from the shared queue."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'montessori[ray]')")

from montessori.context import StageContext  # noqa: E402
from montessori.executors.ray import ray_map  # noqa: E402
from montessori.generation.backends.hf import TransformersBackend  # noqa: E402
from montessori.generation.stage import generate_responses, teacher  # noqa: E402
from montessori.records import Candidate, Pair  # noqa: E402
from montessori.store import RunStore, read_jsonl  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    # One local cluster for all Ray test modules (Ray shuts it down at exit): starting one costs seconds.
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def candidates(n: int) -> list[Candidate]:
    return [Candidate(f"r1-p{i:04d}-s0", f"r1-p{i:04d}", "<instruction>x</instruction>",
                      f"Write a {['short', 'long', 'funny'][i % 3]} poem about {['tea', 'owls', 'rain', 'salt'][i % 4]}.")
            for i in range(n)]


def test_ray_engines_write_the_single_process_pairs(tmp_path, tiny_config):
    tiny_config.models.teacher = "tiny-random:0"
    tiny_config.generation.responses.max_new_tokens = 12
    tiny_config.distributed.num_workers, tiny_config.distributed.generation_chunk = 2, 2
    cands = candidates(8)

    # Single process: batches of 2 prompts (each sampled with its first request's seed).
    tiny_config.generation.batch_size = 2
    local = TransformersBackend.load("tiny-random:0", device="cpu", dtype="float32")
    generate_responses(local, tiny_config.generation, cands, tmp_path / "local.jsonl", round=1, seed=0)

    # Ray: the stage passes 4 prompts per call; each call is cut into 2 chunks of 2 for 2 engines.
    tiny_config.generation.batch_size = 4
    mapper = ray_map(tiny_config.distributed)
    store = RunStore(tmp_path / "run")
    ctx = StageContext(tiny_config, store, 1, store.stage(1, "responses"), progress=False, mapper=mapper)
    with teacher(ctx, "tiny-random:0") as backend:  # the two engines start once, for both calls
        counts = generate_responses(backend, tiny_config.generation, cands, tmp_path / "ray.jsonl", round=1, seed=0)
    expected, got = read_jsonl(tmp_path / "local.jsonl", Pair), read_jsonl(tmp_path / "ray.jsonl", Pair)
    assert counts["pairs"] == 8 and [p.id for p in got] == [c.id for c in cands]
    assert [p.response for p in got] == [p.response for p in expected]
    assert len({p.response for p in got}) > 1  # really sampled, per prompt
    assert len(mapper.stats) == 2 and all(s.tasks == 2 for s in mapper.stats)
    assert {w for s in mapper.stats for w in s.per_worker} == {0, 1}  # both engines took chunks
