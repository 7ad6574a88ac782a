"""Stage `warmup`: split, a real AdamW warm-up of a tiny student, and the framework-neutral saved state."""

from __future__ import annotations

import json

import pytest
import torch

from montessori.config import WarmupConfig
from montessori.errors import InputError
from montessori.models.batching import encode_pairs
from montessori.influence.warmup import split_pairs, train_warmup
from montessori.pipeline import run_pipeline
from montessori.records import Pair
from montessori.store import RunStore, write_jsonl


def pairs(n: int, prefix: str = "r1-p") -> list[Pair]:
    return [Pair(f"{prefix}{i:04d}-s0", f"Name {i + 2} fruits that are {'red' if i % 2 else 'yellow'}.",
                 f"Here are {i + 2} fruits: " + ", ".join(["apple", "banana", "cherry", "lemon", "plum"][: i % 5 + 1]),
                 candidate_id=f"r1-p{i:04d}-s0", prompt_id=f"r1-p{i:04d}") for i in range(n)]


def fake_responses_stage(run_dir, records: list[Pair]) -> None:
    """What the responses stage leaves behind (the generation helper owns the real one)."""
    sd = RunStore(run_dir).stage(1, "responses")
    write_jsonl(sd.file("pairs.jsonl"), records)
    sd.write_manifest(fingerprint="test-responses", config_hash="test", inputs={}, counts={"pairs": len(records)},
                      started=0.0)


def test_split_takes_first_w_then_next_p():
    warm, probe = split_pairs(pairs(10), 3, 4)
    assert [p.id for p in warm] == [p.id for p in pairs(10)[:3]]
    assert [p.id for p in probe] == [p.id for p in pairs(10)[3:7]]
    with pytest.raises(InputError, match="split.warmup"):
        split_pairs(pairs(3), 3, 4)


def test_warmup_stage_saves_a_state_anyone_can_load(tmp_path, tiny_config, tiny_dir):
    from transformers import AutoModelForCausalLM
    fake_responses_stage(tmp_path, pairs(12))
    tiny_config.warmup.global_batch_size = 2  # 4 warm-up pairs -> 2 optimizer steps
    run_pipeline(tiny_config, tmp_path, only="warmup", progress=False)
    folder = tmp_path / "round-1" / "warmup"
    split = json.loads((folder / "split.json").read_text())
    assert split == {"warmup": [p.id for p in pairs(12)[:4]], "probing": [p.id for p in pairs(12)[4:12]]}
    info = json.loads((folder / "optimizer.json").read_text())
    assert info["step"] == 2 and info["lr"] == pytest.approx(tiny_config.warmup.lr)  # the peak: next step's lr
    assert (info["betas"], info["eps"], info["weight_decay"]) == ([0.9, 0.999], 1e-8, 0.0)
    # Loadable with plain transformers + torch, in the documented order.
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == info["lr"]
    for p in model.parameters():
        s = optimizer.state[p]
        assert s["exp_avg"].shape == p.shape and int(s["step"]) == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters())]
    assert all(moved)  # every parameter trained
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([tiny_config.warmup.lr / 2, tiny_config.warmup.lr])


def test_warmup_is_seeded_and_the_loss_is_a_token_mean_over_the_step(tiny_model):
    model, tokenizer = tiny_model
    examples = encode_pairs(tokenizer, pairs(4), 128)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def run(**kw):
        model.load_state_dict(start)
        optimizer, log = train_warmup(model, examples, WarmupConfig(lr=1e-3, **kw), pad_id=tokenizer.pad_token_id)
        return [p.detach().clone() for p in model.parameters()], log

    a, log_a = run(global_batch_size=2, micro_batch_size=2)
    b, _ = run(global_batch_size=2, micro_batch_size=2)
    c, log_c = run(global_batch_size=2, micro_batch_size=1)  # same steps, gradient accumulated over micro-batches
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(log_a) == len(log_c) == 2
    assert [m["loss"] for m in log_a] == pytest.approx([m["loss"] for m in log_c], rel=1e-5)
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
