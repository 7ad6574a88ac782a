"""Real tokens/s of the transformers backend's two engines, old (`generate`) and new (`fast`), in one call.

The stage's sampling (temperature 1.0, top_p 0.9, presence penalty 1.0, n samples per prompt),
prompts of --prompt-len tokens, up to --new-tokens per row. A random model almost never emits its
EOS token, so rows end like a teacher's do only if told: --mean-len L makes the first V/L token ids
end-of-sequence tokens (each step ends a row with probability ~1/L, a geometric length distribution);
0 = no row ever stops. Only real tokens count (a row's tokens up to and including its EOS).

Per batch size B (sequences decoded at once, `generation.batch_size`) each engine generates --waves
calls of B rows (B / n prompts each), as the instructions stage calls it; `fast-1call` hands the
fast engine all rows in one call (continuous batching refills ended rows with waiting ones). Each
engine runs once untimed first (compilation, CUDA-graph capture) at the same sizes.

    python bench/generate.py --model smollm2 --device cpu --batch-sizes 8 16 --new-tokens 64
    python bench/generate.py --arch smollm2-135m --device cuda --batch-sizes 64 256 1024 \\
        --new-tokens 1024 --mean-len 256 --out bench/results/generate-smollm2.json

--arch builds a random-initialised model of a real architecture (no download, no tokenizer: prompts
are random token ids), so it runs on a bare GPU machine with torch + transformers only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.archs import ARCHS, build_model  # noqa: E402


def build(args):
    """(model, tokenizer or None); eos ids are set by main."""
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.arch:
        return build_model(args.arch, device, dtype, eos_token_id=None, bos_token_id=None), None
    from montessori.models.load import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype)


def real_tokens(row: list[int], eos: set[int]) -> int:
    end = next((i for i, t in enumerate(row) if t in eos), None)
    return len(row) if end is None else end + 1


def main() -> None:
    from montessori.generation.backends.base import Sampling
    from montessori.generation.backends.hf import TransformersBackend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model spec (ignored with --arch)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-initialised architecture instead of --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (instructions stage: 4)")
    parser.add_argument("--mean-len", type=int, default=0, help="mean row length via V/L EOS ids; 0 = never stop")
    parser.add_argument("--waves", type=int, default=2, help="calls of B rows per engine and batch size")
    parser.add_argument("--old-waves", type=int, help="waves of the generate engine (default --waves): its "
                        "rate does not depend on how many calls it gets, and it is the slow one")
    parser.add_argument("--engines", nargs="+", default=["generate", "fast", "fast-1call"],
                        choices=("generate", "fast", "fast-1call"))
    parser.add_argument("--compile", nargs="+", default=["auto"], choices=("auto", "on", "graphs", "off"),
                        help="fast engine modes to measure, each as its own row")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    model, tokenizer = build(args)
    vocab = model.get_output_embeddings().weight.shape[0]
    eos = list(range(1, 1 + vocab // args.mean_len)) if args.mean_len else []
    model.generation_config.eos_token_id = eos or None
    sampling = Sampling(n=args.n, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=args.new_tokens)
    name = args.arch or args.model
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    print(f"{name} on {gpu or args.device} ({args.dtype}, {versions}), prompt {args.prompt_len} tokens, up to "
          f"{args.new_tokens} new, n={args.n}, mean length {args.mean_len or 'unbounded'}, {args.waves} waves\n")
    print(f"{'batch':>6} {'engine/compile':>18} {'seconds':>9} {'real tok':>9} {'tok/s':>9} {'vs old':>7}")
    results = []
    gen = torch.Generator().manual_seed(0)
    for bs in args.batch_sizes:
        per_call = max(1, bs // args.n)
        prompts = torch.randint(vocab // 2, vocab, (per_call * args.waves, args.prompt_len), generator=gen).tolist()
        seeds = list(range(len(prompts)))
        base = None
        # (engine, compile mode): the old engine once, each fast variant per compile mode; the two fast
        # variants of a mode share one backend (its compiled graphs and buffers).
        variants = [(e, m) for m in args.compile for e in args.engines if e != "generate"]
        if "generate" in args.engines:
            variants.insert(0, ("generate", "off"))
        backends = {}
        for engine, mode in variants:
            fresh = (engine == "generate", mode) not in backends
            backend = backends.setdefault((engine == "generate", mode), TransformersBackend(
                model, tokenizer, engine=engine.split("-")[0], compile=mode, slots=bs))
            backend.eos_ids = eos
            calls = [prompts] if engine == "fast-1call" else \
                [prompts[i:i + per_call] for i in range(0, len(prompts), per_call)]
            if engine == "generate" and args.old_waves:
                calls = calls[:args.old_waves]
            warmup = 0.0
            if fresh:  # warm-up, untimed: compilation and CUDA-graph capture at every size the timed run meets
                t0 = time.perf_counter()
                short = Sampling(n=args.n, max_new_tokens=2) if engine == "generate" else sampling
                backend.generate_tokens(prompts[:per_call], seeds[:per_call], short)
                warmup = time.perf_counter() - t0
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rows = []
            for k, call in enumerate(calls):
                start = k * per_call
                rows += backend.generate_tokens(call, seeds[start:start + len(call)], sampling)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            tokens = sum(real_tokens(r, set(eos)) for r in rows)
            rate = tokens / seconds
            base = base or (rate if engine == "generate" else None)
            ran = backend.engine + (f"/{backend.compile}" if backend.engine == "fast" else "")
            label = engine if engine == "generate" else f"{engine}/{mode}"
            results.append({"model": name, "batch": bs, "engine": engine, "compile": mode, "ran": ran,
                            "seconds": round(seconds, 3), "real_tokens": tokens, "tokens_per_s": round(rate, 1),
                            "rows": len(rows), "warmup_s": round(warmup, 1),
                            # row-steps whose top-p proposals all missed (the last call's): they decode again
                            "waited_row_steps": int(backend._fast.waited) if backend.engine == "fast" else None})
            ratio = f"{rate / base:6.2f}x" if base else "      -"
            print(f"{bs:6d} {label:>18} {seconds:9.2f} {tokens:9d} {rate:9.0f} {ratio}  (ran {ran}, warm-up "
                  f"{warmup:.0f} s)", flush=True)
            if args.out:  # after every result: a call cut short by a time limit keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "versions": versions, "gpu": gpu, "results": results},
                                               indent=1) + "\n")
        del backends
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
