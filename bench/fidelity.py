"""Fidelity of the influence estimators on real data: `linear` vs `exact`, and each precision vs fp32.

A real student (default: the embedded SmolLM2-135M-Instruct), a real warm-up on Self-Instruct seed
tasks (lr 5e-6, batch 1, so W warm-up pairs = W AdamW steps), real candidates (Self-Instruct
user-oriented tasks with human answers) and a real reference set (the shipped one, or the public
code's Alpaca-Eval/GPT-4 set). Results are appended per candidate to --out (resumable), so a long
measurement can be split over several commands; --report prints the agreement table of all files.

    python bench/fidelity.py --warmup-steps 8 --reference builtin --methods exact-fp32,linear-fp32 --out F.jsonl
    python bench/fidelity.py --report F1.jsonl F2.jsonl

Methods: ESTIMATOR-PRECISION[grad]: exact-fp32 (the truth), exact-bf16 (eval and candidate gradient in
bf16 autocast), exact-tf32, linear-fp32, linear-bf16grad (candidate gradient bf16, ∇L_ref fp32),
linear-bf16 (both bf16), linear-tf32. tf32 only differs from fp32 on CUDA. A linear method may end in
@hooks, @flat or @graphed (engine.LINEAR_KERNELS): linear-bf16grad@flat takes the candidate gradient
from a bf16 copy of the student (the fast path's precision) instead of bf16 autocast over fp32 weights.
--truth picks the method the others are compared with (default exact-fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from montessori.influence.engine import AdamWState, InfluenceEngine  # noqa: E402
from montessori.models.batching import encode_pairs  # noqa: E402
from montessori.influence.metrics import median_relative_error, sign_agreement, spearman  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = {
    "exact-fp32": ("exact", "float32", "float32"),
    "exact-tf32": ("exact", "tf32", "tf32"),
    "exact-bf16": ("exact", "bfloat16", "bfloat16"),
    "exact-bf16eval": ("exact", "bfloat16", "float32"),
    "linear-fp32": ("linear", "float32", "float32"),
    "linear-tf32": ("linear", "tf32", "tf32"),
    "linear-bf16grad": ("linear", "float32", "bfloat16"),
    "linear-bf16": ("linear", "bfloat16", "bfloat16"),
}


def reference_source(name: str) -> str:
    return {"builtin": "builtin", "alpaca": str(SHARED / "reference_alpaca_eval_gpt4_256.jsonl")}.get(name, name)


def warm_state(args, model, tokenizer):
    """Warm up once per (model, steps, seed) and cache the state under --cache."""
    from montessori.config import WarmupConfig
    from montessori.influence.warmup import save_warmup, train_warmup, load_warmup
    from montessori.readers import read_pairs
    folder = Path(args.cache) / f"warm-{args.model.replace('/', '_')}-{args.warmup_steps}"
    if not (folder / "optimizer.pt").exists():
        pairs = read_pairs(str(SHARED / "self_instruct_seed_tasks.jsonl"), limit=args.warmup_steps).records
        optimizer, log = train_warmup(model, encode_pairs(tokenizer, pairs, args.max_length),
                                      WarmupConfig(lr=5e-6, micro_batch_size=1), pad_id=tokenizer.pad_token_id,
                                      precision="float32", progress=True)
        save_warmup(folder, model, tokenizer, optimizer)
    return load_warmup(folder, args.device)


def measure(args) -> None:
    from tqdm import tqdm
    from montessori.readers import read_pairs
    from montessori.models import load_model
    from montessori.store import JsonlAppender
    model, tokenizer = load_model(args.model, device=args.device, dtype="float32")
    model, tokenizer, state_dict = warm_state(args, model, tokenizer)
    state = AdamWState.from_state_dict(state_dict, list(model.parameters()))
    reference = read_pairs(reference_source(args.reference), limit=args.num_reference).records
    candidates = read_pairs(str(SHARED / "self_instruct_user_oriented.jsonl"), limit=args.candidates).records
    ref_examples = encode_pairs(tokenizer, reference, args.reference_max_length)
    cand_examples = encode_pairs(tokenizer, candidates, args.max_length)
    setting = f"{Path(args.model).name} {args.device} W={args.warmup_steps} ref={args.reference}[:{args.num_reference}]@{args.reference_max_length}"
    with JsonlAppender(Path(args.out)) as out:
        for method in args.methods.split(","):
            name, _, kernel = method.partition("@")
            estimator, precision, grad_precision = METHODS[name]
            todo = [e for e in cand_examples if f"{method}:{e.id}" not in out]
            if not todo:
                continue
            started = time.perf_counter()
            engine = InfluenceEngine(model, state, ref_examples, pad_id=tokenizer.pad_token_id, estimator=estimator,
                                     precision=precision, grad_precision=grad_precision, eval_batch_size=8,
                                     linear_kernel=kernel or "auto")
            print(f"{method}: setup {time.perf_counter() - started:.1f}s, L_ref(before) {engine.loss_before:.5f}")
            for e in tqdm(todo, desc=method):
                r = engine.score(e)
                out.append({"id": f"{method}:{e.id}", "setting": setting, "method": method, "candidate": e.id,
                            "influence": r.influence, "status": r.status, "seconds": r.seconds,
                            "ref_loss_before": r.ref_loss_before, "ref_loss_after": r.ref_loss_after})
            engine.close()


def report(files: list[str], truth_method: str = "exact-fp32") -> None:
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    settings = sorted({r["setting"] for r in rows})
    print(f"| setting | method | n | Spearman vs {truth_method} | sign agreement | median rel. err | positive | s/cand |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in settings:
        by_method: dict[str, dict[str, dict]] = {}
        for r in rows:
            if r["setting"] == setting and r["status"] == "ok":
                by_method.setdefault(r["method"], {})[r["candidate"]] = r
        truth = by_method.get(truth_method, {})
        order = list(METHODS)
        for method, res in sorted(by_method.items(), key=lambda kv: (order.index(kv[0].split("@")[0]), kv[0])):
            ids = [i for i in res if i in truth]
            seconds = sum(res[i]["seconds"] for i in res) / len(res)
            positive = sum(res[i]["influence"] > 0 for i in res) / len(res)
            if method == truth_method or len(ids) < 3:
                print(f"| {setting} | {method} | {len(res)} | (reference) | | | {positive:.2f} | {seconds:.2f} |")
                continue
            a, b = [res[i]["influence"] for i in ids], [truth[i]["influence"] for i in ids]
            print(f"| {setting} | {method} | {len(ids)} | {spearman(a, b):.3f} | {sign_agreement(a, b):.3f} | "
                  f"{median_relative_error(a, b):.3f} | {positive:.2f} | {seconds:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--reference", default="builtin", help="builtin, alpaca (shared Alpaca-Eval GPT-4 set) or a path")
    ap.add_argument("--num-reference", type=int, default=8)
    ap.add_argument("--reference-max-length", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--methods", default="exact-fp32,linear-fp32,linear-bf16grad")
    ap.add_argument("--cache", default="/tmp/montessori-fidelity")
    ap.add_argument("--out", default="fidelity.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(SHARED), help="folder of the shared data files (../shared/data)")
    ap.add_argument("--truth", default="exact-fp32", help="the method the others are compared with")
    ap.add_argument("--report", nargs="*", help="print the agreement table of these result files and exit")
    args = ap.parse_args()
    if args.report is not None:
        report(args.report or [args.out], args.truth)
        return
    globals()["SHARED"] = Path(args.data)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    measure(args)
    report([args.out], args.truth)


if __name__ == "__main__":
    main()
