"""Student SFT: response-only labels from the shared masking helper, global batch through
accumulation, real training from the student entering the round."""

from __future__ import annotations

import shutil

import pytest
import torch

from montessori.config import load_preset
from montessori.errors import InputError
from montessori.models import load_model
from montessori.models.chat import IGNORE_INDEX, encode_example, user_turn
from montessori.pipeline import StageContext
from montessori.records import Pair
from montessori.store import RunStore, read_jsonl, write_jsonl
from montessori.training.common import grad_accum_steps
from montessori.training.sft import build_sft_trainer, run_sft


def make_pairs(n: int) -> list[Pair]:
    return [Pair(id=f"d{i}", instruction=f"List {i + 2} primary colors.", response="Red, yellow and blue. " * 3)
            for i in range(n)]


def test_labels_are_exactly_encode_example_masks(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    cfg = load_preset("tiny").sft
    pairs = make_pairs(4)
    trainer, dropped = build_sft_trainer(model, tokenizer, pairs, cfg, output_dir=tmp_path)
    assert dropped == 0
    expected = [encode_example(tokenizer, user_turn(p.instruction), p.response, max_length=cfg.max_length)
                for p in pairs]
    for row, (ids, labels) in zip(trainer.train_dataset, expected):
        assert row["input_ids"] == ids and row["labels"] == labels
    batch = next(iter(trainer.get_train_dataloader()))
    for seq, lab in zip(batch["input_ids"], batch["labels"]):
        n = int((lab != IGNORE_INDEX).nonzero().max()) + 1
        assert (seq[:n].tolist(), lab[:n].tolist()) in expected  # prompt tokens masked, nothing else added


def test_global_batch_comes_from_gradient_accumulation():
    cfg = load_preset("tiny", ["sft.global_batch_size=32", "sft.micro_batch_size=4"]).sft
    assert grad_accum_steps(cfg, "sft") == 8 and grad_accum_steps(cfg, "sft", world_size=2) == 4
    # Refused with the config, before any stage (docs/errors.md)...
    with pytest.raises(InputError, match="32 is not a multiple of sft.micro_batch_size=5"):
        load_preset("tiny", ["sft.global_batch_size=32", "sft.micro_batch_size=5"])
    # ...and by the trainer's own guard for a section built by hand (model_copy does not validate).
    with pytest.raises(InputError, match="sft.global_batch_size=32 is not a multiple"):
        grad_accum_steps(cfg.model_copy(update={"micro_batch_size": 5}), "sft")


def response_loss(model, tokenizer, pairs) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for p in pairs:
            ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response)
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
            n = sum(x != IGNORE_INDEX for x in labels) - 1
            total, count = total + out.loss.item() * n, count + n
    return total / count


def sft_ctx(tmp_path, pairs, round_=1, overrides=()):
    config = load_preset("tiny", list(overrides))
    store = RunStore(tmp_path)
    write_jsonl(store.stage(round_, "dataset").file("pairs.jsonl"), pairs)
    return StageContext(config, store, round_, store.stage(round_, "sft"), active=("dataset", "sft"), progress=False)


def test_sft_stage_trains_the_student_and_saves_an_hf_model(tmp_path):
    pairs = make_pairs(8)
    ctx = sft_ctx(tmp_path, pairs)
    base, tokenizer = load_model(ctx.config.models.student, "cpu", "float32")
    before = response_loss(base, tokenizer, pairs)
    counts = run_sft(ctx)
    trained, tok = load_model(str(ctx.dir.path / "model"), "cpu", "float32")
    assert response_loss(trained, tok, pairs) < before - 0.05
    # 8 pairs, micro batch 2 x accumulation 2 = global batch 4: two optimizer steps.
    metrics = [m for m in read_jsonl(ctx.dir.path / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2] and counts["steps"] == 2 and counts["pairs"] == 8
    assert all(m["learning_rate"] > 0 for m in metrics)
    assert (ctx.dir.path / "model" / "tokenizer_config.json").exists()


def test_round_two_starts_from_round_one_student(tmp_path, tiny_dir):
    # Round 1's student: a copy of another tiny model, so we can tell where round 2 started from.
    shutil.copytree(tiny_dir, tmp_path / "round-1" / "sft" / "model")
    ctx = sft_ctx(tmp_path, make_pairs(2), round_=2, overrides=["sft.global_batch_size=2", "sft.lr=1e-9",
                                                                  "sft.min_lr=1e-12"])
    assert ctx.student_spec() == str(tmp_path / "round-1" / "sft" / "model")
    counts = run_sft(ctx)
    trained, _ = load_model(str(ctx.dir.path / "model"), "cpu", "float32")
    start, _ = load_model(str(tiny_dir), "cpu", "float32")
    other, _ = load_model(ctx.config.models.student, "cpu", "float32")
    w = trained.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w, start.model.layers[0].mlp.up_proj.weight, atol=1e-6)
    assert not torch.allclose(w, other.model.layers[0].mlp.up_proj.weight, atol=1e-3)
    assert counts["pairs"] == 2


def test_padding_free_batches_give_the_padded_loss_and_weights(tiny_spec, tmp_path):
    # responses of very different lengths, so the padded micro batches carry much padding
    pairs = [Pair(id=f"d{i}", instruction=f"Name {i + 2} colors.", response="Red and blue. " * (1 + 5 * (i % 3)))
             for i in range(8)]
    cfg = load_preset("tiny", ["sft.max_length=256"]).sft
    runs = {}
    for padding_free in (True, False):
        model, tokenizer = load_model(tiny_spec, "cpu", "float32")
        trainer, _ = build_sft_trainer(model, tokenizer, pairs, cfg, output_dir=tmp_path, padding_free=padding_free)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["input_ids"].shape[0] == 1) is padding_free  # one packed row, no pad token
        trainer.train()
        runs[padding_free] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], trainer.model)
    (packed, packed_model), (padded, padded_model) = runs[True], runs[False]
    assert len(packed) == len(padded) == 2
    assert packed == pytest.approx(padded, rel=1e-5)
    for p, q in zip(packed_model.parameters(), padded_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
