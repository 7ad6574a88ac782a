"""Where one decode step of the fast engine (generation.engine: fast) spends its time, on a random model.

Every slot is live at --context tokens (prompt + generated so far); the step is timed whole (eager, and
as the captured CUDA graph the engine replays), and in parts: the model's forward over the slot cache,
the penalties, the sampling (softmax + top-p + inverse-CDF draw) and the bookkeeping left over.
CUDA events around --steps repetitions of each part; medians over --repeats.

    python bench/decode_step.py --arch smollm2-135m --slots 256 1024 --context 320 --out step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.archs import ARCHS, build_model  # noqa: E402


def timed(fn, steps: int, repeats: int) -> float:
    """Median milliseconds per call of fn over `repeats` runs of `steps` calls (after one warm-up run)."""
    fn()
    if not torch.cuda.is_available():  # a CPU smoke test of this script: wall time, no graphs
        import time
        t0 = time.perf_counter()
        for _ in range(steps * repeats):
            fn()
        return (time.perf_counter() - t0) * 1000 / (steps * repeats)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / steps)
    return statistics.median(out)


def graph_of(fn):
    if not torch.cuda.is_available():
        return fn
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    from montessori.generation.backends.slots import (SlotEngine, _attention, _register_attention, _round_up, draw,
                                                      penalize, proposal_uniforms)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    p.add_argument("--slots", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--context", type=int, default=320, help="tokens already in every slot's cache")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.arch, device, torch.bfloat16 if device == "cuda" else torch.float32)
    assert _register_attention(), "transformers has no AttentionInterface"
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = []
    for slots in args.slots:
        engine = SlotEngine(model, [], slots)
        engine.allocate(args.context + 64, 512)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (slots // 4, args.context), generator=gen).tolist()
        with _attention(model):
            engine._fill(list(range(slots)), [(k // 4, k % 4, k) for k in range(slots)], prompts)
        engine.params.copy_(torch.tensor([1.0, 0.9, 1.0, 1.0, 10**6], dtype=torch.float32))
        view = min(engine.capacity, _round_up(args.context + 9, 128))
        cols = torch.arange(view, device=device)
        mask = torch.where(cols[None, :] <= engine.pos[:, None], 0.0, torch.finfo(torch.float32).min)
        logits = torch.randn(slots, vocab, device=device) * 3
        saved = (engine.pos.clone(), engine.count.clone())

        def forward():
            model(input_ids=engine.tok[:, None], position_ids=engine.pos[:, None],
                  attention_mask=mask[:, None, None, :], past_key_values=engine.cache, use_cache=True)

        def penalties():
            penalize(logits, engine.seen, engine.context, 1.0, 1.0)

        def sampling():
            u = proposal_uniforms(engine.seed, engine.sample, engine.count, engine.tries)
            draw(logits, u, engine.params[0], engine.params[1])

        def step():
            engine._step(view, False)
            engine.pos.copy_(saved[0])  # every repetition decodes at the same column: same cost
            engine.count.copy_(saved[1])
            engine.tries.zero_()

        with _attention(model), torch.no_grad():
            parts = {"step eager": timed(step, args.steps, args.repeats),
                     "step graphed": timed(graph_of(step), args.steps, args.repeats),
                     "forward graphed": timed(graph_of(forward), args.steps, args.repeats),
                     "penalties graphed": timed(graph_of(penalties), args.steps, args.repeats),
                     "sampling graphed": timed(graph_of(sampling), args.steps, args.repeats)}
        parts["other (graphed step - parts)"] = parts["step graphed"] - parts["forward graphed"] - \
            parts["penalties graphed"] - parts["sampling graphed"]
        row = {"arch": args.arch, "slots": slots, "context": args.context, "view": view,
               **{k: round(v, 3) for k, v in parts.items()},
               "tokens_per_s_at_full_slots": round(slots / parts["step graphed"] * 1000)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"versions": {"torch": torch.__version__,
                                                     "transformers": __import__("transformers").__version__},
                                        "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
