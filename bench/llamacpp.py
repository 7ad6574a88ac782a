"""Real tokens/s of the llama.cpp backend (a GGUF teacher, quantized, on the CPU), as bench/generate.py
measures the transformers backend: the stage's sampling (temperature 1.0, top_p 0.9, presence penalty
1.0, n samples per prompt), prompts of --prompt-len random token ids, --new-tokens per row and no early
stop (end-of-turn tokens do not end a row here), prompt decoding included in the time.

Per --parallel P (sequences decoded at once, `generation.batch_size`) it generates --rows rows in one call
(P / n prompts at a time, slots refilled as rows end), after one untimed warm-up call.

    python bench/llamacpp.py --model qwen2.5-coder-1.5b --threads 2 --parallel 1 4 8 16
    python bench/llamacpp.py --model smollm2 --threads 2 --parallel 4 16 --out bench/results/llamacpp-cpu.json
    python bench/llamacpp.py --model RUN/round-1/dpo/model ...   # a DPO-trained GGUF teacher: base + LoRA

--stage-like also times real chat prompts that end when the model ends its turn (the tokens a stage gets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from montessori.generation.backends.base import Request, Sampling  # noqa: E402
from montessori.generation.backends.llamacpp import LlamaCppBackend  # noqa: E402


class NoStop(LlamaCppBackend):
    """Rows run to --new-tokens: equal work per row, as bench/generate.py's random model does."""

    def ends(self, token: int) -> bool:
        return False


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a GGUF model spec (named model or .gguf file)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (instructions stage: 4)")
    parser.add_argument("--rows", type=int, default=32, help="rows per timed call")
    parser.add_argument("--stage-like", action="store_true", help="also: real chat prompts, rows end at EOS")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    import llama_cpp
    from montessori.generation.backends.llamacpp import adapters, gguf_source
    gguf, template = gguf_source(args.model)
    sampling = Sampling(n=args.n, temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=args.new_tokens)
    info = {"model": args.model, "file": gguf.name, "llama_cpp_python": llama_cpp.__version__,
            "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "date": datetime.date.today().isoformat()}
    print(f"{args.model} ({gguf.name}), llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new, n={args.n}, {args.rows} rows per call\n")
    print(f"{'parallel':>8} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'tok/cpu-s':>9} {'prefill tok/s':>13}  "
          f"load before/after")
    results = []
    rng = np.random.default_rng(0)
    for parallel in args.parallel:
        backend = NoStop(gguf, chat_template=template, threads=args.threads, parallel=parallel, lora=adapters(args.model))
        vocab = backend.n_vocab
        prompts = rng.integers(vocab // 4, vocab // 2, (args.rows // args.n, args.prompt_len)).tolist()
        seeds = list(range(len(prompts)))
        backend.generate_tokens(prompts[:1], seeds[:1], Sampling(n=args.n, max_new_tokens=2))  # warm-up
        # Prompt decoding alone: one prompt, one new token.
        t0 = time.perf_counter()
        backend.generate_tokens(prompts[:1], seeds[:1], Sampling(n=1, max_new_tokens=1))
        prefill = args.prompt_len / (time.perf_counter() - t0)
        before = load_average()
        t0, c0 = time.perf_counter(), time.process_time()
        rows = backend.generate_tokens(prompts, seeds, sampling)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(r) for r in rows)
        # CPU seconds of this process (all its threads): on a machine other jobs share, tokens per CPU
        # second x threads is what the same threads would write alone (no waiting for a core).
        row = {"parallel": parallel, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
               "prefill_tokens_per_s": round(prefill, 1), "load_before": before, "load_after": load_average()}
        results.append(row)
        print(f"{parallel:8d} {seconds:8.1f} {tokens:7d} {tokens / seconds:7.1f} {tokens / cpu:9.1f} {prefill:13.0f}  "
              f"{before} / {row['load_after']}", flush=True)
        backend.close()
        if args.stage_like:
            results.append(stage_like(gguf, template, args, parallel))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                            "results": results}, indent=1) + "\n")


def stage_like(gguf: Path, template: str | None, args, parallel: int) -> dict:
    """Real instructions, answered as the responses stage asks (temperature 0.6), rows end at EOS."""
    from montessori.readers import builtin_path, read_seeds
    seeds = [s.text for s in read_seeds(str(builtin_path("seeds.jsonl"))).records][:args.rows]
    backend = LlamaCppBackend(gguf, chat_template=template, threads=args.threads, parallel=parallel,
                              lora=adapters(args.model))
    requests = [Request([{"role": "user", "content": text}], seed=i) for i, text in enumerate(seeds)]
    sampling = Sampling(n=1, temperature=0.6, top_p=0.9, presence_penalty=1.0, max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    out = backend.generate(requests, sampling)
    seconds = time.perf_counter() - t0
    backend.close()
    tokens = sum(c.tokens for row in out for c in row)
    print(f"{parallel:8d} {seconds:8.1f} {tokens:7d} {tokens / seconds:7.1f} {'(answers)':>13}  {load_average()}",
          flush=True)
    return {"parallel": parallel, "stage_like": True, "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "load_after": load_average()}


if __name__ == "__main__":
    main()
