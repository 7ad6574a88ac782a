"""Self-Instruct vs Montessori-Instruct at the smollm2-demo scale, several seeds (docs/experiments.md).

For every seed: one `montessori run` with `method=self-instruct` and one with `method=montessori`
(same preset, teacher, student, seed and training budget `sft.num_pairs`), then `montessori eval` of
[self-instruct, montessori, untrained base] on held-out prompts with human-written answers:
reference-answer loss over every example, and a pairwise win rate against the Self-Instruct student
on the first --winrate-prompts prompts with a local judge. Runs go through the CLI, exactly as a user
would type them; jobs run --workers at a time, each with OMP_NUM_THREADS=--threads. Re-running the
script skips what is done (every run and eval is resumable), then prints the summary table and
writes ROOT/summary.json and ROOT/summary.md.

Data files are arguments. The public data folder ../shared/data (beside a checkout of the project,
not in it) holds the default; a clone without it passes its own file:

  --heldout FILE   held-out prompts with trusted answers, read by the eval step only (default
                   ../shared/data/self_instruct_user_oriented.jsonl, relative to the working directory)

The runs' seed and reference sets are the preset's (`builtin`); others go in as overrides, e.g.
`data.reference=FILE`.

    python experiments/small_scale.py --root runs/experiment --seeds 0 1 2 \
        --heldout ../shared/data/self_instruct_user_oriented.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("self-instruct", "montessori")


def sh(cmd: list[str], log: Path, threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] start {' '.join(cmd)}", flush=True)
    with log.open("a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"[{time.strftime('%H:%M:%S')}] rc={rc} after {time.time() - started:.0f}s: {' '.join(cmd)}", flush=True)
    if rc != 0:
        raise SystemExit(f"failed (rc {rc}): {' '.join(cmd)}; log: {log}")


def run_job(root: Path, method: str, seed: int, preset: str, overrides: list[str], threads: int) -> None:
    run = root / f"{method}-s{seed}"
    if not (run / "config.yaml").exists():
        sh(["montessori", "init", str(run), "--preset", preset], root / "init.log", threads)
    sh(["montessori", "run", str(run / "config.yaml"), f"method={method}", f"seed={seed}",
        *overrides], run / "driver.log", threads)


def eval_seed(root: Path, seed: int, args) -> None:
    runs = [str(root / f"{m}-s{seed}") for m in METHODS]
    common = ["--prompts", args.heldout, "--seed", str(seed), "--no-progress", "--batch-size", "8"]
    limit = ["--max-examples", str(args.loss_prompts)] if args.loss_prompts else []
    sh(["montessori", "eval", *runs, args.base, *common, *limit, "--out", str(root / f"eval-loss-s{seed}")],
       root / f"eval-s{seed}.log", args.threads)
    if args.judge:
        sh(["montessori", "eval", *runs, *common, "--judge", args.judge, "--max-examples", str(args.winrate_prompts),
            "--max-new-tokens", str(args.max_new_tokens), "--out", str(root / f"eval-judge-s{seed}")],
           root / f"eval-s{seed}.log", args.threads)


def _metrics(path: Path) -> list[dict]:
    return json.loads(path.read_text())["metrics"] if path.exists() else []


def summarize(root: Path, seeds: list[int]) -> dict:
    """Per seed and metric: the value with its 95% interval; across seeds: mean and sample std."""
    rows: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        names = {f"self-instruct-s{seed}": "self-instruct", f"montessori-s{seed}": "montessori"}
        for kind in ("loss", "judge"):
            for e in _metrics(root / f"eval-{kind}-s{seed}" / "eval.json"):
                if e["metric"] not in ("loss", "loss_diff", "win_rate", "lc_win_rate"):
                    continue
                if kind == "judge" and e["metric"] in ("loss", "loss_diff"):
                    continue  # the judged eval's loss is over the first prompts only
                student = names.get(e["student"], "base")
                label = f"{e['metric']} {student}" + (" vs self-instruct" if e.get("baseline") else "")
                rows.setdefault(label, {})[seed] = e
        # The runs' own eval stage: the trained student vs the base one on the builtin reference set.
        from montessori.evaluation.stage import run_eval
        from montessori.store import RunStore
        for run_name, student in names.items():
            m = RunStore(root / run_name).stage(1, run_eval).manifest_path
            if m.exists():
                c = json.loads(m.read_text())["counts"]
                rows.setdefault(f"builtin-reference loss {student}", {})[seed] = {
                    "value": c["loss_trained"], "low": None, "high": None}
                rows.setdefault(f"builtin-reference loss_diff {student} vs base", {})[seed] = {
                    "value": c["loss_diff"], "low": c.get("loss_diff_low"), "high": c.get("loss_diff_high")}
    summary = {}
    for label, by_seed in rows.items():
        values = [by_seed[s]["value"] for s in seeds if s in by_seed and by_seed[s]["value"] is not None]
        summary[label] = {
            "per_seed": {s: [by_seed[s]["value"], by_seed[s].get("low"), by_seed[s].get("high")] for s in by_seed},
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
    return summary


def markdown(summary: dict, seeds: list[int]) -> str:
    def cell(v):
        if v is None:
            return "-"
        value, low, high = v
        return f"{value:.4f} [{low:.4f}, {high:.4f}]" if low is not None else f"{value:.4f}"
    head = "| metric | " + " | ".join(f"seed {s} (95% CI)" for s in seeds) + " | mean ± std over seeds |"
    lines = [head, "|" + "---|" * (len(seeds) + 2)]
    for label, row in summary.items():
        spread = f"{row['mean']:.4f} ± {row['std']:.4f}" if row["std"] is not None else (
            f"{row['mean']:.4f}" if row["mean"] is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cell(row["per_seed"].get(s)) for s in seeds) + f" | {spread} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="runs/experiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="smollm2-demo")
    p.add_argument("--heldout", default="../shared/data/self_instruct_user_oriented.jsonl")
    p.add_argument("--base", default="smollm2", help="the untrained student, evaluated alongside")
    p.add_argument("--judge", default="smollm2", help="local judge spec; '' = loss only")
    p.add_argument("--loss-prompts", type=int, default=None, help="held-out examples for the loss (default: all)")
    p.add_argument("--winrate-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--defer", nargs="*", default=[], metavar="RUN",
                   help="runs to queue last, e.g. montessori-s0 while an earlier driver still runs it")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. sft.num_pairs=256")
    args = p.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        # Longest jobs first so that the workers finish together.
        jobs = [(m, s) for m in ("montessori", "self-instruct") for s in args.seeds]
        jobs.sort(key=lambda job: f"{job[0]}-s{job[1]}" in args.defer)  # stable: the rest keep their order
        with ThreadPoolExecutor(args.workers) as pool:
            runs = {(m, s): pool.submit(run_job, root, m, s, args.preset, args.overrides, args.threads)
                    for m, s in jobs}
            evals = []
            for s in args.seeds:
                for m in METHODS:
                    runs[(m, s)].result()
                evals.append(pool.submit(eval_seed, root, s, args))
            for f in evals:
                f.result()
    summary = summarize(root, args.seeds)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary, args.seeds)
    (root / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
