"""The influence value does not depend on how many processes share the reference set (the public code
divides the candidate loss by the number of processes, so its values do)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from montessori.influence import compute_influence, load_warmup
from test_influence import CANDIDATES, REFERENCE, influences, warm_dir  # noqa: F401  (fixture)


def _worker(rank: int, world: int, folder: str, init: str, out: str, estimator: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, tokenizer, state = load_warmup(folder, "cpu")
        results = compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer,
                                    estimator=estimator, eval_batch_size=2)
        with open(f"{out}.{rank}", "w") as f:
            json.dump([[r.influence, r.ref_loss_before] for r in results], f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("estimator", ["exact", pytest.param("linear", marks=pytest.mark.slow)])
def test_two_processes_give_the_single_process_value(warm_dir, tmp_path, estimator):  # noqa: F811
    model, tokenizer, state = load_warmup(warm_dir, "cpu")
    single = compute_influence(model, state, CANDIDATES[:4], REFERENCE, tokenizer=tokenizer, estimator=estimator,
                               eval_batch_size=2)
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, str(warm_dir), str(tmp_path / "init"), out, estimator), nprocs=2)
    for rank in range(2):
        values = json.load(open(f"{out}.{rank}"))
        assert [v[1] for v in values] == pytest.approx([r.ref_loss_before for r in single], rel=1e-6)
        assert [v[0] for v in values] == pytest.approx(influences(single), abs=2e-5, rel=1e-4)
