"""Influence throughput on 1, 2, 4, ... GPUs: candidates per second and scaling efficiency.

    python bench/scale.py --device cuda --backend mp --workers 1,2          # one host, no Ray needed
    python bench/scale.py --device cuda --backend ray --workers 1,2,4,8     # Ray (local or RAY_ADDRESS)
    python bench/scale.py --device cpu --arch tiny --workers 1,2 --per-worker 6   # smoke test

Each worker (one per GPU) builds a random-init model of the chosen architecture in fp32, a synthetic
AdamW state and the reference set, once, exactly like an influence worker holding the warm-up
state (montessori.influence.scorer.Scorer over an InfluenceEngine). Candidates (random
tokens, 300-600 tokens long) are fed through the same pools as the `influence` stage
(montessori.executors: RayPool, or LocalPool without Ray). Timing starts after every worker has built its state
and scored one untimed candidate, so it measures the steady state a long run lives in.

Reference set: the (prompt, response) token lengths of ../shared/data/reference_alpaca_eval_gpt4_256.jsonl
(SmolLM2 tokenizer when installed, else ~4 characters per token), cut at 1024; without that file,
256 synthetic lengths of mean ~570 tokens. Needs torch and transformers (ray only for --backend ray).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.archs import ARCHS, build_model  # noqa: E402
REFERENCE_FILE = ROOT.parent / "shared" / "data" / "reference_alpaca_eval_gpt4_256.jsonl"
MAX_LENGTH = 1024
TEMPLATE_TOKENS = 30  # chat-template tokens around a user turn and an assistant turn


def reference_lengths(n: int) -> tuple[list[tuple[int, int]], str]:
    """(prompt, response) token lengths of the real reference set, or synthetic ones."""
    if REFERENCE_FILE.exists():
        rows = [json.loads(line) for line in REFERENCE_FILE.read_text().splitlines() if line.strip()][:n]
        try:
            from montessori.models import load_tokenizer
            tok = load_tokenizer("smollm2")
            count, how = (lambda text: len(tok(text, add_special_tokens=False).input_ids)), "SmolLM2 tokenizer"
        except Exception:  # no embedded model on this machine: estimate
            count, how = (lambda text: max(1, round(len(text) / 4))), "~4 chars/token"
        out = []
        for r in rows:
            p, a = count(r["instruction"]) + TEMPLATE_TOKENS, count(r["response"])
            out.append((min(p, MAX_LENGTH - 1), max(1, min(a, MAX_LENGTH - min(p, MAX_LENGTH - 1)))))
        return out, f"{REFERENCE_FILE.name} ({how})"
    rng = random.Random(0)
    out = [(rng.randint(35, 90), int(min(900, max(10, rng.gauss(520, 230))))) for _ in range(n)]
    return out, "synthetic (mean ~570 tokens)"


def random_examples(lengths, vocab: int, prefix: str, seed: int):
    from montessori.models.batching import Example
    rng = random.Random(seed)
    out = []
    for i, (n_prompt, n_response) in enumerate(lengths):
        ids = [rng.randrange(3, vocab) for _ in range(n_prompt + n_response)]
        out.append(Example(f"{prefix}{i}", ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


def candidate_lengths(n: int, seed: int, tiny: bool) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    if tiny:
        return [(20, 40)] * n
    return [(p, rng.randint(300, 600) - p) for p in (rng.randint(40, 100) for _ in range(n))]


def build_scorer(arch: str, device: str, lengths, estimator: str, precision: str, grad_precision: str,
                 eval_batch_size: int, threads: int):
    """One worker's state, built once in the worker process: random fp32 model, synthetic AdamW
    moments (|g| ~ 1e-3), the reference set. Every worker builds the same (seed 0)."""
    import torch

    from montessori.influence.scorer import Scorer
    from montessori.influence.engine import AdamWState, InfluenceEngine
    if device == "cpu":
        torch.set_num_threads(threads)
    model = build_model(arch, device, torch.float32)
    config = model.config
    with torch.device(device):
        params = list(model.parameters())
        m = [torch.randn_like(p).mul_(1e-4) for p in params]
        v = [torch.randn_like(p).square_().mul_(1e-6) for p in params]
    state = AdamWState(m, v, step=1000, lr=5e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reference = random_examples(lengths, config.vocab_size, "ref", seed=1)
    engine = InfluenceEngine(model, state, reference, pad_id=0, estimator=estimator, precision=precision,
                             grad_precision=grad_precision, eval_batch_size=eval_batch_size)
    return Scorer(engine)


def make_pool(backend: str, factory, n: int):
    import torch
    if backend == "ray":
        from montessori.executors.ray import RayPool, init_ray
        init_ray(os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        return RayPool(factory, n, "score", gpus_per_worker=1 if torch.cuda.is_available() else 0)
    from montessori.executors.local import LocalPool
    gpus = torch.cuda.device_count()
    return LocalPool(factory, n, "score", [str(k) for k in range(n)] if gpus else None)


def measure(args, n: int, lengths, vocab: int) -> dict:
    from montessori.executors.local import chunks
    threads = max(1, (os.cpu_count() or 1) // n)
    factory = partial(build_scorer, args.arch, args.device, lengths, args.estimator, args.precision,
                      args.grad_precision, args.eval_batch_size, threads)
    tiny = args.arch == "tiny"
    started = time.perf_counter()
    pool = make_pool(args.backend, factory, n)
    try:
        # Untimed: one candidate per worker (n tasks on n idle workers), after every worker has built
        # its state (RayPool: the first task waits for it; LocalPool: its constructor does).
        warm = random_examples(candidate_lengths(n, 99, tiny), vocab, "warm", seed=99)
        pool.map(chunks(warm, 1), lambda r: None, key=lambda r: r.id)
        setup = time.perf_counter() - started
        cands = random_examples(candidate_lengths(args.per_worker * n, 7, tiny), vocab, "cand", seed=7)
        results = []
        t0 = time.perf_counter()
        stats = pool.map(chunks(cands, 1), results.append, key=lambda r: r.id)
        seconds = time.perf_counter() - t0
    finally:
        pool.close()
    bad = [r for r in results if r.status != "ok"]
    return dict(workers=n, candidates=len(cands), seconds=seconds, rate=len(cands) / seconds, setup=setup,
                per_worker=[stats.per_worker.get(k, 0) for k in range(n)], invalid=len(bad),
                mean_tokens=sum(len(c.input_ids) for c in cands) / len(cands),
                values={r.id: r.influence for r in results})


def main() -> None:
    try:
        import ray  # noqa: F401
        default_backend = "ray"
    except ImportError:
        default_backend = "mp"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default=default_backend, choices=["ray", "mp"])
    ap.add_argument("--arch", default="tinyllama-1.1b", choices=list(ARCHS))
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure (one GPU each)")
    ap.add_argument("--per-worker", type=int, default=32, help="timed candidates per worker")
    ap.add_argument("--estimator", default="linear", choices=["linear", "exact"])
    ap.add_argument("--precision", default="float32", choices=["float32", "tf32", "bfloat16"])
    ap.add_argument("--grad-precision", default=None, choices=["float32", "tf32", "bfloat16"],
                    help="default: bfloat16 for linear on CUDA, else float32 (the influence stage's auto)")
    ap.add_argument("--reference", type=int, default=256)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.grad_precision is None:
        args.grad_precision = "bfloat16" if args.estimator == "linear" and args.device == "cuda" else "float32"
    import torch
    counts = [int(x) for x in args.workers.split(",") if x]
    if args.device == "cuda":
        available = torch.cuda.device_count() if args.backend == "mp" else None
        if available is not None:
            skipped = [n for n in counts if n > available]
            counts = [n for n in counts if n <= available]
            if skipped:
                print(f"skipping {skipped} workers: this host has {available} GPUs")
    lengths, source = reference_lengths(args.reference)
    if args.arch == "tiny":
        lengths = [(min(a, 32), min(b, 64)) for a, b in lengths]
    vocab = ARCHS[args.arch]["vocab_size"]
    print(f"{args.arch}, {args.estimator} (reference pass {args.precision}, candidate gradient {args.grad_precision}), "
          f"backend {args.backend}, device {args.device}")
    print(f"reference: {len(lengths)} examples, {sum(a + b for a, b in lengths)} tokens from {source}")

    rows = [measure(args, n, lengths, vocab) for n in counts]
    base = rows[0]["rate"] / rows[0]["workers"]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    print(f"\n{args.arch} on {name}; {args.per_worker} timed candidates per worker "
          f"({rows[0]['mean_tokens']:.0f} tokens on average), after one untimed candidate per worker")
    print("| workers | candidates | seconds | candidates/s | speed-up | scaling efficiency | per worker | setup s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['candidates']} | {r['seconds']:.2f} | {r['rate']:.3f} | "
              f"{r['rate'] / rows[0]['rate']:.2f}x | {100 * r['rate'] / (base * r['workers']):.0f}% | "
              f"{'/'.join(map(str, r['per_worker']))} | {r['setup']:.1f} |")
    # Every worker holds the same state: a candidate's value must not depend on who scored it.
    first = rows[0]["values"]
    for r in rows[1:]:
        shared = [k for k in first if k in r["values"]]
        diff = max((abs(first[k] - r["values"][k]) for k in shared), default=0.0)
        print(f"max |Δ influence| {r['workers']} workers vs {rows[0]['workers']}: {diff:.2e} over {len(shared)} candidates")


if __name__ == "__main__":
    main()
