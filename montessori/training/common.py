"""What teacher DPO and student SFT share: trainer arguments, the eval split, atomic model saving."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from montessori.compat import checkpointing_args
from montessori.errors import InputError
from montessori.models import load_model
from montessori.models.load import resolve_device, resolve_dtype
from montessori.store import write_jsonl


def check_wsd(cfg, section: str) -> dict:
    """The WSD ratios of a config section; they must cover the run exactly once."""
    total = cfg.warmup_ratio + cfg.stable_ratio + cfg.decay_ratio
    if abs(total - 1.0) > 1e-6 or min(cfg.warmup_ratio, cfg.stable_ratio, cfg.decay_ratio) < 0:
        raise InputError(f"{section}.warmup_ratio + stable_ratio + decay_ratio must be non-negative and sum to 1 "
                         f"(got {cfg.warmup_ratio} + {cfg.stable_ratio} + {cfg.decay_ratio})")
    return {"warmup": cfg.warmup_ratio, "stable": cfg.stable_ratio, "min_lr": cfg.min_lr}


def load_for_training(spec: str, models, lora: bool):
    """(model, tokenizer, compute dtype) for a training stage. Full fine-tuning keeps fp32 master
    weights and computes in models.dtype through autocast: in bf16 weights an AdamW step at the
    paper's lr (1e-6 for DPO, 5e-6 for SFT) is far below a weight's rounding step (~1e-4 at
    |w| = 0.02) and is lost. LoRA trains PEFT's fp32 adapters over frozen weights in models.dtype."""
    compute = resolve_dtype(models.dtype, resolve_device(models.device))
    model, tokenizer = load_model(spec, models.device, models.dtype if lora else "float32")
    return model, tokenizer, compute


def trainer_precision(model, compute_dtype: torch.dtype | None = None) -> dict:
    """TRL configs default to bf16 autocast; compute in `compute_dtype` (default: the dtype the
    model was loaded in) instead."""
    dtype = compute_dtype or next(model.parameters()).dtype
    master_fp32 = next(model.parameters()).dtype == torch.float32
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16 and master_fp32}


def grad_accum_steps(cfg, section: str, world_size: int = 1) -> int:
    """Micro-batches each process accumulates per optimizer step: `section.global_batch_size` examples
    per step over all processes, `section.micro_batch_size` per forward pass (dpo and sft alike)."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise InputError(f"{section}.global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"{section}.micro_batch_size={cfg.micro_batch_size} x {world_size} process(es)")
    return cfg.global_batch_size // per_step


def common_args(model, *, output_dir: Path, lr: float, epochs: int, batch_size: int, grad_accum: int, seed: int,
                gradient_checkpointing: bool, compute_dtype: torch.dtype | None = None) -> dict:
    on_cpu = next(model.parameters()).device.type == "cpu"
    return dict(
        output_dir=str(output_dir), learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, seed=seed, data_seed=seed,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, logging_first_step=True, save_strategy="no", report_to="none",
        use_cpu=on_cpu, dataloader_pin_memory=not on_cpu,
        disable_tqdm=True,  # quiet_callbacks draws one bar instead
        **checkpointing_args(gradient_checkpointing), **trainer_precision(model, compute_dtype),
    )


def eval_split(records: list, fraction: float, seed: int, key=lambda r: r.prompt_id) -> tuple[list, list]:
    """Seeded split into (train, eval) by group (`key`): pairs from one generation prompt share the
    prompt, so they all land on the same side and the eval prompts are never trained on."""
    if fraction <= 0:
        return list(records), []
    groups = sorted({key(r) for r in records})
    if len(groups) < 2:
        return list(records), []
    random.Random(seed).shuffle(groups)
    n_eval = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    held = set(groups[:n_eval])
    return [r for r in records if key(r) not in held], [r for r in records if key(r) in held]


def save_model_atomic(model, tokenizer, target: Path, also=None) -> Path:
    """Write an HF model directory under a temp name, then rename it into place: a stage killed while
    saving leaves no half-written model that a later stage could load. `also(folder)` writes more
    files into it before the rename (the dpo stage's llama.cpp adapters)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # trainers switch the KV cache off; generation wants it back
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if also is not None:
        also(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def write_metrics(path: Path, log_history: list[dict]) -> int:
    """The trainer's log history, one JSON object per logging event (per optimizer step here)."""
    return write_jsonl(path, [dict(entry) for entry in log_history])


def last_value(log_history: list[dict], key: str):
    values = [e[key] for e in log_history if key in e]
    return values[-1] if values else None


def mean_value(log_history: list[dict], key: str):
    values = [e[key] for e in log_history if key in e]
    return sum(values) / len(values) if values else None


def quiet_callbacks(trainer, progress: bool, desc: str) -> None:
    """Replace transformers' per-step dict printing with one progress bar (or nothing)."""
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(Bar())
