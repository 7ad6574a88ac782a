"""Stage `warmup`: split the generated pairs, fine-tune the student on the warm-up set, save its state.

Saved state (a framework-neutral layout; docs/run-directory.md documents it), RUN/round-R/warmup/:

    model/          HF model directory (fp32 weights + tokenizer): the warm-up weights θ_warm
    optimizer.pt    torch.optim.AdamW(model.parameters()).state_dict(): one param group, parameters in
                    model.parameters() order, moments exp_avg / exp_avg_sq and the step count
    optimizer.json  {lr, betas, eps, weight_decay, step, ...}; `lr` is the learning rate of the next
                    step (the probing step): after linear warm-up over the whole run, the peak lr
    split.json      {"warmup": [pair ids], "probing": [pair ids]}
    metrics.jsonl   training loss per optimizer step

Load it without this package:
    model = AutoModelForCausalLM.from_pretrained("warmup/model")
    opt = torch.optim.AdamW(model.parameters()); opt.load_state_dict(torch.load("warmup/optimizer.pt"))
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from montessori.context import stage
from montessori.keys import STUDENT
from montessori.compat import enable_checkpointing
from montessori.config import WarmupConfig
from montessori.errors import InputError
from montessori.models import load_model
from montessori.models.batching import Example, encode_pairs, length_batches, precision_context, token_loss_sum
from montessori.models.load import resolve_device
from montessori.records import Pair
from montessori.store import StageDir, atomic_write_json, read_jsonl, write_jsonl


def split_pairs(pairs: list[Pair], warmup: int, probing: int) -> tuple[list[Pair], list[Pair]]:
    """docs/method.md, step 3: the first W pairs warm the student up, the next P are probed."""
    if len(pairs) <= warmup:
        raise InputError(f"{len(pairs)} generated pairs but split.warmup={warmup}: no pair left to probe "
                         f"(lower split.warmup or generate more)")
    return pairs[:warmup], pairs[warmup:warmup + probing]


def warmup_precision(cfg: WarmupConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bfloat16" if device.type == "cuda" else "float32"  # docs/method.md, step 4; CPU bf16 is slow


def train_warmup(model, examples: list[Example], cfg: WarmupConfig, *, pad_id: int, precision: str = "float32",
                 progress: bool = False) -> tuple[torch.optim.AdamW, list[dict]]:
    """1 epoch of AdamW (one parameter group) on the response-only loss, lr linearly warmed up from
    lr/steps to lr over the whole run, so the step after the run (the probing step) uses the peak lr.

    A plain loop rather than TRL's SFTTrainer: the product is the exact torch.optim.AdamW state over
    model.parameters() in order (one group, no fused/foreach variants, no wrapper state), which the
    influence step continues and which anyone can load without this package."""
    from tqdm.auto import tqdm
    torch.manual_seed(cfg.seed)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    per_step = cfg.global_batch_size
    steps = [order[i:i + per_step] for i in range(0, len(order), per_step)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / max(1, len(steps))))
    device = next(model.parameters()).device
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    log = []
    for k, step_ids in enumerate(tqdm(steps, desc="warm-up", unit="step", disable=not progress)):
        chunk = [examples[i] for i in step_ids]
        tokens = sum(e.num_targets for e in chunk)  # token mean over the whole optimizer step
        total = 0.0
        with precision_context(precision, device):
            for batch in length_batches(chunk, cfg.micro_batch_size, pad_id, device):
                loss_sum, _ = token_loss_sum(model, batch)
                (loss_sum / tokens).backward()
                total += float(loss_sum.detach())
        log.append({"step": k + 1, "lr": schedule.get_last_lr()[0], "loss": total / tokens, "tokens": tokens})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return optimizer, log


def optimizer_info(optimizer: torch.optim.AdamW) -> dict:
    group = optimizer.param_groups[0]
    steps = {int(float(s["step"])) for s in optimizer.state.values()} or {0}
    return {"lr": group["lr"], "betas": list(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "step": max(steps), "params": len(group["params"]),
            "lr_note": "learning rate of the next step (the probing step), as the scheduler sets it"}


def save_warmup(folder: Path, model, tokenizer, optimizer: torch.optim.AdamW) -> None:
    """Write model/, optimizer.pt and optimizer.json; the model dir appears whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder / "model", ignore_errors=True)
    tmp.rename(folder / "model")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
    (folder / "optimizer.pt.tmp").replace(folder / "optimizer.pt")
    atomic_write_json(folder / "optimizer.json", optimizer_info(optimizer))


def load_warmup(folder: Path, device: str = "auto"):
    """(model in fp32 on device, tokenizer, AdamW state_dict) from a saved warm-up folder.

    The optimizer state stays on the host: the influence engine moves the moments to the device after
    computing ∇L_ref, so that its fp32 accumulation and the moments never share the device."""
    folder = Path(folder)
    for name in ("model", "optimizer.pt"):
        if not (folder / name).exists():
            raise InputError(f"{folder / name}: missing (run the warmup stage first)")
    model, tokenizer = load_model(str(folder / "model"), device=device, dtype="float32")
    state = torch.load(folder / "optimizer.pt", map_location="cpu")
    return model, tokenizer, state


@stage("warmup", keys=STUDENT + ("split.warmup", "split.probing") + tuple(f"warmup.{k}" for k in (
           "lr", "global_batch_size", "micro_batch_size", "weight_decay", "betas", "eps", "max_length", "seed",
           "precision", "gradient_checkpointing")),
       inputs=("responses",), round_inputs=("sft",), models=("student",))
def run_warmup(ctx, responses: StageDir) -> dict:
    cfg = ctx.config
    source = responses.path / "pairs.jsonl"
    if not source.exists():
        raise InputError(f"{source}: missing (run the responses stage first)")
    warm, probe = split_pairs(read_jsonl(source, Pair), cfg.split.warmup, cfg.split.probing)
    atomic_write_json(ctx.dir.file("split.json"), {"warmup": [p.id for p in warm], "probing": [p.id for p in probe]})
    device = resolve_device(cfg.models.device)
    model, tokenizer = load_model(ctx.student_spec(), device=str(device), dtype="float32")
    examples = [e for e in encode_pairs(tokenizer, warm, cfg.warmup.max_length) if e.num_targets > 0]
    precision = warmup_precision(cfg.warmup, device)
    optimizer, log = train_warmup(model, examples, cfg.warmup, pad_id=tokenizer.pad_token_id or 0,
                                  precision=precision, progress=ctx.progress)
    write_jsonl(ctx.dir.file("metrics.jsonl"), log)
    save_warmup(ctx.dir.path, model, tokenizer, optimizer)
    info = optimizer_info(optimizer)
    return {"warmup": len(warm), "probing": len(probe), "trained": len(examples), "steps": info["step"],
            "final_loss": round(log[-1]["loss"], 4) if log else float("nan"),
            "_extra": {"precision": precision, "probing_lr": info["lr"]}}
