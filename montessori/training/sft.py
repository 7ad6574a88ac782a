"""Stage `sft`: train the student on the updated teacher's dataset (docs/method.md, step 9).

From the student entering this round (the base student in round 1, not the warmed-up copy), TRL's
SFTTrainer, response-only loss, 1 epoch, AdamW lr 5e-6, WSD 10/50/40 down to min_lr, global batch 32
through gradient accumulation (sft.global_batch_size = micro batch x accumulation x processes).

The examples reach TRL already tokenized by `encode_example`, the one masking helper every
response-only loss in this package uses, so TRL keeps our labels as they are (prompt tokens = -100).

Writes RUN/round-R/sft/: model/ (HF dir + tokenizer) and metrics.jsonl (loss per optimizer step).
Resume granularity is the stage, as for `dpo`: a killed run re-trains from the same start, same seed.
"""

from __future__ import annotations

import os
import shutil
from functools import cache

from montessori.config import Schedule
from montessori.context import stage
from montessori.keys import STUDENT
from montessori.config import SFTConfig
from montessori.errors import MontessoriError
from montessori.models.chat import IGNORE_INDEX, encode_example, user_turn
from montessori.records import Pair
from montessori.store import StageDir, read_jsonl
from montessori.training.common import (check_wsd, common_args, grad_accum_steps, last_value, load_for_training,
                                        mean_value, quiet_callbacks, save_model_atomic, write_metrics)


def sft_dataset(tokenizer, pairs: list[Pair], max_length: int):
    """(dataset of input_ids/labels, number of pairs dropped because no response token fit)."""
    from datasets import Dataset
    rows = []
    for pair in pairs:
        ids, labels = encode_example(tokenizer, user_turn(pair.instruction), pair.response, max_length=max_length)
        if any(label != IGNORE_INDEX for label in labels):
            rows.append({"input_ids": ids, "labels": labels})
    return (Dataset.from_list(rows) if rows else None), len(pairs) - len(rows)


@cache
def _trainer_class():
    from trl import SFTTrainer

    from montessori.training.schedules import WSDMixin

    class WSDSFTTrainer(WSDMixin, SFTTrainer):
        pass

    return WSDSFTTrainer


def varlen_attention(model) -> bool:
    """Whether the model's attention kernel takes packed sequences natively (flash attention's varlen
    path). Only there is a padding-free batch a saving: SDPA and eager run a packed row under a
    block-diagonal mask over the whole row, exact but with the attention cost of one long sequence."""
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


def build_sft_trainer(model, tokenizer, pairs: list[Pair], cfg: SFTConfig, *, output_dir, callbacks=(),
                      progress: bool = False, padding_free: bool | None = None, compute_dtype=None):
    """A ready SFTTrainer over `encode_example` tokens, WSD schedule; also returns the dropped count.

    `padding_free` (default: `varlen_attention(model)`) concatenates each micro batch into one row
    with restarting position ids (TRL's padding-free batches): no pad token is computed, and the loss
    is the same token mean as the padded batch's. Examples are already cut at sft.max_length."""
    from trl import SFTConfig as TRLSFTConfig

    wsd = check_wsd(cfg, "sft")
    train, dropped = sft_dataset(tokenizer, pairs, cfg.max_length)
    if train is None:
        raise MontessoriError(f"sft: no training pair has a response token within sft.max_length={cfg.max_length}")
    grad_accum = grad_accum_steps(cfg, "sft", int(os.environ.get("WORLD_SIZE", "1")))
    padding_free = varlen_attention(model) if padding_free is None else padding_free
    args = TRLSFTConfig(
        **common_args(model, output_dir=output_dir, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.micro_batch_size,
                      grad_accum=grad_accum, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
                      compute_dtype=compute_dtype),
        # TRL leaves max_length to packing when padding-free; encode_example has applied it already
        max_length=None if padding_free else cfg.max_length, padding_free=padding_free, packing=False,
        shuffle_dataset=False,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                               callbacks=list(callbacks))
    trainer.wsd = wsd
    quiet_callbacks(trainer, progress, "sft")
    return trainer, dropped


def train_sft(model, tokenizer, pairs: list[Pair], cfg: SFTConfig, **kwargs):
    """Fine-tune on response tokens; returns (model, log history, pairs dropped as too long)."""
    trainer, dropped = build_sft_trainer(model, tokenizer, pairs, cfg, **kwargs)
    trainer.train()
    return trainer.model, trainer.state.log_history, dropped


@stage("sft", keys=STUDENT + tuple(f"sft.{k}" for k in tuple(Schedule.model_fields) + (
           "global_batch_size", "micro_batch_size")),
       inputs=("dataset",), round_inputs=("sft",), models=("student",), launch=True, baseline=True,
       next_round="student")
def run_sft(ctx, dataset: StageDir) -> dict:
    cfg, models = ctx.config.sft, ctx.config.models
    pairs = read_jsonl(dataset.path / "pairs.jsonl", Pair)
    if not pairs:
        raise MontessoriError("sft: dataset/pairs.jsonl holds no training pairs; re-run the dataset stage")
    spec = ctx.base_student_spec()
    ctx.log.info("sft: student %s, %d training pairs", spec, len(pairs))
    model, tokenizer, compute = load_for_training(spec, models, lora=False)
    work = ctx.dir.path / ".trainer"
    trained, history, dropped = train_sft(model, tokenizer, pairs, cfg, output_dir=work, progress=ctx.progress,
                                          compute_dtype=compute)
    shutil.rmtree(work, ignore_errors=True)
    write_metrics(ctx.dir.file("metrics.jsonl"), history)
    save_model_atomic(trained, tokenizer, ctx.dir.path / "model")
    counts = {"pairs": len(pairs) - dropped, "dropped_too_long": dropped, "steps": last_value(history, "step") or 0,
              "loss_first": next((e["loss"] for e in history if "loss" in e), None),
              "loss_last": last_value(history, "loss"), "loss_mean": mean_value(history, "loss")}
    return {k: v for k, v in counts.items() if v is not None} | {"_extra": {"student": spec}}
