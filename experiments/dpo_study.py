"""Can the teacher learn the preference? DPO of the teacher on finished probing rounds, under several
pairing rules, each judged on the same held-out generation prompts.

Issue 14's DPO never reached a held-out reward accuracy clearly above 0.5 (0.52-0.57 in the 3-seed
runs), and the influence it learns from rank-correlates +0.33..+0.47 with the length of the answer,
which the instruction DPO trains on only partly decides. This study retrains the teacher from each
run's own files (RUN/round-1: instructions, responses, influence), once per pairing rule (VARIANTS)
and DPO lr, and measures every trained teacher on the held-out pairs of *every* rule:

  held-out prompts  20% of the run's generation prompts (seeded), the same for every rule: no rule
                    trains on a prompt any other rule is judged on;
  accuracy          the share of held-out pairs whose implicit reward beta·(log π − log π_ref) is
                    larger for chosen than for rejected (TRL's rewards/accuracies, pair by pair:
                    montessori.training.dpo.heldout_wins), with a 95% bootstrap interval that
                    resamples prompts (a prompt's pairs share candidates, so they are not independent).

`--step probe` asks the same question without training anything (CPU, seconds): how well a
bag-of-words logistic regression on the raw completions DPO trains on predicts which side of a pair
was chosen, cross-validated over prompt groups (scikit-learn; `pip install scikit-learn`), next to how
often the chosen candidate simply had the longer answer. Writes OUT/probe.json and OUT/probe.md.

Every result is appended to OUT/study.jsonl as soon as it is measured (a re-run measures only what is
missing). Writes OUT/study.json and OUT/study.md (per run and pooled over runs), and prints the table.
No data file of its own: everything comes from the run directories given as --runs.

    python experiments/dpo_study.py --out runs/dpo-study --runs runs/paper/seed-{0,1,2}/montessori
    python experiments/dpo_study.py --out runs/dpo-study-tiny --tiny     # dry run: tiny random models
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from montessori.config import load_preset
from experiments.common import publish
from montessori.store import JsonlAppender, RunStore, atomic_write_json, read_jsonl
from montessori.generation.stage import run_instructions, run_responses  # noqa: E402
from montessori.influence.stage import run_influence  # noqa: E402

# Pairing rules (preferences.* overrides on top of the preset's rank rule).
VARIANTS = {
    "rank": {},                                                      # what the 3-seed runs trained on
    "rank+length": {"control_length": True},                         # the length-controlled influence
    "best": {"best_vs_worst": True},                                 # one pair a prompt: the widest gap
    "best+length": {"best_vs_worst": True, "control_length": True},
}
log = logging.getLogger("dpo_study")


def load_round(run: Path):
    from montessori.records import Candidate, GenerationPrompt, InfluenceResult, Pair
    r1 = RunStore(run)
    prompts = {p.id: p for p in read_jsonl(r1.stage(1, run_instructions).path / "prompts.jsonl", GenerationPrompt)}
    candidates = {c.id: c for c in read_jsonl(r1.stage(1, run_instructions).path / "candidates.jsonl", Candidate)}
    influence = read_jsonl(r1.stage(1, run_influence).path / "influence.jsonl", InfluenceResult)
    responses = {p.id: p for p in read_jsonl(r1.stage(1, run_responses).path / "pairs.jsonl", Pair)}
    return prompts, candidates, influence, responses


def variant_pairs(run_files, preferences_cfg, names) -> dict:
    from montessori.preferences.stage import make_preferences
    prompts, candidates, influence, responses = run_files
    return {name: make_preferences(prompts, candidates, influence,
                                   preferences_cfg.model_copy(update=VARIANTS[name]), responses)[0]
            for name in names}


def heldout_prompts(influence, candidates, fraction: float) -> set[str]:
    ids = sorted({candidates[r.id].prompt_id for r in influence if r.id in candidates})
    random.Random(0).shuffle(ids)
    return set(ids[:max(1, round(fraction * len(ids)))])


def bootstrap(wins: list[tuple[str, bool]], samples: int, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high): the 95% interval resamples prompts with their pairs."""
    by_prompt: dict[str, list[bool]] = {}
    for prompt_id, won in wins:
        by_prompt.setdefault(prompt_id, []).append(won)
    groups = list(by_prompt.values())
    rng = random.Random(seed)
    stats = []
    for _ in range(samples):
        pick = [groups[rng.randrange(len(groups))] for _ in groups]
        stats.append(sum(map(sum, pick)) / sum(map(len, pick)))
    stats.sort()
    acc = sum(w for _, w in wins) / len(wins)
    return acc, stats[int(0.025 * samples)], stats[min(samples - 1, int(0.975 * samples))]


def study_run(args, cfg, run: Path, out: JsonlAppender) -> None:
    from montessori.models import load_model
    from montessori.training.dpo import completion_logps, heldout_wins, train_dpo
    files = load_round(run)
    held_ids = heldout_prompts(files[2], files[1], args.heldout_fraction)
    pairs = variant_pairs(files, cfg.preferences, args.variants)
    held = {n: [p for p in ps if p.prompt_id in held_ids] for n, ps in pairs.items()}
    todo = [(n, lr) for n in args.variants for lr in args.lrs if f"{run.name}:{run.parent.name}:{n}:{lr:g}" not in out]
    if not todo:
        return
    ref_file = args.out / f"reference-{run.parent.name}-{run.name}.json"  # the untrained teacher's log-probs
    if ref_file.exists():
        ref = json.loads(ref_file.read_text())
    else:
        teacher, tokenizer = load_model(cfg.models.teacher, cfg.models.device, cfg.models.dtype)
        ref = {n: completion_logps(teacher, tokenizer, ps, cfg.dpo.max_length) for n, ps in held.items()}
        atomic_write_json(ref_file, ref)
        del teacher
    for name, lr in todo:
        started = time.time()
        train = [p for p in pairs[name] if p.prompt_id not in held_ids]
        model, tokenizer = load_model(cfg.models.teacher, cfg.models.device, cfg.models.dtype)
        reference = load_model(cfg.models.teacher, cfg.models.device, cfg.models.dtype)[0].eval()
        dpo = cfg.dpo.model_copy(update={"lr": lr, "min_lr": lr / 1000, "epochs": args.epochs})
        work = args.out / f".trainer-{run.parent.name}-{run.name}"
        trained, history, _ = train_dpo(model, tokenizer, train, dpo, ref_model=reference, output_dir=work,
                                        progress=not args.quiet)
        shutil.rmtree(work, ignore_errors=True)
        row = {"id": f"{run.name}:{run.parent.name}:{name}:{lr:g}", "run": str(run), "variant": name, "lr": lr,
               "epochs": args.epochs, "beta": dpo.beta, "train_pairs": len(train), "heldout_prompts": len(held_ids),
               "train_loss": statistics.fmean(e["loss"] for e in history if "loss" in e), "on": {}}
        for judged, ps in held.items():
            if not ps:
                continue
            wins = heldout_wins(completion_logps(trained, tokenizer, ps, dpo.max_length), ref[judged])
            acc, low, high = bootstrap(list(zip((p.prompt_id for p in ps), wins)), args.bootstrap)
            row["on"][judged] = {"pairs": len(ps), "accuracy": acc, "low": low, "high": high,
                                 "wins": [[p.prompt_id, w] for p, w in zip(ps, wins)],
                                 "chosen_response_longer": statistics.fmean(
                                     len(files[3][p.chosen_id].response) > len(files[3][p.rejected_id].response)
                                     for p in ps)}
        row["seconds"] = round(time.time() - started, 1)
        log.info("%s %s lr %g: %s", run, name, lr, {k: round(v["accuracy"], 3) for k, v in row["on"].items()})
        out.append(row)
        del model, reference, trained


def table(rows: list[dict], samples: int) -> tuple[list[str], list[dict]]:
    """Rows: variant x lr; columns: accuracy on the rule's own held-out pairs per run, pooled over runs,
    and pooled on the rank rule's held-out pairs (one yardstick for all)."""
    runs = sorted({r["run"] for r in rows})
    md = ["| rule | lr | train pairs | " + " | ".join(f"own held-out, {Path(r).parent.name}" for r in runs)
          + " | own held-out, pooled [95%] | rank's held-out, pooled [95%] | own: chosen answer longer |",
          "|---|---|---|" + "---|" * len(runs) + "---|---|---|"]
    pooled = []
    for name in VARIANTS:
        for lr in sorted({r["lr"] for r in rows if r["variant"] == name}):
            mine = {r["run"]: r for r in rows if r["variant"] == name and r["lr"] == lr}
            cells = []
            for run in runs:
                on = mine.get(run, {}).get("on", {}).get(name)
                cells.append(f"{on['accuracy']:.3f} [{on['low']:.3f}, {on['high']:.3f}] ({on['pairs']})" if on else "–")
            entry = {"variant": name, "lr": lr}
            for judged in (name, "rank"):
                # Pooled over runs: prompts are distinct per run, so a run's prompt ids are made unique.
                wins = [(f"{run}:{pid}", w) for run, r in mine.items() for pid, w in r["on"].get(judged, {}).get("wins", [])]
                entry[judged if judged == "rank" else "own"] = bootstrap(wins, samples) if wins else None
            if name == "rank":
                entry["own"] = entry["rank"]
            longer = [r["on"][name]["chosen_response_longer"] for r in mine.values() if name in r["on"]]
            entry["train_pairs"] = sum(r["train_pairs"] for r in mine.values())
            pooled.append(entry)

            def f(v):
                return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "–"
            longer_cell = f"{statistics.fmean(longer):.3f}" if longer else "–"
            md.append(f"| {name} | {lr:g} | {entry['train_pairs']} | " + " | ".join(cells) +
                      f" | {f(entry['own'])} | {f(entry.get('rank'))} | {longer_cell} |")
    return md, pooled


def probe(args, cfg) -> list[dict]:
    """Per run and rule: 5-fold (by prompt) accuracy of a logistic regression on hashed word 1-2-grams
    of chosen minus rejected completion, each pair seen in both orientations."""
    try:
        import numpy as np
        from scipy.sparse import vstack
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GroupKFold
    except ImportError:
        raise SystemExit("dpo_study --step probe needs scikit-learn: pip install scikit-learn") from None
    vectorize = HashingVectorizer(ngram_range=(1, 2), n_features=2 ** 16, alternate_sign=False, norm="l2")
    rows = []
    for run in args.runs:
        files = load_round(run)
        for name, prefs in variant_pairs(files, cfg.preferences, args.variants).items():
            x = vectorize.transform([p.chosen for p in prefs]) - vectorize.transform([p.rejected for p in prefs])
            groups = [p.prompt_id for p in prefs]
            right = []
            for train, test in GroupKFold(n_splits=5).split(x, groups=groups):
                both = np.r_[np.ones(len(train)), np.zeros(len(train))]  # a pair and its mirror image
                model = LogisticRegression(C=1.0, max_iter=1000).fit(vstack([x[train], -x[train]]), both)
                right += list(model.decision_function(x[test]) > 0)
            longer = [len(files[3][p.chosen_id].response) > len(files[3][p.rejected_id].response) for p in prefs]
            rows.append({"run": str(run), "variant": name, "pairs": len(prefs),
                         "probe_accuracy": float(np.mean(right)), "chosen_response_longer": float(np.mean(longer))})
            log.info("probe %s %s: %s", run, name, rows[-1])
    md = ["| run | rule | pairs | chosen answer longer | bag-of-words probe on the completions (5-fold by prompt) |",
          "|---|---|---|---|---|"]
    md += [f"| {Path(r['run']).parent.name} | {r['variant']} | {r['pairs']} | {r['chosen_response_longer']:.3f} | "
           f"{r['probe_accuracy']:.3f} |" for r in rows]
    return publish(args.out, "probe", rows, md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, nargs="*", default=[],
                   help="run directories of finished probing rounds (RUN/round-1/influence done)")
    p.add_argument("--preset", default="paper-shape", help="the teacher, the DPO settings and the rank rule")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 5e-5])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--step", default="all", choices=("all", "table", "probe"),
                   help="all = train and measure, table = only the table, probe = the bag-of-words probe (no training)")
    p.add_argument("--tiny", action="store_true", help="dry run: a tiny run made here, tiny random models")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def tiny_run(out: Path) -> Path:
    """A tiny preset's run until influence (tiny random models, CPU): the study's dry-run input."""
    from montessori.pipeline import run_pipeline
    run = out / "tiny-run" / "montessori"
    cfg = load_preset("tiny", ["split.warmup=4", "split.probing=24", "generation.num_prompts=10"])
    run.mkdir(parents=True, exist_ok=True)
    run_pipeline(cfg, run, until="influence", progress=False)
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.preset, args.lrs, args.bootstrap = "tiny", [1e-3], 200
        args.set = [*args.set, "preferences.rule=rank"]
        args.runs = args.runs or [tiny_run(args.out)]
    cfg = load_preset(args.preset, args.set)
    if args.step == "probe":
        probe(args, cfg)
        return 0
    with JsonlAppender(args.out / "study.jsonl") as out:
        if args.step == "all":
            for run in args.runs:
                study_run(args, cfg, run, out)
        rows = list(out.records)
    md, pooled = table(rows, args.bootstrap)
    md = [f"# DPO study: teacher {cfg.models.teacher}, beta {cfg.dpo.beta}, {args.epochs} epoch(s); held-out "
          f"reward accuracy, 95% bootstrap over prompts (pairs in brackets)", "", *md]
    publish(args.out, "study", {"rows": [{k: v for k, v in r.items() if k != "on"} |
                                         {"on": {j: {k: v for k, v in o.items() if k != "wins"} for j, o in r["on"].items()}}
                                         for r in rows], "pooled": pooled}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
