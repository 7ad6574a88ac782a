"""Evaluation speed: the reference-answer loss and answer generation, on randomly initialised real
architectures.

    python bench/eval.py --device cuda --arch tinyllama-1.1b
    python bench/eval.py --device cuda --arch llama3-8b --dtype bfloat16
    python bench/eval.py --device cpu --arch tiny --examples 32 --new-tokens 16      # smoke test

loss: the 256 reference examples' real (prompt, response) lengths (bench/influence.py), random
token ids; `montessori.evaluation.loss.score_examples` (lm_head on response positions only, chunked)
against the plain way (full (batch, length, vocab) logits in fp32, then cross-entropy), per batch
size: examples/s, response tokens/s and peak device memory (CUDA). The two must agree: the
relative difference of the token means is printed.
generate: greedy `model.generate` of exactly --new-tokens tokens (min_new_tokens) after the
reference prompts, left-padded batches: new tokens/s per batch size (what answer caching saves).
Needs torch and transformers only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.archs import ARCHS, build_model  # noqa: E402
from bench.influence import REFERENCE_LENGTHS, examples, sync  # noqa: E402
from montessori.evaluation.loss import score_examples, token_mean  # noqa: E402
from montessori.models.batching import length_batches  # noqa: E402


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


@torch.no_grad()
def plain_token_mean(model, exs, batch_size, device) -> float:
    total, count = 0.0, 0
    for batch in length_batches(sorted(exs, key=lambda e: len(e.input_ids)), batch_size, 0, device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum"))
        count += int((batch.labels[:, 1:] != -100).sum())
    return total / count


def bench_loss(model, exs, batch_sizes, device) -> list[list[str]]:
    rows = []
    tokens = sum(sum(1 for y in e.labels[1:] if y != -100) for e in exs)
    for bs in batch_sizes:
        for name in ("montessori", "full logits"):
            peak_reset(device)
            sync(device)
            started = time.perf_counter()
            try:
                if name == "montessori":
                    value = token_mean(score_examples(model, exs, batch_size=bs))
                else:
                    value = plain_token_mean(model, exs, bs, device)
            except torch.OutOfMemoryError:
                rows.append([name, str(bs), "OOM", "", "", ""])
                torch.cuda.empty_cache()
                continue
            sync(device)
            seconds = time.perf_counter() - started
            if name == "montessori":
                reference = value
            rows.append([name, str(bs), f"{len(exs) / seconds:.1f}", f"{tokens / seconds:,.0f}",
                         f"{peak_gib(device):.1f}", f"{abs(value - reference) / reference:.1e}"])
    return rows


@torch.no_grad()
def bench_generate(model, prompts, batch_sizes, new_tokens, device) -> list[list[str]]:
    rows = []
    for bs in batch_sizes:
        chunk = prompts[:bs]
        width = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding, as the answers module does
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        peak_reset(device)
        sync(device)
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        sync(device)
        seconds = time.perf_counter() - started
        rows.append([str(bs), f"{bs * new_tokens / seconds:,.0f}", f"{seconds:.2f}", f"{peak_gib(device):.1f}"])
    return rows


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="tinyllama-1.1b", choices=sorted(ARCHS))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--gen-batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.arch, device, dtype)
    lengths = [tuple(int(x) for x in pair.split(":")) for pair in REFERENCE_LENGTHS.split()][: args.examples]
    exs = examples(lengths, model.config.vocab_size, "ref", random.Random(0))
    print(f"arch {args.arch}, {dtype}, device {device}, {len(exs)} reference examples, torch {torch.__version__}")
    table("reference-answer loss", ["method", "batch", "examples/s", "tokens/s", "peak GiB", "rel. diff"],
          bench_loss(model, exs, [int(b) for b in args.batch_sizes.split(",")], device))
    prompts = [e.input_ids[: next(i for i, y in enumerate(e.labels) if y != -100)] for e in exs]
    table(f"answer generation (greedy, {args.new_tokens} new tokens)", ["batch", "new tokens/s", "seconds", "peak GiB"],
          bench_generate(model, prompts, [int(b) for b in args.gen_batch_sizes.split(",")], args.new_tokens, device))


if __name__ == "__main__":
    main()
