"""`ctx.map`, the one contract between a stage and its executor (context.py), and the resume helper
every scoring stage uses (store.resume).

In this process the map builds factory() once and gives it every item in one call (the influence
engine batches and pipelines them itself), so the influence stage's values are bit for bit those of
`compute_influence`, the path the stage took before the executors shared the contract."""

from __future__ import annotations

from functools import partial

import pytest

from montessori.context import StageContext, map_in_process
from montessori.influence import compute_influence, load_warmup
from montessori.influence.scorer import build_scorer
from montessori.influence.settings import InfluenceSettings
from montessori.records import InfluenceResult
from montessori.store import RunStore, read_jsonl, resume, write_jsonl

from test_influence import CANDIDATES, REFERENCE, warm_dir  # noqa: F401  (fixture)

BUILT: list[str] = []


class Recorder:
    """A worker whose calls are recorded: what it was given, and how often it was built."""

    def __init__(self, name: str):
        BUILT.append(name)
        self.calls: list[list] = []

    def double(self, items: list):
        self.calls.append(list(items))
        for item in items:
            yield {"id": item, "value": 2 * item}


def test_in_process_map_builds_once_and_gives_every_item_to_one_call():
    BUILT.clear()
    got, worker = [], {}

    def factory():
        worker["it"] = Recorder("w")
        return worker["it"]

    map_in_process(factory, "double", [3, 1, 2, 1], got.append, key=lambda r: r["id"])
    assert BUILT == ["w"] and worker["it"].calls == [[3, 1, 2, 1]]  # one build, one call
    assert got == [{"id": 3, "value": 6}, {"id": 1, "value": 2}, {"id": 2, "value": 4}]  # each key once, in order
    BUILT.clear()
    map_in_process(partial(Recorder, "x"), "double", [], got.append, key=lambda r: r["id"])
    assert BUILT == []  # nothing to do: nothing is built


def test_ctx_map_uses_the_mapper_the_executor_chose(tmp_path, tiny_config):
    store = RunStore(tmp_path)
    seen = []

    class Session:
        def __init__(self, method):
            self.method = method

        def map(self, items, on_result, *, key, desc, progress, batch):
            seen.append((self.method, list(items), desc, progress, batch))
            for item in items:
                on_result(item)

        def close(self):
            seen.append("closed")

    class Mapper:
        def open(self, factory, method):
            return Session(method)

    out = []
    ctx = StageContext(tiny_config, store, 1, store.stage(1, "influence"), progress=False, mapper=Mapper())
    ctx.map(Recorder, "double", [1, 2], out.append, desc="things")
    assert seen == [("double", [1, 2], "things", False, False), "closed"] and out == [1, 2]


def test_workers_build_once_serve_every_map_of_the_block_and_close_after_it(tmp_path, tiny_config):
    class Closing(Recorder):
        closed = 0

        def close(self):
            Closing.closed += 1

    BUILT.clear()
    store = RunStore(tmp_path)
    ctx = StageContext(tiny_config, store, 1, store.stage(1, "responses"), progress=False)
    got = []
    with ctx.workers(partial(Closing, "engine"), "double") as workers:
        workers.map([1, 2], got.append, key=lambda r: r["id"], batch=True)
        workers.map([3], got.append, key=lambda r: r["id"])
        workers.map([], got.append, key=lambda r: r["id"])  # nothing to do: no call
        assert Closing.closed == 0
    assert BUILT == ["engine"] and Closing.closed == 1  # one build for the block, closed when it ends
    assert [r["value"] for r in got] == [2, 4, 6]


def test_resume_yields_what_is_left_and_selects_the_wanted_records(tmp_path):
    path = tmp_path / "influence.jsonl"
    done = [InfluenceResult(f"c{i}", 0.1 * i, 1.0, 1.0 - 0.1 * i) for i in range(3)]
    stale = InfluenceResult("old", 0.0, 1.0, 1.0)  # a record of an id this run does not ask for
    write_jsonl(path, [done[0], stale, done[2]])
    with resume(path, InfluenceResult, [f"c{i}" for i in range(4)], key=lambda i: i) as (out, todo):
        assert todo == ["c1", "c3"]
        out.append(done[1])
        results = out.select(f"c{i}" for i in range(4))
    assert [r.id for r in results] == ["c0", "c2", "c1"]  # file order, the stale id left out
    assert [r.id for r in read_jsonl(path, InfluenceResult)] == ["c0", "old", "c2", "c1"]


def test_the_in_process_map_of_the_stage_equals_compute_influence_exactly(warm_dir):  # noqa: F811
    """What run_influence does now (ctx.map over build_scorer, in this process) against what it did
    (load_warmup + compute_influence): the same floats, not merely close ones."""
    for estimator in ("exact", "linear"):
        settings = InfluenceSettings(estimator=estimator, max_length=128, reference_max_length=128,
                                     eval_batch_size=4, device="cpu")
        model, tokenizer, state = load_warmup(warm_dir, "cpu")
        before = compute_influence(model, state, CANDIDATES, REFERENCE, tokenizer=tokenizer, settings=settings)
        now = []
        map_in_process(partial(build_scorer, str(warm_dir), REFERENCE, settings), "score", CANDIDATES, now.append,
                       key=lambda r: r.id)
        assert [r.id for r in now] == [c.id for c in CANDIDATES]
        assert all(r.status == "ok" for r in now)
        for field in ("influence", "ref_loss_before", "ref_loss_after", "status", "estimator"):
            assert [getattr(r, field) for r in now] == [getattr(r, field) for r in before], (estimator, field)
    with pytest.raises(AttributeError):  # the method is looked up by name on the built state
        map_in_process(partial(build_scorer, str(warm_dir), REFERENCE, settings), "no_such", CANDIDATES[:1],
                       now.append, key=lambda r: r.id)
