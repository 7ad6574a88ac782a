"""Fit the learning rates of a preset to its models: warm-up/SFT lr of the student, DPO lr and beta.

The paper's 8B learning rates do not move a 270M student (issue 14: 32 SFT steps at 5e-6 changed its
loss by 0.0005) nor a 135M teacher (DPO at 1e-6: reward accuracy 0.48 after 197 steps). This sweep
measures, on the project's own data only (never on evaluation prompts):

  SFT  the student is fine-tuned (the SFT stage's trainer) on the teacher's generated pairs
       (RUN/round-1/responses/pairs.jsonl) less a validation split; per lr: the validation loss before
       and after, and the loss on the reference set (data.reference). The chosen lr has the lowest
       reference loss among those that moved the validation loss by at least --min-move (relative).
  DPO  the teacher is trained (the DPO stage's trainer) on the run's preference pairs less a held-out
       split; per (lr, beta): held-out reward accuracy and margin. The chosen pair has the highest
       held-out accuracy, if the lower end of its 95% Wilson interval is above 0.5.

The data comes from one run of the preset until the `preferences` stage (done first, resumable). Every
result is appended to OUT/sft.jsonl and OUT/dpo.jsonl as soon as it is measured, so a re-run only
measures what is missing. Writes OUT/sweep.json and OUT/sweep.md, and prints the table.

    python experiments/sweep.py --out runs/sweep --probing 512 --sft-lrs 1e-5 3e-5 1e-4 3e-4 \\
        --dpo-lrs 1e-6 5e-6 2e-5 --betas 0.1 0.3
    python experiments/sweep.py --out runs/sweep-tiny --tiny        # dry run: tiny random models

The one data file is an argument: --reference FILE, the data run's data.reference and the SFT rows'
reference loss (default ../shared/data/reference_alpaca_eval_gpt4_256.jsonl, the public data folder
beside the checkout, when present; else the preset's builtin set; --tiny always uses the builtin set).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from montessori.config import load_preset
from montessori.generation.stage import run_responses  # noqa: E402
from montessori.preferences.stage import run_preferences  # noqa: E402
from montessori.store import JsonlAppender, RunStore, atomic_write_json, atomic_write_text, read_jsonl

REFERENCE = ROOT.parent / "shared" / "data" / "reference_alpaca_eval_gpt4_256.jsonl"
log = logging.getLogger("sweep")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (held-out reward accuracy over n pairs)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def token_loss(model, tokenizer, pairs, cfg) -> float:
    from montessori.evaluation.loss import example_losses, token_mean
    return token_mean(example_losses(model, tokenizer, pairs, batch_size=8, max_length=cfg.sft.max_length))


def sft_sweep(args, cfg, run: Path) -> list[dict]:
    from montessori.models import load_model
    from montessori.readers import read_pairs
    from montessori.records import Pair
    from montessori.training.common import eval_split
    from montessori.training.sft import train_sft
    pairs = read_jsonl(RunStore(run).stage(1, run_responses).path / "pairs.jsonl", Pair)
    # Split by generation prompt: the instructions sampled from one prompt land on the same side.
    train, val = eval_split(pairs, args.val_fraction, 0, key=lambda p: p.prompt_id or p.id)
    train = train[:args.max_train]
    reference = read_pairs(cfg.data.reference, limit=cfg.data.max_reference).records
    with JsonlAppender(args.out / "sft.jsonl") as out:
        for lr in [0.0, *args.sft_lrs]:  # lr 0 = the untrained student (the "before" row)
            rid = "sft-untrained" if lr == 0 else f"sft-lr{lr:g}-e{args.sft_epochs}"
            if rid in out:
                continue
            started = time.time()
            model, tokenizer = load_model(cfg.models.student, cfg.models.device, cfg.models.dtype)
            history = []
            if lr > 0:
                sft = cfg.sft.model_copy(update={"lr": lr, "min_lr": lr / 1000, "epochs": args.sft_epochs})
                work = args.out / ".trainer-sft"  # its own: --step sft and --step dpo may run at once
                model, history, _ = train_sft(model, tokenizer, train, sft, output_dir=work, progress=not args.quiet)
                shutil.rmtree(work, ignore_errors=True)
            model.eval()
            row = {"id": rid, "lr": lr, "epochs": args.sft_epochs, "train_pairs": len(train), "val_pairs": len(val),
                   "steps": max((e.get("step", 0) for e in history), default=0),
                   "train_loss_first": next((e["loss"] for e in history if "loss" in e), None),
                   "train_loss_last": next((e["loss"] for e in reversed(history) if "loss" in e), None),
                   "val_loss": token_loss(model, tokenizer, val, cfg),
                   "reference_loss": token_loss(model, tokenizer, reference, cfg),
                   "seconds": round(time.time() - started, 1)}
            log.info("sft lr %g: %s", lr, row)
            out.append(row)
            del model
        return list(out.records)


def dpo_sweep(args, cfg, run: Path) -> list[dict]:
    from montessori.models import load_model
    from montessori.records import PreferencePair
    from montessori.training.common import last_value, mean_value
    from montessori.training.dpo import eval_split, train_dpo
    prefs = read_jsonl(RunStore(run).stage(1, run_preferences).path / "preferences.jsonl", PreferencePair)
    train, held = eval_split(prefs, args.val_fraction, 0)
    train = train[:args.max_train]
    if not held:
        raise SystemExit(f"dpo sweep: {len(prefs)} preference pairs leave no held-out pair; generate more")
    with JsonlAppender(args.out / "dpo.jsonl") as out:
        for lr in args.dpo_lrs:
            for beta in args.betas:
                rid = f"dpo-lr{lr:g}-b{beta:g}-e{args.dpo_epochs}"
                if rid in out:
                    continue
                started = time.time()
                model, tokenizer = load_model(cfg.models.teacher, cfg.models.device, cfg.models.dtype)
                # With dpo.lora the reference is the teacher with its adapters off: no second copy.
                ref = None if cfg.dpo.lora else load_model(cfg.models.teacher, cfg.models.device,
                                                           cfg.models.dtype)[0].eval()
                dpo = cfg.dpo.model_copy(update={"lr": lr, "min_lr": lr / 1000, "beta": beta,
                                                 "epochs": args.dpo_epochs})
                work = args.out / ".trainer-dpo"
                _, history, _ = train_dpo(model, tokenizer, train, dpo, ref_model=ref, eval_prefs=held,
                                          output_dir=work, progress=not args.quiet)
                shutil.rmtree(work, ignore_errors=True)
                acc = last_value(history, "eval_rewards/accuracies")
                low, high = wilson(acc * len(held), len(held)) if acc is not None else (math.nan, math.nan)
                row = {"id": rid, "lr": lr, "beta": beta, "epochs": args.dpo_epochs, "train_pairs": len(train),
                       "heldout_pairs": len(held), "steps": last_value(history, "step"),
                       "train_loss": mean_value(history, "loss"), "heldout_loss": last_value(history, "eval_loss"),
                       "heldout_reward_accuracy": acc, "heldout_accuracy_low": low, "heldout_accuracy_high": high,
                       "heldout_reward_margin": last_value(history, "eval_rewards/margins"),
                       "seconds": round(time.time() - started, 1)}
                log.info("dpo lr %g beta %g: %s", lr, beta, row)
                out.append(row)
                del model, ref
        return list(out.records)


def choose(sft_rows: list[dict], dpo_rows: list[dict], min_move: float) -> dict:
    chosen: dict = {}
    before = next((r for r in sft_rows if r["lr"] == 0), None)
    if before:
        moved = [r for r in sft_rows if r["lr"] > 0 and (before["val_loss"] - r["val_loss"]) / before["val_loss"]
                 >= min_move]
        best = min(moved, key=lambda r: r["reference_loss"], default=None)
        chosen["sft"] = {"lr": best["lr"], "val_loss_change": best["val_loss"] - before["val_loss"],
                         "reference_loss_change": best["reference_loss"] - before["reference_loss"]} if best else None
    good = [r for r in dpo_rows if r["heldout_reward_accuracy"] is not None]
    best = max(good, key=lambda r: (r["heldout_reward_accuracy"], r["heldout_reward_margin"] or 0), default=None)
    if best:
        chosen["dpo"] = {"lr": best["lr"], "beta": best["beta"], "heldout_reward_accuracy":
                         best["heldout_reward_accuracy"], "clearly_above_half": best["heldout_accuracy_low"] > 0.5}
    return chosen


def table(sft_rows: list[dict], dpo_rows: list[dict], chosen: dict, setup: dict) -> str:
    def f(v, d=4):
        return "–" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else str(v))
    md = [f"# Learning-rate sweep ({setup['preset']}: teacher {setup['teacher']}, student {setup['student']})", "",
          (f"SFT of the student on {setup['train_pairs']} generated pairs, {setup['val_pairs']} held out "
           f"(validation); reference set {setup['reference']}. lr 0 = untrained."), "",
          "| lr | epochs | steps | train loss first → last | validation loss | reference loss | s |",
          "|---|---|---|---|---|---|---|"]
    for r in sorted(sft_rows, key=lambda r: r["lr"]):
        md.append(f"| {f(r['lr'])} | {r['epochs']} | {r['steps']} | {f(r['train_loss_first'])} → "
                  f"{f(r['train_loss_last'])} | {f(r['val_loss'])} | {f(r['reference_loss'])} | {r['seconds']} |")
    md += ["", "DPO of the teacher on the preference pairs, held-out reward accuracy with its 95% Wilson interval.",
           "", "| lr | beta | epochs | steps | train loss | held-out accuracy [95%] | held-out margin | s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(dpo_rows, key=lambda r: (r["lr"], r["beta"])):
        md.append(f"| {f(r['lr'])} | {f(r['beta'])} | {r['epochs']} | {r['steps']} | {f(r['train_loss'])} | "
                  f"{f(r['heldout_reward_accuracy'], 3)} [{f(r['heldout_accuracy_low'], 3)}, "
                  f"{f(r['heldout_accuracy_high'], 3)}] ({r['heldout_pairs']} pairs) | "
                  f"{f(r['heldout_reward_margin'])} | {r['seconds']} |")
    md += ["", f"Chosen: {json.dumps(chosen)}"]
    return "\n".join(md) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder: the data run (OUT/run) and the results")
    p.add_argument("--preset", default="paper-shape")
    p.add_argument("--step", default="all", choices=("all", "teacher", "data", "sft", "dpo", "table"),
                   help="teacher = the data run's stages that need only the teacher (instructions, responses)")
    p.add_argument("--warmup", type=int, default=128, help="warm-up pairs of the data run")
    p.add_argument("--probing", type=int, default=512, help="probing candidates of the data run (DPO pairs)")
    p.add_argument("--reference", default=str(REFERENCE) if REFERENCE.exists() else None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--sft-lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--dpo-lrs", type=float, nargs="+", default=[1e-6, 5e-6, 2e-5])
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--dpo-epochs", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-train", type=int, default=None, help="at most this many training pairs/preferences")
    p.add_argument("--min-move", type=float, default=0.01, help="relative validation-loss drop that counts as moved")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny preset and models, a handful of steps")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from montessori.presets import tiny_overrides
    # --tiny: the preset on tiny random models of its architectures, at tiny sizes
    args.tiny_set = tiny_overrides(args.preset) if args.tiny else []
    if args.tiny:
        args.warmup, args.probing, args.reference = 4, 12, None
        args.sft_lrs, args.dpo_lrs, args.betas = [1e-4, 1e-3], [1e-4, 1e-3], [0.1]
        args.val_fraction = 0.34
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    overrides = [*args.tiny_set, f"split.warmup={args.warmup}", f"split.probing={args.probing}",
                 f"generation.num_prompts={math.ceil((args.warmup + args.probing) / 3.2)}", "mechanism.enabled=false",
                 *([f"data.reference={args.reference}"] if args.reference else []), *args.set]
    cfg = load_preset(args.preset, overrides)
    run = args.out / "run"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "teacher", "data"):
        from montessori.pipeline import run_pipeline
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", cfg.to_yaml())
        until = "responses" if args.step == "teacher" else "preferences"
        run_pipeline(cfg, run, until=until, progress=not args.quiet)  # resumable; skips what is done
        if args.step == "teacher":
            return 0
    sft_rows = sft_sweep(args, cfg, run) if args.step in ("all", "sft") else read_jsonl(args.out / "sft.jsonl")
    dpo_rows = dpo_sweep(args, cfg, run) if args.step in ("all", "dpo") else read_jsonl(args.out / "dpo.jsonl")
    chosen = choose(sft_rows, dpo_rows, args.min_move)
    setup = {"preset": args.preset, "teacher": cfg.models.teacher, "student": cfg.models.student,
             "reference": cfg.data.reference, "overrides": overrides,
             "train_pairs": sft_rows[0]["train_pairs"] if sft_rows else 0,
             "val_pairs": sft_rows[0]["val_pairs"] if sft_rows else 0}
    atomic_write_json(args.out / "sweep.json", {"setup": setup, "sft": sft_rows, "dpo": dpo_rows, "chosen": chosen})
    md = table(sft_rows, dpo_rows, chosen, setup)
    atomic_write_text(args.out / "sweep.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
