"""Tokens/s of the transformers generation backend over batch sizes (rows per `generate` call).

The stage's sampling (temperature 1.0, top_p 0.9, presence penalty 1.0, seeded Gumbel-max sampler),
left-padded prompts of --prompt-len tokens, --new-tokens generated per row without early stop.

    python bench/generate.py --model smollm2 --device cpu --batch-sizes 1 4 8 16 32
    python bench/generate.py --arch tinyllama-1.1b --device cuda --batch-sizes 8 32 64 128 256

--arch builds a random-initialised model of a real architecture (no download, no tokenizer: prompts
are random token ids), so it runs on a bare GPU machine with torch + transformers only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.archs import ARCHS, build_model  # noqa: E402


def build(args):
    from montessori.generation.backends.hf import TransformersBackend
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.arch:
        model = build_model(args.arch, device, dtype, eos_token_id=None, bos_token_id=None)
        model.generation_config.eos_token_id = None
        return TransformersBackend(model, None), model.config.vocab_size
    from montessori.models.load import load_model
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    backend = TransformersBackend(model, tokenizer)
    backend.eos_ids = []  # measure full-length rows
    model.generation_config.eos_token_id = None
    return backend, model.config.vocab_size


def main() -> None:
    from montessori.generation.backends.base import Sampling
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model spec (ignored with --arch)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-initialised architecture instead of --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    backend, vocab = build(args)
    sampling = Sampling(n=1, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=args.new_tokens)
    name = args.arch or args.model
    print(f"{name} on {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads), prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens per row\n")
    print(f"{'batch':>6} {'seconds':>9} {'tokens/s':>10} {'ms/step':>9}")
    gen = torch.Generator().manual_seed(0)
    for bs in args.batch_sizes:
        ids = torch.randint(10, vocab, (bs, args.prompt_len), generator=gen)
        mask = torch.ones_like(ids)
        backend.generate_ids(ids[:, :8], mask[:, :8], Sampling(n=1, max_new_tokens=2), 0)  # warm-up
        best = float("inf")
        for r in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = backend.generate_ids(ids, mask, sampling, r)
            if args.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(row) for row in out)
        print(f"{bs:6d} {best:9.2f} {tokens / best:10.1f} {1000 * best / args.new_tokens:9.1f}", flush=True)


if __name__ == "__main__":
    main()
