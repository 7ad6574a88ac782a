"""Influence on a local Ray cluster of 2 workers (tiny random Llama on CPU) against the single-process engine.

The values must not depend on which worker, or how many, scored a candidate; a worker that dies
mid-run must cost nothing but time: Ray restarts it and re-runs its task (max_restarts,
max_task_retries), and every candidate lands in influence.jsonl exactly once.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'montessori[ray]')")

from montessori.config import DistributedConfig, WarmupConfig  # noqa: E402
from montessori.executors.launcher import maybe_launch  # noqa: E402
from montessori.executors.ray import ray_map  # noqa: E402
from montessori.influence import compute_influence, load_warmup, save_warmup, train_warmup  # noqa: E402
from montessori.influence.scorer import build_scorer  # noqa: E402
from montessori.influence.settings import InfluenceSettings  # noqa: E402
from montessori.influence.stage import run_influence  # noqa: E402
from montessori.models.batching import encode_pairs  # noqa: E402
from montessori.pipeline import StageContext, run_pipeline  # noqa: E402
from montessori.records import InfluenceResult, Pair  # noqa: E402
from montessori.store import JsonlAppender, RunStore, read_jsonl, write_jsonl  # noqa: E402

FRUITS = ["apple", "banana", "cherry", "lemon", "plum", "fig", "kiwi"]


def pairs(prefix: str, n: int) -> list[Pair]:
    return [Pair(f"{prefix}{i:04d}-s0", f"Name {i % 5 + 2} fruits that are {'red' if i % 2 else 'yellow'}.",
                 "Here they are: " + ", ".join(FRUITS[: i % 6 + 1]) + ".", candidate_id=f"{prefix}{i:04d}-s0",
                 prompt_id=f"{prefix}{i:04d}") for i in range(n)]


WARM, CANDIDATES, REFERENCE = pairs("w", 6), pairs("r1-p", 12), pairs("ref", 5)
SETTINGS = InfluenceSettings(estimator="exact", max_length=128, reference_max_length=128, eval_batch_size=4, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    # One local cluster for all Ray test modules (Ray shuts it down at exit): starting one costs seconds.
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory, tiny_spec):
    """A real warm-up (6 AdamW steps, lr 1e-3) saved in the documented layout."""
    from montessori.models import load_model
    model, tokenizer = load_model(tiny_spec, device="cpu", dtype="float32")
    optimizer, _ = train_warmup(model, encode_pairs(tokenizer, WARM, 128), WarmupConfig(lr=1e-3),
                                pad_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("warmup")
    save_warmup(folder, model, tokenizer, optimizer)
    return folder


@pytest.fixture(scope="module")
def single_process(warm_dir):
    # One thread, as in each Ray actor (num_cpus=1): `exact` is a difference of two fp32 losses, and
    # a different thread count sums in another order (1.4e-6 apart seen in CI with 2 threads here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer, state = load_warmup(warm_dir, "cpu")
        results = compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                                    estimator="exact", max_length=128, eval_batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert all(r.status == "ok" for r in results)
    return {r.id: r.influence for r in results}


def test_a_worker_killed_mid_task_is_restarted_by_ray_and_every_value_lands_once(warm_dir, single_process, tmp_path):
    out_file, died = tmp_path / "influence.jsonl", tmp_path / "died"
    tasks = CANDIDATES + CANDIDATES[:2]  # two candidates sent twice: the driver writes each id once
    with JsonlAppender(out_file, InfluenceResult) as out:
        # The first worker to score a candidate creates `died` and its process exits holding that task.
        pool = ray_map(DistributedConfig(ray=True, num_workers=2))
        pool(partial(build_scorer, str(warm_dir), REFERENCE, SETTINGS, str(died)), "score", tasks, out.append,
             key=lambda r: r.id)
        (stats,) = pool.stats
    assert died.exists() and stats.workers == 2
    # Ray started the dead actor again (max_restarts) and re-ran the task it held (max_task_retries):
    # every task came back, the re-run one from the restarted process.
    assert len(stats.restarted) == 1 and sum(stats.per_worker.values()) == len(tasks) == 14
    written = read_jsonl(out_file, InfluenceResult)
    assert sorted(r.id for r in written) == sorted(c.id for c in CANDIDATES)  # each exactly once
    # The exact estimator on the same state: equal to the single-process engine's values.
    assert {r.id: r.influence for r in written} == pytest.approx(single_process, abs=1e-6)
    assert len(set(single_process.values())) > 1  # the candidates really differ


def test_ray_stage_equals_the_single_process_stage_and_resumes(tmp_path, tiny_config):
    """The stage drop-in: same influence.jsonl as run_influence (linear estimator here), and a
    re-run after an interruption scores only the missing candidates."""
    reference = tmp_path / "reference.jsonl"
    reference.write_text("".join(json.dumps({"instruction": p.instruction, "response": p.response}) + "\n"
                                 for p in REFERENCE))
    sd = RunStore(tmp_path).stage(1, "responses")
    write_jsonl(sd.file("pairs.jsonl"), pairs("r1-p", 12))
    sd.write_manifest(fingerprint="test", config_hash="test", inputs={}, counts={}, started=0.0)
    tiny_config.data.reference = str(reference)
    tiny_config.influence.estimator = "linear"
    run_pipeline(tiny_config, tmp_path, only="warmup", progress=False)
    run_pipeline(tiny_config, tmp_path, only="influence", progress=False)
    folder = tmp_path / "round-1" / "influence"
    single = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    assert len(single) == 8

    write_jsonl(folder / "influence.jsonl", single[:3])  # interrupted after 3 candidates
    tiny_config.distributed.ray, tiny_config.distributed.num_workers = True, 2
    store = RunStore(tmp_path)
    ctx = StageContext(tiny_config, store, 1, store.stage(1, "influence"), progress=False)
    counts = maybe_launch(run_influence.stage, ctx)  # the executor gives ctx.map Ray actors for distributed.ray
    resumed = read_jsonl(folder / "influence.jsonl", InfluenceResult)
    assert [r.id for r in resumed[:3]] == [r.id for r in single[:3]]
    assert sorted(r.id for r in resumed) == sorted(r.id for r in single)
    # Linear: a dot product over all parameters in fp32; the actors' thread count changes the
    # summation order, hence ~1e-5 relative (the exact estimator above agrees to 1e-6 absolute).
    assert {r.id: r.influence for r in resumed} == pytest.approx({r.id: r.influence for r in single}, rel=1e-4)
    assert all(r.estimator == "linear" for r in resumed)
    assert counts["candidates"] == 8 and counts["_extra"]["ray_workers"] == 2



def test_an_actor_computes_with_as_many_threads_as_cpus_it_reserved():
    """Ray leaves an OMP_NUM_THREADS the process inherited alone; 2 threads in an actor that reserved
    1 CPU oversubscribe the cores (and sum in another order than the 1-thread reference)."""
    from montessori.executors.ray import Worker

    class Threads:  # defined here, so that Ray pickles it by value (the test module is not importable there)
        def count(self, items: list) -> list[int]:
            import torch
            return [torch.get_num_threads() for _ in items]

    actor = ray.remote(Worker).options(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}}).remote(
        Threads, 0, "count", 1)
    try:
        assert ray.get(actor.run.remote([None, None])).results == [1, 1]
    finally:
        ray.kill(actor)
