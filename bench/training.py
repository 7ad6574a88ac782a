"""Teacher DPO and student SFT step cost on randomly initialised real architectures, and what it
projects to at the paper's scale (DPO: 6.8K pairs, batch 2; SFT: 10K pairs, global batch 32).

    python bench/training.py --device cuda --arch tinyllama-1.1b
    python bench/training.py --device cuda --arch llama3-8b --gradient-checkpointing
    python bench/training.py --device cpu --arch smollm2-135m --seq 512 --steps 2    # the demo on a laptop

Each step is what the TRL trainers do per optimizer step, in plain torch so it runs without trl:
DPO = policy forward/backward on the batch's chosen + rejected sequences, a no-grad forward of the
frozen reference, the sigmoid loss, an AdamW step; SFT = forward/backward on `--sft-micro` sequences
repeated `32 / micro` times (gradient accumulation), an AdamW step. Sequences are random tokens of
length --seq with the first quarter as prompt (masked). bf16 weights on CUDA, fp32 on CPU. One untimed
warm-up step per mode. Needs torch and transformers only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.archs import ARCHS, build_model  # noqa: E402
from montessori.compat import enable_checkpointing  # noqa: E402
PAPER = {"dpo_pairs": 6800, "dpo_batch": 2, "sft_pairs": 10000, "sft_batch": 32}


def build(arch: str, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    model = build_model(arch, device, dtype).train()  # gradient checkpointing acts in train mode only
    if checkpointing:
        enable_checkpointing(model)
    return model


def completion_logps(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    logits = model(ids).logits[:, prompt_len - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_len:, None])[..., 0].sum(-1)


def dpo_step(policy, ref, opt, batch: int, seq: int, vocab: int, device) -> None:
    ids = torch.randint(0, vocab, (2 * batch, seq), device=device)  # chosen rows, then rejected rows
    prompt_len = seq // 4
    with torch.no_grad():
        ref_logps = completion_logps(ref, ids, prompt_len)
    logps = completion_logps(policy, ids, prompt_len)
    margin = (logps[:batch] - ref_logps[:batch]) - (logps[batch:] - ref_logps[batch:])
    loss = -F.logsigmoid(0.1 * margin).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step(model, opt, micro: int, accum: int, seq: int, vocab: int, device) -> None:
    for _ in range(accum):
        ids = torch.randint(0, vocab, (micro, seq), device=device)
        labels = ids.clone()
        labels[:, :seq // 4] = -100
        (model(ids, labels=labels).loss / accum).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, steps: int, device) -> float:
    fn()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="tiny", choices=ARCHS)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dpo-batch", type=int, default=2)
    ap.add_argument("--sft-micro", type=int, default=4)
    ap.add_argument("--sft-global", type=int, default=32)
    ap.add_argument("--modes", default="dpo,sft")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    vocab = ARCHS[args.arch]["vocab_size"]
    rows = []
    for mode in args.modes.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(args.arch, device, dtype, args.gradient_checkpointing)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=device.type == "cuda")
        if mode == "dpo":
            ref = build(args.arch, device, dtype, False).eval().requires_grad_(False)
            sec = timed(lambda: dpo_step(model, ref, opt, args.dpo_batch, args.seq, vocab, device), args.steps, device)
            steps = PAPER["dpo_pairs"] / args.dpo_batch
            tokens = 2 * args.dpo_batch * args.seq
            del ref
        else:
            accum = args.sft_global // args.sft_micro
            sec = timed(lambda: sft_step(model, opt, args.sft_micro, accum, args.seq, vocab, device), args.steps,
                        device)
            steps = PAPER["sft_pairs"] / args.sft_global
            tokens = args.sft_global * args.seq
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((mode, sec, tokens / sec, steps * sec / 3600, peak))
        del model, opt
    print(f"arch {args.arch}, device {device}, dtype {dtype}, seq {args.seq}, "
          f"checkpointing {args.gradient_checkpointing}, {args.steps} timed steps")
    print(f"{'mode':<5} {'s/step':>9} {'tokens/s':>10} {'paper-scale h':>14} {'peak GiB':>9}")
    for mode, sec, tps, hours, peak in rows:
        print(f"{mode:<5} {sec:>9.3f} {tps:>10.0f} {hours:>14.2f} {peak:>9.1f}")
    print(f"paper scale: DPO {PAPER['dpo_pairs']} pairs / batch {args.dpo_batch}; "
          f"SFT {PAPER['sft_pairs']} pairs / global batch {args.sft_global}")


if __name__ == "__main__":
    main()
