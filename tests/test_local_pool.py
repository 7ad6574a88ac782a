"""Workers as local processes, without Ray (executors/local.py: the standard library's
ProcessPoolExecutor, the backend bench/scale.py uses on GPUs without Ray): the single-process
values, both workers taking tasks, and a dead process failing the call instead of hanging; the
influence stage under the local-pool executor (ctx.map on processes) writing each id once and
resuming. And the driver's exactly-once delivery that the Ray pool shares."""

from __future__ import annotations

import pytest

from montessori.executors.local import PoolStats, TaskResult, WorkerLost, deliver


def test_each_key_is_delivered_once_however_often_it_arrives():
    got = []
    done = [TaskResult(0, False, [1, 2]), TaskResult(1, False, [3]), TaskResult(0, True, [2, 4])]  # 2 came twice
    stats = deliver(done, PoolStats(workers=2, tasks=3, items=5), got.append, key=lambda r: r)
    assert got == [1, 2, 3, 4]
    assert stats.per_worker == {0: 4, 1: 1} and stats.restarted == {0}


@pytest.mark.slow  # two spawned processes importing torch + transformers: ~25 s idle, minutes on a busy box
def test_local_processes_give_the_single_process_values_and_a_dead_one_fails_the_call(tmp_path, tiny_spec):
    from functools import partial

    from montessori.config import WarmupConfig
    from montessori.executors.local import local_map
    from montessori.influence import compute_influence, load_warmup, save_warmup, train_warmup
    from montessori.influence.scorer import build_scorer
    from montessori.influence.settings import InfluenceSettings
    from montessori.models import load_model
    from montessori.models.batching import encode_pairs
    from montessori.records import Pair

    def pairs(prefix: str, n: int) -> list[Pair]:
        return [Pair(f"{prefix}{i}", f"Name {i % 5 + 2} fruits.", "Here: " + ", ".join(["fig", "kiwi", "plum"][: i % 3 + 1]))
                for i in range(n)]

    WARM, CANDIDATES, REFERENCE = pairs("w", 6), pairs("c", 12), pairs("ref", 5)
    model, tokenizer = load_model(tiny_spec, device="cpu", dtype="float32")
    optimizer, _ = train_warmup(model, encode_pairs(tokenizer, WARM, 128), WarmupConfig(lr=1e-3),
                                pad_id=tokenizer.pad_token_id)
    save_warmup(tmp_path, model, tokenizer, optimizer)
    model, tokenizer, state = load_warmup(tmp_path, "cpu")
    single = compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer,
                               estimator="exact", max_length=128, eval_batch_size=4)
    settings = InfluenceSettings(estimator="exact", max_length=128, reference_max_length=128, eval_batch_size=4, device="cpu")
    scored, pool = {}, local_map(num_workers=2)
    pool(partial(build_scorer, str(tmp_path), REFERENCE, settings), "score", CANDIDATES,
         lambda r: scored.__setitem__(r.id, r), key=lambda r: r.id)
    results, (stats,) = [scored[c.id] for c in CANDIDATES], pool.stats
    assert [r.id for r in results] == [c.id for c in CANDIDATES]
    assert [r.influence for r in results] == pytest.approx([r.influence for r in single], abs=1e-6)
    assert sum(stats.per_worker.values()) == 12 and set(stats.per_worker) == {0, 1}  # one shared queue
    assert stats.restarted == set()
    # Without Ray nothing restarts a dead process: the call fails with WorkerLost, it does not hang.
    with pytest.raises(WorkerLost, match="not re-run without Ray"):
        local_map(num_workers=2)(partial(build_scorer, str(tmp_path), REFERENCE, settings, str(tmp_path / "died")),
                                 "score", CANDIDATES, lambda r: None, key=lambda r: r.id)


@pytest.mark.slow  # two spawned processes importing torch + transformers, twice
def test_the_influence_stage_on_local_processes_writes_each_id_once_and_resumes(tmp_path, tiny_config):
    """The one influence stage under the local-pool executor: the in-process stage's values, each
    candidate written once, and a re-run after an interruption scores only the missing ones."""
    from types import SimpleNamespace

    from montessori.executors.launcher import local_executor
    from montessori.influence.stage import run_influence
    from montessori.pipeline import StageContext, run_pipeline
    from montessori.records import InfluenceResult
    from montessori.store import RunStore, read_jsonl, write_jsonl
    from test_influence_stage import reference_file
    from test_warmup import fake_responses_stage, pairs

    fake_responses_stage(tmp_path, pairs(12))
    tiny_config.data.reference = reference_file(tmp_path)
    run_pipeline(tiny_config, tmp_path, only="warmup", progress=False)
    folder = RunStore(tmp_path).stage(1, "influence")
    stage = SimpleNamespace(name="influence", function=run_influence, launch=False)

    def run() -> dict:
        store = RunStore(tmp_path)
        return local_executor(2)(stage, StageContext(tiny_config, store, 1, store.stage(1, "influence"),
                                                     progress=False))

    here = run_influence(StageContext(tiny_config, RunStore(tmp_path), 1, folder, progress=False))
    single = read_jsonl(folder.file("influence.jsonl"), InfluenceResult)
    assert here["candidates"] == len(single) == 8 and "local_workers" not in here["_extra"]

    folder.file("influence.jsonl").unlink()
    counts = run()
    pooled = read_jsonl(folder.file("influence.jsonl"), InfluenceResult)
    assert sorted(r.id for r in pooled) == sorted(r.id for r in single)  # each id exactly once
    # `exact` is a difference of two fp32 reference losses (~5): another process sums them to within
    # a few ulps of the loss (1.1e-6 apart seen on this 2-core box), not bit for bit
    assert {r.id: r.influence for r in pooled} == pytest.approx({r.id: r.influence for r in single}, abs=5e-6)
    assert counts["candidates"] == 8 and counts["_extra"]["local_workers"] == 2
    assert counts["_extra"]["local_workers_lost"] == 0

    write_jsonl(folder.file("influence.jsonl"), pooled[:3])  # interrupted after 3 candidates
    counts = run()
    resumed = read_jsonl(folder.file("influence.jsonl"), InfluenceResult)
    assert [r.id for r in resumed[:3]] == [r.id for r in pooled[:3]]
    assert sorted(r.id for r in resumed) == sorted(r.id for r in single) and len(resumed) == 8
    assert {r.id: r.influence for r in resumed} == pytest.approx({r.id: r.influence for r in single}, abs=5e-6)
    assert counts["candidates"] == 8

    counts = run()  # nothing left: no pool is started, nothing is written again
    assert read_jsonl(folder.file("influence.jsonl"), InfluenceResult) == resumed
    assert counts["candidates"] == 8 and "local_workers" not in counts["_extra"]
