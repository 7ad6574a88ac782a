"""Format compliance of a teacher per prompt style: the share of samples that parse to an instruction.

Prompts are built as in stage `instructions` (8 seed examples, the same seeds and sampling: n = 4,
temperature 1.0, top_p 0.9, presence penalty 1.0); `kept` also applies the length/word/character
filters (no dedup). Prints one row per style and a few parsed examples.

    python bench/compliance.py --teacher smollm2 --styles tagged list --prompts 4
"""

from __future__ import annotations

import argparse
import random
import time

from montessori.config import GenerationConfig


def main() -> None:
    from montessori.generation.backends.base import Request, Sampling
    from montessori.generation.backends.hf import TransformersBackend
    from montessori.generation.filters import filter_reason
    from montessori.generation.prompts import build_prompt, choose_examples, parse_completion
    from montessori.readers import read_seeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--styles", nargs="+", default=["tagged", "list"])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per style (each sampled --n times)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[256, 64],
                        help="per style, in --styles order (tagged needs room for the reason)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3)
    args = parser.parse_args()
    gen = GenerationConfig()
    seeds = [(s.id, s.text) for s in read_seeds("builtin").records]
    backend = TransformersBackend.load(args.teacher, device=args.device, dtype=args.dtype)
    rows, shown = [], {}
    for style, max_new in zip(args.styles, args.max_new_tokens * len(args.styles)):
        sampling = Sampling(n=args.n, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=max_new)
        requests = []
        for i in range(args.prompts):
            examples = choose_examples(random.Random(args.seed * 1000 + i), seeds, [])
            messages, prefill = build_prompt(style, [t for _, t in examples])
            requests.append(Request(messages, prefill, seed=args.seed + i))
        t0 = time.perf_counter()
        completions = [c for r in requests for c in backend.generate([r], sampling)[0]]
        seconds = time.perf_counter() - t0
        parsed = [parse_completion(style, c.text) for c in completions]
        ok = [p for p in parsed if p is not None]
        kept = [p for p in ok if filter_reason(p, min_chars=gen.min_chars, max_chars=gen.max_chars,
                                               banned_words=gen.banned_words) is None]
        tokens = sum(c.tokens for c in completions)
        rows.append((style, len(completions), len(ok), len(kept), tokens / seconds))
        shown[style] = (ok[:args.show], [c.text for c in completions[:1]])
    print(f"\nteacher {args.teacher}, {args.prompts} prompts x n={args.n}\n")
    print(f"{'style':>8} {'samples':>8} {'parsed':>7} {'compliance':>11} {'kept':>5} {'tokens/s':>9}")
    for style, n, ok, kept, tps in rows:
        print(f"{style:>8} {n:8d} {ok:7d} {ok / n:11.0%} {kept:5d} {tps:9.1f}")
    for style, (examples, raw) in shown.items():
        print(f"\n[{style}] first raw completion: {raw[0][:300]!r}")
        for e in examples:
            print(f"  parsed: {e[:150]}")


if __name__ == "__main__":
    main()
