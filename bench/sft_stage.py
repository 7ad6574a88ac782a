"""Where the `sft` stage's time goes: its own trainer (TRL SFTTrainer built by `build_sft_trainer`) on a
real model and real pairs, split into load / build / train / save, in variants that change one thing.

bench/training.py times a plain-torch step (0.169 s per optimizer step of 32 sequences for SmolLM2 on
the H200); the stage took 1.6 s per step in `bench/round.py` (docs/benchmarks.md). Variants:

- `stage`: what the stage does (fp32 master weights, models.dtype compute through autocast, the
  preset's micro batch);
- `bf16-weights`: weights loaded in bf16, no autocast (what 0.1 did; loses small AdamW steps);
- `micro-N`: the stage with micro batch N (fewer, larger forward/backward passes).

A variant named twice runs twice in the same process: the second run finds every kernel compiled
(TRL's fused log-prob head is Triton, compiled on first use and cached in ~/.triton).

The first optimizer steps of the `stage` variant are also profiled (torch.profiler, top ops by
self device time) when --profile is given.

    python bench/sft_stage.py --model smollm2 --device cuda --pairs 256 --out sft-stage.json --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference_alpaca_eval_gpt4_256.jsonl"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, args, pairs, profile: bool) -> dict:
    from montessori.config import SFTConfig
    from montessori.models import load_model
    from montessori.training.common import load_for_training, save_model_atomic
    from montessori.training.sft import build_sft_trainer

    models = types.SimpleNamespace(device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    t0 = time.perf_counter()
    if name == "bf16-weights":
        model, tokenizer = load_model(args.model, device=args.device, dtype=models.dtype)
        compute = None
    else:
        model, tokenizer, compute = load_for_training(args.model, models, lora=False)
    sync(args.device)
    t1 = time.perf_counter()
    micro = int(name.split("-")[1]) if name.startswith("micro-") else args.micro
    cfg = SFTConfig(micro_batch_size=micro, global_batch_size=32,
                    max_length=512, lr=3e-5)
    out = Path(args.work) / f"{name}-{time.monotonic_ns()}"
    trainer, _ = build_sft_trainer(model, tokenizer, pairs, cfg, output_dir=out / "trainer", compute_dtype=compute)
    t2 = time.perf_counter()
    prof = None
    if profile:
        from transformers import TrainerCallback

        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities)

        class Stop(TrainerCallback):  # profile optimizer steps 2 and 3 (step 1 warms up)
            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 1:
                    sync(args.device)
                    prof.__enter__()
                elif state.global_step == 3:
                    sync(args.device)
                    prof.__exit__(None, None, None)

        trainer.add_callback(Stop())
    trainer.train()
    sync(args.device)
    t3 = time.perf_counter()
    save_model_atomic(trainer.model, tokenizer, out / "model")
    t4 = time.perf_counter()
    steps = trainer.state.global_step
    row = {"variant": name, "micro_batch": cfg.micro_batch_size, "steps": steps, "load_s": round(t1 - t0, 2),
           "build_s": round(t2 - t1, 2), "train_s": round(t3 - t2, 2), "save_s": round(t4 - t3, 2),
           "train_s_per_step": round((t3 - t2) / max(1, steps), 3),
           "loss_first": next((e["loss"] for e in trainer.state.log_history if "loss" in e), None)}
    if prof is not None:
        key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25)
        (Path(args.work) / f"profile-{name}.txt").write_text(table)
        row["profile_top"] = table.splitlines()[:30]
        cpu_total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        dev_total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 1e6
        row["profiled_2_steps"] = {"cpu_s": round(cpu_total, 3), "device_s": round(dev_total, 3)}
    del trainer, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    from montessori.readers import read_pairs
    from montessori.records import Pair
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="the stage's micro batch (smollm2-demo: 4)")
    p.add_argument("--variants", nargs="+", default=["stage", "stage", "bf16-weights", "micro-16"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--work", default="/tmp/sft-stage")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = read_pairs(str(DATA)).records
    pairs = [Pair(id=str(i), instruction=r.instruction, response=r.response, prompt_id=str(i))
             for i, r in enumerate((rows * (1 + args.pairs // len(rows)))[:args.pairs])]
    import transformers
    import trl
    result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "model": args.model, "pairs": args.pairs, "rows": []}
    for k, name in enumerate(args.variants):
        row = run_variant(name, args, pairs, profile=args.profile and name == "stage" and args.variants[:k].count("stage") == 1)
        row["run"] = args.variants[:k + 1].count(name)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top"}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["rows"]:
        if "profile_top" in row:
            print("\n".join(row["profile_top"]))


if __name__ == "__main__":
    main()
