"""One whole round through `montessori run`, each stage's seconds and throughput read from its manifest;
optionally the same round with a second checkout of the code, side by side, in the same call.

    python bench/round.py --preset smollm2-demo --size gpu8x --run-dir /tmp/round --out round.json
    python bench/round.py --preset smollm2-demo --size gpu8x --run-dir /tmp/round --compare-src ../old-checkout
    python bench/round.py --preset tiny --run-dir /tmp/round-tiny models.device=cpu    # a smoke test

--size names a set of overrides (gpu8x: the issue-18 H200 round, 8x the demo: 256 prompts, 128
warm-up + 512 probing candidates, 1024 training pairs); any further KEY=VALUE overrides follow it.
Each checkout runs as `python -m montessori.cli` with PYTHONPATH and the working directory set to
that tree, in a fresh run directory RUN_DIR/<label>, one after the other. Throughput is tokens/s
where the stage counts tokens (generation stages: real tokens, from the manifest), else optimizer
steps/s (warmup, dpo, sft) or candidates/s (influence). Stage seconds include loading the models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))  # run as a script from anywhere
SIZES = {
    "preset": [],
    # sft.micro_batch_size 32: the demo's 4 is launch-bound on a GPU (1.41 s per optimizer step vs 0.24,
    # bench/sft_stage.py); the same global batch, so the same loss.
    "gpu8x": ["generation.num_prompts=256", "split.warmup=128", "split.probing=512", "sft.num_pairs=1024",
              "sft.micro_batch_size=32"],
}


def cli(src: Path, *args: str) -> None:
    # The checkout first; what PYTHONPATH held already stays after it (wheels installed with --target).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "montessori.cli", *args], cwd=src, env=env, check=True)


def commit(src: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or None


def stage_rows(run: Path) -> list[dict]:
    from montessori.pipeline import STAGE_NAMES
    manifests = [json.loads(p.read_text()) for p in run.glob("round-*/*/manifest.json")]
    order = {name: i for i, name in enumerate(STAGE_NAMES)}
    rows = []
    for m in sorted(manifests, key=lambda m: (m["round"], order.get(m["stage"], len(order)))):
        counts, seconds = m.get("counts", {}), m.get("seconds") or 0.0
        if "tokens" in counts:
            rate, unit = counts.get("tokens_per_s") or counts["tokens"] / max(seconds, 1e-9), "tok/s"
        elif counts.get("steps"):
            rate, unit = counts["steps"] / max(seconds, 1e-9), "steps/s"
        elif counts.get("candidates"):
            rate, unit = counts["candidates"] / max(seconds, 1e-9), "cand/s"
        else:
            rate, unit = None, ""
        rows.append({"round": m["round"], "stage": m["stage"], "seconds": seconds, "rate": rate, "unit": unit,
                     "counts": counts})
    return rows


def run_round(label: str, src: Path, args, overrides: list[str]) -> dict:
    run = args.run_dir / label
    shutil.rmtree(run, ignore_errors=True)
    cli(src, "init", str(run), "--preset", args.preset)
    start = time.perf_counter()
    cli(src, "run", str(run / "config.yaml"), *overrides)
    return {"label": label, "src": str(src), "commit": commit(src), "wall_s": time.perf_counter() - start,
            "stages": stage_rows(run)}


def fmt(x) -> str:
    return "-" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def table(results: list[dict]) -> str:
    keys = [(r["round"], r["stage"]) for r in results[0]["stages"]]
    by = [{(r["round"], r["stage"]): r for r in res["stages"]} for res in results]
    head = ["round", "stage"] + [f"{res['label']} {col}" for res in results for col in ("s", "rate")]
    if len(results) == 2:
        head.append("speed-up")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [str(key[0]), key[1]]
        for rows in by:
            r = rows.get(key)
            cells += ["-", "-"] if r is None else [fmt(r["seconds"]), f"{fmt(r['rate'])} {r['unit']}".strip()]
        if len(results) == 2:
            a, b = by[1].get(key), by[0].get(key)  # compare / current
            cells.append(f"{a['seconds'] / b['seconds']:.2f}x" if a and b and b["seconds"] > 0 else "-")
        lines.append("| " + " | ".join(cells) + " |")
    walls = ", ".join(f"{res['label']} {res['wall_s']:.1f} s" for res in results)
    return "\n".join(lines) + f"\n\nwhole `montessori run` (incl. start-up): {walls}"


def versions() -> dict:
    import torch
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-demo")
    ap.add_argument("--size", default="preset", choices=sorted(SIZES), help="a named set of size overrides")
    ap.add_argument("--run-dir", type=Path, required=True, help="each checkout runs in RUN_DIR/<label>")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--compare-src", type=Path, help="a second checkout to run the same round with")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (after --size's)")
    args = ap.parse_args()
    overrides = SIZES[args.size] + args.overrides
    print(f"round: preset {args.preset}, overrides {' '.join(overrides) or '(none)'}", flush=True)
    results = [run_round("current", HERE, args, overrides)]
    if args.compare_src:
        results.append(run_round("compare", args.compare_src.resolve(), args, overrides))
    print(table(results))
    if args.out:
        record = {"preset": args.preset, "size": args.size, "overrides": overrides, "versions": versions(),
                  "results": results}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
