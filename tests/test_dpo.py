"""Teacher DPO: WSD schedule, seeded eval split, exact prompt tokens, real training on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from montessori.config import load_preset
from montessori.errors import InputError, MontessoriError
from montessori.models import load_model
from montessori.models.chat import prompt_text
from montessori.pipeline import StageContext
from montessori.records import PreferencePair
from montessori.store import RunStore, read_jsonl, write_jsonl
from montessori.training.common import eval_split
from montessori.training.dpo import (build_dpo_trainer, preference_features, reference_batch_size, run_dpo,
                                    train_dpo)
from montessori.training.schedules import wsd_factor, wsd_phases, wsd_scheduler


def test_wsd_schedule_warms_up_holds_then_decays_to_min_lr():
    lr, min_lr, total = 1e-3, 1e-6, 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = wsd_scheduler(opt, total, lr=lr, min_lr=min_lr, warmup=0.1, stable=0.5)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert wsd_phases(total, 0.1, 0.5) == (10, 50, 40)
    assert lrs[0] == pytest.approx(lr / 10) and lrs[9] == pytest.approx(lr)  # linear warm-up, first step learns
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10:60] == [pytest.approx(lr)] * 50  # stable
    assert lrs[60] == pytest.approx(lr) and all(a > b for a, b in zip(lrs[60:], lrs[61:]))  # decay
    assert lrs[80] == pytest.approx(min_lr + (lr - min_lr) * 0.5)  # linear
    assert lrs[-1] == pytest.approx(min_lr + (lr - min_lr) / 40)
    assert opt.param_groups[0]["lr"] == pytest.approx(min_lr)  # where the run ends


def test_wsd_with_few_steps_never_wastes_a_step_at_zero_lr():
    for total in (1, 2, 3, 4, 7):
        assert sum(wsd_phases(total, 0.1, 0.5)) == total
        factors = [wsd_factor(k, total, 0.1, 0.5, 0.01) for k in range(total)]
        assert all(f > 0 for f in factors) and max(factors) == pytest.approx(1.0)


def test_wsd_ratios_must_sum_to_one(tiny_model):
    with pytest.raises(InputError, match="dpo.warmup_ratio"):  # refused with the config, before any stage
        load_preset("tiny", ["dpo.stable_ratio=0.7"])
    cfg = load_preset("tiny").dpo  # and by the trainer, for a section built by hand
    cfg.stable_ratio = 0.7
    model, tokenizer = tiny_model
    with pytest.raises(InputError, match="dpo.warmup_ratio"):
        build_dpo_trainer(model, tokenizer, make_prefs(2), cfg, output_dir="unused")


def make_prefs(n: int, prompts: int | None = None) -> list[PreferencePair]:
    """Pairs whose chosen side is a sensible instruction and rejected side noise; several per prompt."""
    prompts = prompts or n
    out = []
    for i in range(n):
        p = i % prompts
        out.append(PreferencePair(
            id=f"c{i}>r{i}", prompt_id=f"p{p}",
            prompt=[{"role": "user", "content": f"Write one new instruction like these: task {p}"}], prefill="hel",
            chosen=f"lo. <instruction>Explain why the sky is blue in {i + 2} sentences.</instruction>",
            rejected=f"lo zq xv {i} ## ## <instruction>??</instruction>",
            chosen_id=f"c{i}", rejected_id=f"r{i}", chosen_influence=0.5, rejected_influence=-0.5))
    return out


def test_eval_split_is_seeded_disjoint_and_keeps_a_prompt_on_one_side():
    prefs = make_prefs(40, prompts=10)
    train, held = eval_split(prefs, 0.2, seed=3)
    assert eval_split(prefs, 0.2, seed=3) == (train, held)  # seeded: the same split every time
    assert eval_split(prefs, 0.2, seed=4)[1] != held
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert len(train) + len(held) == len(prefs)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in held})
    assert len({p.prompt_id for p in held}) == 2
    assert eval_split(prefs, 0.0, seed=3) == (prefs, [])


def test_prompt_tokens_are_exactly_the_chat_templated_generation_prompt(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    prefs = make_prefs(4)
    trainer = build_dpo_trainer(model, tokenizer, prefs, load_preset("tiny").dpo, output_dir=tmp_path)
    for row, pref in zip(trainer.train_dataset, prefs):
        text = prompt_text(tokenizer, pref.prompt, pref.prefill)
        assert row["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row["chosen_ids"] == tokenizer(pref.chosen, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
        # TRL's own text path tokenizes prompt+completion as one string: "hel" + "lo" merge into "hello",
        # other tokens than the ones the teacher was conditioned on and sampled.
        joint = tokenizer(text + pref.chosen, add_special_tokens=False)["input_ids"]
        assert joint[:len(row["prompt_ids"])] != row["prompt_ids"]
    batch = next(iter(trainer.get_train_dataloader()))
    first = trainer.train_dataset[0]
    prompt_len = len(first["prompt_ids"])
    rows = {tuple(r["prompt_ids"] + r["chosen_ids"]) for r in trainer.train_dataset}
    seq = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert tuple(seq) in rows  # exactly prompt + completion: no BOS or template added on top
    assert batch["completion_mask"].sum() > 0 and prompt_len > 0


def test_dpo_batch_keys_are_sfts_global_and_micro_batch(tiny_model, tmp_path):
    """dpo.global_batch_size pairs per optimizer step, dpo.micro_batch_size per forward: the accumulation
    is their ratio (over processes), as for sft; the 0.1 names are unknown keys."""
    from montessori.training.common import grad_accum_steps
    model, tokenizer = tiny_model
    cfg = load_preset("tiny", ["dpo.global_batch_size=4", "dpo.micro_batch_size=2"]).dpo
    trainer = build_dpo_trainer(model, tokenizer, make_prefs(8), cfg, output_dir=tmp_path)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 2)
    # The reference pass on the CPU runs at the micro batch (its logits are the stage's memory peak);
    # an accelerator batches 16 pairs.
    assert trainer.args.precompute_ref_batch_size == 2
    assert reference_batch_size(torch.nn.Linear(2, 2, device="meta"), cfg) == 16
    assert grad_accum_steps(cfg, "dpo", world_size=2) == 1
    default = load_preset("tiny").dpo  # the paper's batch 2: one forward of 2 pairs per step
    assert (default.global_batch_size, default.micro_batch_size, grad_accum_steps(default, "dpo")) == (2, 2, 1)
    with pytest.raises(InputError, match="key 'dpo.global_batch_size': 4 is not a multiple of dpo.micro_batch_size=3"):
        load_preset("tiny", ["dpo.global_batch_size=4", "dpo.micro_batch_size=3"])
    for old in ("dpo.batch_size=2", "dpo.grad_accum=1"):
        with pytest.raises(InputError, match=f"unknown key '{old.split('=')[0]}'"):
            load_preset("tiny", [old])


def completion_logps(model, tokenizer, prefs) -> list[tuple[float, float]]:
    """Summed log-probability of chosen and rejected completions (incl. end of turn) given the prompt."""
    out = []
    model.eval()
    with torch.no_grad():
        for pref in prefs:
            f = preference_features(tokenizer, pref)
            pair = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([f["prompt_ids"] + f[key]])
                logits = model(ids).logits[0, :-1].float()
                targets = ids[0, 1:]
                lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
                pair.append(lp[len(f["prompt_ids"]) - 1:].sum().item())
            out.append(tuple(pair))
    return out


def mean_margin(logps) -> float:
    return sum(c - r for c, r in logps) / len(logps)


def test_dpo_grows_the_teachers_margin_and_the_saved_teacher_reloads(tiny_spec, tmp_path):
    from montessori.training.common import save_model_atomic
    cfg = load_preset("tiny").dpo
    prefs = make_prefs(8, prompts=4)
    model, tokenizer = load_model(tiny_spec, "cpu", "float32")
    ref, _ = load_model(tiny_spec, "cpu", "float32")
    before = mean_margin(completion_logps(model, tokenizer, prefs))
    trained, history, _ = train_dpo(model, tokenizer, prefs, cfg, ref_model=ref, output_dir=tmp_path / "work")
    save_model_atomic(trained, tokenizer, tmp_path / "model")
    reloaded, reloaded_tok = load_model(str(tmp_path / "model"), "cpu", "float32")
    after = mean_margin(completion_logps(reloaded, reloaded_tok, prefs))
    assert after > before + 0.1, (before, after)
    steps = [e for e in history if "rewards/margins" in e]
    assert len(steps) == 4  # 8 pairs / batch 2, one logged entry per optimizer step
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["rewards/accuracies"] > 0.5
    # The reference stayed frozen: it is still the teacher as it entered the round.
    start, _ = load_model(tiny_spec, "cpu", "float32")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), start.state_dict().values()))
    assert reloaded.config.use_cache is True
    assert not (tmp_path / ".model.tmp").exists()


def test_lora_dpo_merges_adapters_into_a_plain_teacher(tiny_spec, tmp_path):
    from montessori.training.common import save_model_atomic
    cfg = load_preset("tiny", ["dpo.lora=true", "dpo.lora_r=4", "dpo.lr=1e-3"]).dpo
    prefs = make_prefs(4, prompts=2)
    model, tokenizer = load_model(tiny_spec, "cpu", "float32")
    before = mean_margin(completion_logps(model, tokenizer, prefs))
    trained, _, _ = train_dpo(model, tokenizer, prefs, cfg, output_dir=tmp_path / "work")
    save_model_atomic(trained, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    reloaded, _ = load_model(str(tmp_path / "model"), "cpu", "float32")
    assert mean_margin(completion_logps(reloaded, tokenizer, prefs)) > before


def dpo_ctx(tmp_path, prefs, overrides=()):
    config = load_preset("tiny", list(overrides))
    store = RunStore(tmp_path)
    write_jsonl(store.stage(1, "preferences").file("preferences.jsonl"), prefs)
    return StageContext(config, store, 1, store.stage(1, "dpo"), active=("preferences", "dpo"), progress=False)


def test_dpo_stage_writes_teacher_metrics_and_a_disjoint_eval_split(tmp_path):
    ctx = dpo_ctx(tmp_path, make_prefs(12, prompts=6), ["dpo.eval_fraction=0.34"])
    counts = run_dpo(ctx)
    out = ctx.dir.path
    split = json.loads((out / "split.json").read_text())
    assert len(split["eval"]) == 4 and len(split["train"]) == 8 and set(split["eval"]).isdisjoint(split["train"])
    assert counts["pairs_train"] == 8 and counts["pairs_eval"] == 4 and counts["steps"] == 4
    assert "eval_reward_margin" in counts
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "rewards/margins" in m] == [1, 2, 3, 4]
    assert any("eval_rewards/accuracies" in m for m in metrics)
    model, _ = load_model(str(out / "model"), "cpu", "float32")
    start, _ = load_model("tiny-random:0", "cpu", "float32")
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    assert not (out / ".trainer").exists()


def test_dpo_stage_refuses_an_empty_pair_file(tmp_path):
    with pytest.raises(MontessoriError, match="preferences.rule=rank"):
        run_dpo(dpo_ctx(tmp_path, []))


def test_round_two_trains_last_rounds_teacher_against_itself(tmp_path, tiny_dir):
    import shutil
    # Round 1's DPO output: a different tiny model than the preset's base teacher would be.
    shutil.copytree(tiny_dir, tmp_path / "round-1" / "dpo" / "model")
    config = load_preset("tiny", ["models.teacher=tiny-random:1", "dpo.lr=1e-9", "dpo.min_lr=1e-12",
                                  "dpo.max_length=128"])
    store = RunStore(tmp_path)
    prefs = make_prefs(2)
    long_prompt = PreferencePair(**{**prefs[0].to_dict(), "id": "long", "prompt": [
        {"role": "user", "content": "word " * 200}]})  # fills dpo.max_length=128 alone
    write_jsonl(store.stage(2, "preferences").file("preferences.jsonl"), prefs + [long_prompt])
    ctx = StageContext(config, store, 2, store.stage(2, "dpo"), active=("preferences", "dpo"), progress=False)
    counts = run_dpo(ctx)
    assert counts["_extra"]["teacher"] == str(tmp_path / "round-1" / "dpo" / "model")
    assert counts["dropped_too_long"] == 1 and counts["steps"] == 1
    trained, _ = load_model(str(ctx.dir.path / "model"), "cpu", "float32")
    start, _ = load_model(str(tiny_dir), "cpu", "float32")
    assert torch.allclose(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight,
                          atol=1e-6)


def test_reference_log_probs_computed_once_up_front_train_like_the_per_step_reference(tiny_spec, tmp_path):
    cfg = load_preset("tiny", ["dpo.lr=1e-4"]).dpo  # a large step, so the reference side matters from step 2
    prefs = make_prefs(8, prompts=4)
    runs = {}
    for precompute in (True, False):
        model, tokenizer = load_model(tiny_spec, "cpu", "float32")
        ref, _ = load_model(tiny_spec, "cpu", "float32")
        trainer = build_dpo_trainer(model, tokenizer, prefs, cfg, ref_model=ref, output_dir=tmp_path / "work",
                                    precompute_ref=precompute)
        assert ("ref_chosen_logps" in trainer.train_dataset.column_names) is precompute
        assert (trainer.ref_model is None) is precompute  # no step reads the reference model then
        trainer.train()
        runs[precompute] = ([e for e in trainer.state.log_history if "rewards/margins" in e], trainer.model)
    (fast, fast_model), (slow, slow_model) = runs[True], runs[False]
    assert len(fast) == len(slow) == 4
    for a, b in zip(fast, slow):
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert slow[-1]["rewards/margins"] != pytest.approx(slow[0]["rewards/margins"])  # the steps changed something
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_batched_completion_logps_equal_one_pair_at_a_time(tiny_model):
    from montessori.training.dpo import completion_logps as batched
    model, tokenizer = tiny_model
    prefs = make_prefs(5, prompts=2)
    fast = batched(model, tokenizer, prefs, max_length=1024, batch_size=3)  # padded batches, odd split
    slow = completion_logps(model, tokenizer, prefs)
    assert fast == [pytest.approx(pair, abs=1e-4) for pair in slow]


def test_heldout_wins_match_the_trainers_eval_reward_accuracy(tiny_spec, tmp_path):
    from montessori.training.dpo import completion_logps as batched
    from montessori.training.dpo import heldout_wins
    cfg = load_preset("tiny").dpo
    prefs, held = make_prefs(8, prompts=4), make_prefs(12, prompts=6)[8:]  # 4 held-out pairs, 2 eval batches
    model, tokenizer = load_model(tiny_spec, "cpu", "float32")
    ref, _ = load_model(tiny_spec, "cpu", "float32")
    before = batched(ref, tokenizer, held, cfg.max_length)
    trained, history, _ = train_dpo(model, tokenizer, prefs, cfg, ref_model=ref, eval_prefs=held,
                                    output_dir=tmp_path / "work")
    wins = heldout_wins(batched(trained, tokenizer, held, cfg.max_length), before)
    trl = [e["eval_rewards/accuracies"] for e in history if "eval_rewards/accuracies" in e][-1]
    assert sum(wins) / len(wins) == pytest.approx(trl)
    assert heldout_wins(before, before) == [False] * 4  # untrained: no pair is won (TRL's strict >)
