"""Stage `dpo`: teach the teacher to write the instructions that helped the student (docs/method.md, step 7).

TRL's DPOTrainer, sigmoid loss, beta 0.1, lr 1e-6, 1 epoch, batch 2, WSD 10/50/40 down to min_lr,
max length 1024; the frozen reference is the teacher entering this round.

The one departure from TRL's data path: we tokenize the pairs ourselves. TRL tokenizes prompt+chosen
as one string, which merges tokens across the prompt/completion boundary, and the public code fed
the prompt as plain text without the chat template. Here the prompt tokens are exactly the
chat-templated generation prompt + prefill the teacher sampled from (`prompt_text`, no extra BOS) and
the completion tokens follow it as generated: the same boundary as `encode_example`.

Writes RUN/round-R/dpo/: model/ (the updated teacher, HF dir + tokenizer), metrics.jsonl (the
trainer's log per step: loss, rewards/margins, rewards/accuracies, learning_rate, ...), split.json.
Resume granularity is the stage: the model dir appears atomically and only then the manifest, so a
killed run re-trains from the teacher with the same seed and data order, giving the same weights.
"""

from __future__ import annotations

import os
import shutil
from functools import cache, partial
from pathlib import Path

from montessori.config import Schedule
from montessori.context import stage
from montessori.keys import TEACHER
from montessori.config import DPOConfig
from montessori.errors import MontessoriError
from montessori.models.chat import prompt_text
from montessori.models.lora_gguf import save_adapter
from montessori.records import PreferencePair
from montessori.store import StageDir, atomic_write_json, read_jsonl
from montessori.training.common import (check_wsd, common_args, eval_split, grad_accum_steps, last_value,
                                        load_for_training, mean_value, quiet_callbacks, save_model_atomic,
                                        write_metrics)


def preference_features(tokenizer, pref: PreferencePair) -> dict:
    """Token ids of one pair: the exact generation prompt, then each completion + end of turn."""
    prompt_ids = tokenizer(prompt_text(tokenizer, pref.prompt, pref.prefill), add_special_tokens=False)["input_ids"]

    def completion(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]

    return {"prompt_ids": prompt_ids, "chosen_ids": completion(pref.chosen), "rejected_ids": completion(pref.rejected)}


def preference_dataset(tokenizer, prefs: list[PreferencePair], max_length: int):
    """A datasets.Dataset of pre-tokenized pairs. Pairs whose prompt alone fills max_length carry no
    completion token and are dropped (TRL's rule, counted); the collator cuts longer completions at max_length."""
    from datasets import Dataset
    rows = [preference_features(tokenizer, p) for p in prefs]
    kept = [r for r in rows if len(r["prompt_ids"]) < max_length]
    return (Dataset.from_list(kept) if kept else None), len(rows) - len(kept)


def completion_logps(model, tokenizer, prefs: list[PreferencePair], max_length: int,
                     batch_size: int = 16) -> list[tuple[float, float]]:
    """Summed log-probability of each pair's chosen and rejected completion given its prompt: the tokens
    DPO trains on (preference_features), cut at max_length keeping the start as the trainer does. The
    implicit DPO reward is beta·(policy − reference) of these, so a held-out pair is won when
    policy − reference is larger for chosen than for rejected, whatever beta (`heldout_wins`)."""
    import torch
    seqs = []  # (token ids, number of prompt tokens), chosen then rejected of every pair
    for pref in prefs:
        f = preference_features(tokenizer, pref)
        seqs += [((f["prompt_ids"] + f[key])[:max_length], len(f["prompt_ids"])) for key in ("chosen_ids", "rejected_ids")]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            token_lp = logp.gather(2, ids[:, 1:, None])[..., 0]
            for row, (seq, n_prompt) in enumerate(chunk):  # position t predicts token t+1: completions from n_prompt
                sums.append(token_lp[row, n_prompt - 1:len(seq) - 1].sum().item())
    return list(zip(sums[0::2], sums[1::2]))


def heldout_wins(policy: list[tuple[float, float]], reference: list[tuple[float, float]]) -> list[bool]:
    """Per pair: is the policy's implicit reward larger for chosen than for rejected (TRL's
    rewards/accuracies, pair by pair)."""
    return [(pc - rc) > (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference)]


@cache
def _trainer_class():
    from trl import DPOTrainer

    from montessori.training.schedules import WSDMixin

    class PretokenizedDPOTrainer(WSDMixin, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by preference_features: keep our prompt/completion boundary

    return PretokenizedDPOTrainer


def reference_batch_size(model, cfg: DPOConfig) -> int:
    """Pairs per forward of the no-grad reference pass. On a GPU 16: a batch of 2 leaves it mostly idle.
    On the CPU the training micro batch: the CPU is compute-bound, so a larger batch gains nothing, and
    its logits over a 152K vocabulary are what the stage's memory peaks on (own-tasks, 11 pairs of ~500
    tokens: the whole set in one batch of 16, bench/dpo_memory.py, docs/benchmarks.md)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return cfg.micro_batch_size if on_cpu else max(16, cfg.micro_batch_size)


def build_dpo_trainer(model, tokenizer, prefs: list[PreferencePair], cfg: DPOConfig, *, ref_model=None,
                      eval_prefs: list[PreferencePair] = (), output_dir, callbacks=(), progress: bool = False,
                      precompute_ref: bool = True, compute_dtype=None):
    """A ready DPOTrainer over pre-tokenized pairs, WSD schedule, reference = `ref_model` (or, with
    cfg.lora, the teacher with its adapters disabled).

    The reference is frozen, so by default its log-probs of every pair are computed once here, before
    the first step (TRL's precompute_ref_log_probs), instead of one more forward per step; the trainer
    then drops its handle on the reference model. `precompute_ref=False` is TRL's per-step reference."""
    from trl import DPOConfig as TRLDPOConfig

    wsd = check_wsd(cfg, "dpo")
    train, too_long = preference_dataset(tokenizer, prefs, cfg.max_length)
    if train is None:
        longest = max(len(preference_features(tokenizer, p)["prompt_ids"]) for p in prefs)
        raise MontessoriError(f"dpo: every preference pair's prompt fills dpo.max_length={cfg.max_length} "
                              f"(generation prompts up to {longest} tokens): raise dpo.max_length")
    evals = preference_dataset(tokenizer, list(eval_prefs), cfg.max_length)[0] if eval_prefs else None
    grad_accum = grad_accum_steps(cfg, "dpo", int(os.environ.get("WORLD_SIZE", "1")))
    args = TRLDPOConfig(
        **common_args(model, output_dir=output_dir, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.micro_batch_size,
                      grad_accum=grad_accum, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
                      compute_dtype=compute_dtype),
        beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length, truncation_mode="keep_start",
        precompute_ref_log_probs=precompute_ref, precompute_ref_batch_size=reference_batch_size(model, cfg),
    )
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
        ref_model = None  # TRL computes the reference with the adapters disabled: the teacher as it entered
    trainer = _trainer_class()(model=model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=evals,
                               processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config)
    if precompute_ref:
        trainer.ref_model = None  # its log-probs are columns of the datasets now: no step reads the model
    trainer.wsd = wsd
    trainer.dropped_too_long = too_long
    quiet_callbacks(trainer, progress, "dpo")
    return trainer


def train_dpo(model, tokenizer, prefs: list[PreferencePair], cfg: DPOConfig, *, adapter_dir: Path | None = None,
              **kwargs):
    """Run DPO; returns (trained model, log history, pairs dropped as too long). With cfg.lora the
    adapters are merged, so the returned model is a plain transformers model either way; `adapter_dir`
    keeps them unmerged too (PEFT's adapter files), for llama.cpp (models.lora_gguf)."""
    trainer = build_dpo_trainer(model, tokenizer, prefs, cfg, **kwargs)
    kwargs.clear()  # the reference model, if any: the trainer holds what it still needs
    trainer.train()
    if trainer.eval_dataset is not None:
        trainer.evaluate()  # appends eval_rewards/margins, eval_rewards/accuracies to the log history
    history = list(trainer.state.log_history)
    trained = trainer.model
    if cfg.lora:
        if adapter_dir is not None:
            trained.save_pretrained(adapter_dir)
        trained = trained.merge_and_unload()
    return trained, history, trainer.dropped_too_long


@stage("dpo", keys=TEACHER + tuple(f"dpo.{k}" for k in tuple(Schedule.model_fields) + (
           "beta", "loss_type", "global_batch_size", "micro_batch_size", "eval_fraction", "lora", "lora_r",
           "lora_alpha")),
       inputs=("preferences",), round_inputs=("dpo",), models=("teacher",), launch=True, next_round="teacher")
def run_dpo(ctx, preferences: StageDir) -> dict:
    cfg, models = ctx.config.dpo, ctx.config.models
    prefs = read_jsonl(preferences.path / "preferences.jsonl", PreferencePair)
    if not prefs:
        raise MontessoriError("dpo: preferences/preferences.jsonl holds no preference pairs, nothing to train on; "
                              "re-run the preferences stage with preferences.rule=rank")
    train, held = eval_split(prefs, cfg.eval_fraction, cfg.seed)
    spec = ctx.teacher_spec()
    ctx.log.info("dpo: teacher %s, %d train / %d eval pairs", spec, len(train), len(held))
    model, tokenizer, compute = load_for_training(spec, models, cfg.lora)
    work = ctx.dir.path / ".trainer"
    # A teacher read from GGUF keeps running on llama.cpp once trained: its adapters, as GGUF over the
    # same base file, go into model/ beside the merged weights (models.lora_gguf).
    from montessori.generation.backends.llamacpp import is_gguf_spec  # here: it sets llama.cpp's OpenMP policy
    on_llamacpp = cfg.lora and is_gguf_spec(spec)
    # The reference (loaded like the policy, so both start from the same log-probs) is passed without
    # a name: once the trainer has its log-probs, nothing holds it.
    trained, history, too_long = train_dpo(
        model, tokenizer, train, cfg, eval_prefs=held, output_dir=work, progress=ctx.progress, compute_dtype=compute,
        ref_model=None if cfg.lora else load_for_training(spec, models, cfg.lora)[0].eval(),
        adapter_dir=work / "adapter" if on_llamacpp else None)
    if too_long:
        ctx.log.warning("dpo: %d of %d pairs dropped: their prompt alone fills dpo.max_length=%d", too_long,
                        len(train), cfg.max_length)
    atomic_write_json(ctx.dir.file("split.json"), {"train": [p.id for p in train], "eval": [p.id for p in held]})
    write_metrics(ctx.dir.file("metrics.jsonl"), history)
    save_model_atomic(trained, tokenizer, ctx.dir.path / "model",
                      also=partial(save_adapter, work / "adapter", spec) if on_llamacpp else None)
    shutil.rmtree(work, ignore_errors=True)
    counts = {"pairs_train": len(train), "pairs_eval": len(held), "steps": last_value(history, "step") or 0,
              "dropped_too_long": too_long,
              "loss": mean_value(history, "loss"),
              "reward_margin": last_value(history, "rewards/margins"),
              "reward_accuracy": mean_value(history, "rewards/accuracies")}
    if held:
        counts["eval_reward_margin"] = last_value(history, "eval_rewards/margins")
        counts["eval_reward_accuracy"] = last_value(history, "eval_rewards/accuracies")
    return {k: v for k, v in counts.items() if v is not None} | {"_extra": {"teacher": spec}}
