"""Workers as local processes, without Ray (executors/local.py: the standard library's
ProcessPoolExecutor, the backend bench/scale.py uses on GPUs without Ray): the single-process
values, both workers taking tasks, and a dead process failing the call instead of hanging.
And the driver's exactly-once delivery that the Ray pool shares."""

from __future__ import annotations

import pytest

from montessori.executors.local import Batch, PoolStats, WorkerLost, deliver


def test_each_key_is_delivered_once_however_often_it_arrives():
    got = []
    batches = [Batch(0, False, [1, 2]), Batch(1, False, [3]), Batch(0, True, [2, 4])]  # 2 came twice
    stats = deliver(batches, PoolStats(workers=2, tasks=3, items=5), got.append, key=lambda r: r)
    assert got == [1, 2, 3, 4]
    assert stats.per_worker == {0: 4, 1: 1} and stats.restarted == {0}


@pytest.mark.slow  # two spawned processes importing torch + transformers: ~25 s idle, minutes on a busy box
def test_local_processes_give_the_single_process_values_and_a_dead_one_fails_the_call(tmp_path, tiny_spec):
    from montessori.config import WarmupConfig
    from montessori.executors.influence import InfluenceSettings, score_distributed
    from montessori.influence import compute_influence, load_warmup, save_warmup, train_warmup
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
    results, stats = score_distributed(tmp_path, CANDIDATES, REFERENCE, settings, backend="mp", num_workers=2)
    assert [r.id for r in results] == [c.id for c in CANDIDATES]
    assert [r.influence for r in results] == pytest.approx([r.influence for r in single], abs=1e-6)
    assert sum(stats.per_worker.values()) == 12 and set(stats.per_worker) == {0, 1}  # one shared queue
    assert stats.restarted == set()
    # Without Ray nothing restarts a dead process: the call fails with WorkerLost, it does not hang.
    with pytest.raises(WorkerLost, match="not re-run without Ray"):
        score_distributed(tmp_path, CANDIDATES, REFERENCE, settings, backend="mp", num_workers=2,
                          die_once=tmp_path / "died")
