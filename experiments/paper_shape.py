"""Self-Instruct vs Montessori-Instruct in the paper's shape (issue 14), one command, resumable.

Instruct teacher (SmolLM2-135M-Instruct), base student (Gemma-3-270M), preset `paper-shape`. For every
seed, two arms at the same training budget (`sft.num_pairs`), each one `montessori run` (run_pipeline,
in this process: no start-up per arm):

    OUT/seed-S/self-instruct   method=self-instruct: the base teacher writes the training set
    OUT/seed-S/montessori      the whole method: probing, influence, DPO, mechanism, data, sft

Then the untrained student and both trained students are scored on held-out prompts that no stage
reads (default ../shared/data/self_instruct_user_oriented.jsonl, human-written answers):
reference-answer loss with paired bootstrap intervals per seed, and across seeds (the prompts are
resampled once for every seed and student, so the interval is the prompts' uncertainty of the
seed-mean). The eval step also writes each student's greedy answers to the first --judge-prompts
prompts, so the judge step (pairwise win rate, position-swapped and length-controlled, judged by
qwen2.5-coder-1.5b) runs afterwards anywhere, on the CPU too, from OUT/answers alone.

Every step skips what is done: stages by their manifests, losses and answers by their files. Steps:

    python experiments/paper_shape.py --out runs/paper                      # runs + eval + summary
    python experiments/paper_shape.py --out runs/paper --step runs --seeds 0  # one seed's arms only
    python experiments/paper_shape.py --out runs/paper --step teacher       # the teacher's stages only
    python experiments/paper_shape.py --out runs/paper --step judge         # win rates (CPU is fine)
    python experiments/paper_shape.py --out runs/paper --step diagnose      # what the influence rewarded
    python experiments/paper_shape.py --out runs/tiny --tiny                # dry run, tiny random models

Writes OUT/summary.json and OUT/summary.md.

Data files are arguments. Their defaults are in the public data folder ../shared/data beside the
checkout (not in the repository); where it is absent, pass the files:

  --heldout FILE    held-out prompts with trusted answers that no stage reads (default
                    ../shared/data/self_instruct_user_oriented.jsonl; read by the eval and judge steps)
  --reference FILE  every run's data.reference (default ../shared/data/reference_alpaca_eval_gpt4_256.jsonl
                    when present, else the preset's builtin set; --tiny always uses the builtin set)
  --ifeval FILE     IFEval-format prompts the eval step also answers (default
                    ../shared/data/ifeval_input_data.jsonl when present, else none)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from montessori.config import load_preset
from experiments import common
from montessori.store import RunStore, atomic_write_json, atomic_write_text
from montessori.generation.stage import run_dataset, run_instructions, run_responses  # noqa: E402
from montessori.influence.mechanism import run_mechanism  # noqa: E402
from montessori.influence.stage import run_influence  # noqa: E402
from montessori.preferences.stage import run_preferences  # noqa: E402
from montessori.training.dpo import run_dpo  # noqa: E402
from montessori.training.sft import run_sft  # noqa: E402

# Each arm's method and what it adds to the preset. `montessori-n4` probes the same number of pairs as
# `montessori` (split.* counts pairs) from a quarter of the instructions, 4 answers each, and ranks
# instructions by the mean influence of their answers (generation.responses.n; docs/experiments.md,
# the test-retest of section 5).
ARM_OVERRIDES = {"self-instruct": ["method=self-instruct"], "montessori": ["method=montessori"],
                 "montessori-n4": ["method=montessori", "generation.responses.n=4"]}
ARMS = ("self-instruct", "montessori")  # the default --arms
# The last stage of each arm that needs only the teacher: `--step teacher` runs up to it, so a GPU
# machine that has the teacher but not yet the student (models carried in pieces) is not idle.
TEACHER_UNTIL = {"self-instruct": "dataset", "montessori": "responses", "montessori-n4": "responses"}
HELDOUT = ROOT.parent / "shared" / "data" / "self_instruct_user_oriented.jsonl"
REFERENCE = ROOT.parent / "shared" / "data" / "reference_alpaca_eval_gpt4_256.jsonl"
IFEVAL = ROOT.parent / "shared" / "data" / "ifeval_input_data.jsonl"
log = logging.getLogger("paper_shape")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def arm_overrides(args, arm: str, seed: int) -> list[str]:
    """The arm's config: the preset, the sizes of the command line, the seed everywhere it is a key."""
    answers = 4 if "generation.responses.n=4" in ARM_OVERRIDES[arm] else 1
    # ~3.2 instructions kept per prompt (4 samples, the dropped ones); n answers each make n pairs.
    prompts = args.num_prompts or math.ceil((args.warmup + args.probing) / answers / 3.2)
    sizes = [f"split.warmup={args.warmup}", f"split.probing={args.probing}", f"sft.num_pairs={args.pairs}",
             f"generation.num_prompts={prompts}", f"mechanism.num_prompts={args.mechanism_prompts}"]
    if args.reference:
        sizes.append(f"data.reference={args.reference}")
    seeds = [f"seed={seed}", f"warmup.seed={seed}", f"dpo.seed={seed}", f"sft.seed={seed}"]
    # Every round writes sft.num_pairs new pairs and trains on from the last round's student, in both arms:
    # the budget stays equal.
    return [*ARM_OVERRIDES[arm], f"name={arm}-s{seed}", f"rounds={args.rounds}", *sizes, *seeds, *args.set]


def run_arms(args, teacher_only: bool = False) -> None:
    from montessori.pipeline import run_pipeline
    for seed in args.seeds:
        for arm in args.arms:
            run = args.out / f"seed-{seed}" / arm
            cfg = load_preset(args.preset, arm_overrides(args, arm, seed))
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "config.yaml", cfg.to_yaml())  # `montessori run run/config.yaml` = this
            if RunStore(run).stage(args.rounds, run_sft).manifest_path.exists() and args.trust_done:
                log.info("seed %d %s: done, skipped", seed, arm)
                continue
            started = time.time()
            log.info("seed %d %s: montessori run %s", seed, arm, run / "config.yaml")
            # Skips finished stages; the teacher's stages do not read the student's keys, so what
            # --step teacher wrote is reused as it is.
            until = TEACHER_UNTIL[arm] if teacher_only else f"{args.rounds}:sft"
            run_pipeline(cfg, run, until=until, progress=not args.quiet)
            log.info("seed %d %s: done in %.0fs", seed, arm, time.time() - started)


def style_check(args) -> list[dict]:
    """Which prompt style does the teacher follow? The instructions stage alone, once per style, on the same
    seeds and prompts count; its manifest's format compliance (samples that parsed) and kept share are
    the measure. Writes OUT/style.*; the runs keep the preset's style unless --set changes it."""
    from montessori.generation.prompts import STYLES
    from montessori.pipeline import run_pipeline
    rows = []
    for style in STYLES:
        run = args.out / "style" / style
        cfg = load_preset(args.preset, [*args.set, f"generation.prompt_style={style}",  # last: the one measured
                                        f"generation.num_prompts={args.style_prompts}", "name=style-" + style])
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", cfg.to_yaml())
        run_pipeline(cfg, run, until="instructions", progress=not args.quiet)
        counts = json.loads(RunStore(run).stage(1, run_instructions).manifest_path.read_text())["counts"]
        rows.append({"style": style, "teacher": cfg.models.teacher, "prompts": counts["prompts"],
                     "samples": counts["samples"], "well_formed": counts["format_compliance"],
                     "kept": counts["kept"], "kept_share": counts["kept"] / max(counts["samples"], 1),
                     "dropped": {k[len("dropped_"):]: v for k, v in counts.items() if k.startswith("dropped_")}})
    md = [f"# Prompt style check ({args.preset}: teacher {rows[0]['teacher']})", "",
          "| style | prompts | samples | well-formed | kept | dropped by reason |", "|---|---|---|---|---|---|"]
    md += [f"| {r['style']} | {r['prompts']} | {r['samples']} | {r['well_formed']:.3f} | {r['kept_share']:.3f} | "
           f"{', '.join(f'{k} {v}' for k, v in r['dropped'].items()) or '–'} |" for r in rows]
    return publish(args, "style", rows, md)


def students(args, seed: int) -> dict[str, str]:
    base = load_preset(args.preset, args.set).models.student
    out = {"untrained": base}
    for arm in args.arms:
        model = RunStore(args.out / f"seed-{seed}" / arm).stage(args.rounds, run_sft).path / "model"
        if (model / "config.json").exists():
            out[arm] = str(model)
    return out


def heldout_pairs(args):
    from montessori.readers import read_pairs
    return read_pairs(str(args.heldout), limit=args.eval_prompts).records


def losses_file(args, seed: int | None, name: str) -> Path:
    return args.out / "held-out" / (f"loss-{name}.json" if seed is None else f"loss-seed-{seed}-{name}.json")


def answers_file(args, seed: int | None, name: str) -> Path:
    return args.out / "answers" / (f"{name}.jsonl" if seed is None else f"seed-{seed}-{name}.jsonl")


def decode_settings(args):
    from montessori.evaluation.answers import DecodeSettings
    return DecodeSettings(temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0)


def ifeval_answers_file(args, seed: int | None, name: str) -> Path:
    return args.out / "ifeval" / (f"{name}.jsonl" if seed is None else f"seed-{seed}-{name}.jsonl")


def ifeval_conversations(args):
    from montessori.evaluation.answers import Conversation
    from montessori.evaluation.ifeval import read_prompts
    prompts = read_prompts(args.ifeval, limit=args.ifeval_prompts)
    return prompts, [Conversation(p.key, [p.prompt]) for p in prompts]


def ifeval_table(args) -> dict:
    """IFEval accuracy (prompt and instruction level, strict and loose) of every student whose answers
    exist, per seed, with the paired differences of `comparisons` and the prompt-as-answer floor. Scored
    here from the saved answers, so the GPU run only has to write them."""
    from montessori.evaluation import ifeval
    prompts, _ = ifeval_conversations(args)

    def scored(seed, name):
        path = ifeval_answers_file(args, seed, name)
        if not path.exists():
            return None
        answers = {k: v[0] for k, v in _cached_answers(path).items()}
        if not all(p.key in answers for p in prompts):
            return None  # still being answered
        return ifeval.score(prompts, answers)

    floor = ifeval.floor(prompts)
    out: dict = {"prompts": len(prompts), "max_new_tokens": args.ifeval_max_new_tokens,
                 "library": ifeval.library_version(),
                 "floor": ifeval.summarize(floor, samples=args.bootstrap), "seeds": {}}
    untrained = scored(None, "untrained")
    out["untrained"] = ifeval.summarize(untrained, samples=args.bootstrap) if untrained else None
    for seed in args.seeds:
        found = {arm: r for arm in args.arms if (r := scored(seed, arm))}
        if untrained:
            found["untrained"] = untrained
        row = {arm: ifeval.summarize(r, samples=args.bootstrap, seed=seed) for arm, r in found.items()
               if arm != "untrained"}
        for a, b in comparisons(args.arms):
            if a in found and b in found:
                row[f"{a} - {b}"] = ifeval.difference(found[a], found[b], samples=args.bootstrap, seed=seed)
        out["seeds"][seed] = row
    return out


def _cached_answers(path: Path) -> dict[str, list[str]]:
    from montessori.store import read_jsonl
    return {r["id"]: r["answers"] for r in read_jsonl(path)}


def ifeval_markdown(args, table: dict) -> list[str]:
    from montessori.evaluation.ifeval import LEVELS

    def cell(r, level):
        return fmt(r[level], r[f"{level}_low"], r[f"{level}_high"], 3) if r else "–"
    md = ["", (f"IFEval ({table['prompts']} prompts of {args.ifeval.name}, greedy answers of at most "
               f"{table['max_new_tokens']} tokens, {table['library']}): accuracy [95% bootstrap over prompts]; "
               "differences are paired (positive = the first follows more instructions)."), "",
          "| seed | student | prompt strict | prompt loose | instruction strict | instruction loose |",
          "|---|---|---|---|---|---|",
          "| – | prompt-as-answer (floor) | " + " | ".join(cell(table["floor"], lv) for lv in LEVELS) + " |"]
    if table["untrained"]:
        md.append("| – | untrained | " + " | ".join(cell(table["untrained"], lv) for lv in LEVELS) + " |")
    for seed, row in table["seeds"].items():
        for key, r in row.items():
            md.append(f"| {seed} | {key} | " + " | ".join(cell(r, lv) for lv in LEVELS) + " |")
    return md


def evaluate_students(args) -> None:
    """Per-example losses, answers for the judge and IFEval answers of every student, each model loaded once."""
    from montessori.evaluation.answers import DecodeSettings, conversations_from_pairs, generate_answers
    from montessori.evaluation.loss import example_losses
    from montessori.models import load_model
    pairs = heldout_pairs(args)
    convs = conversations_from_pairs(pairs)[:args.judge_prompts]
    ifeval_convs = ifeval_conversations(args)[1] if args.ifeval else []  # a bad file fails before any model loads
    # Greedy, as IFEval is scored; a larger batch than the loss pass (the answers are the slow part).
    ifeval_decode = DecodeSettings(temperature=0.0, max_new_tokens=args.ifeval_max_new_tokens,
                                   batch_size=args.batch_size * 4, seed=0)
    jobs = [(None, "untrained", students(args, args.seeds[0])["untrained"])]
    jobs += [(s, arm, spec) for s in args.seeds for arm, spec in students(args, s).items() if arm != "untrained"]
    for seed, name, spec in jobs:
        lf, af, jf = losses_file(args, seed, name), answers_file(args, seed, name), ifeval_answers_file(args, seed, name)
        answered = af.exists() and len(af.read_text().splitlines()) >= len(convs)
        followed = not ifeval_convs or (jf.exists() and len(jf.read_text().splitlines()) >= len(ifeval_convs))
        if lf.exists() and (answered or not args.judge_prompts) and followed:
            continue
        log.info("eval %s (seed %s): %s", name, seed, spec)
        model, tokenizer = load_model(spec, device=args.device, dtype=args.dtype)
        if not lf.exists():
            losses = example_losses(model, tokenizer, pairs, batch_size=args.batch_size, max_length=args.max_length,
                                    progress=not args.quiet)
            atomic_write_json(lf, {"spec": spec, "losses": [[e.id, e.loss_sum, e.tokens] for e in losses]})
        if args.judge_prompts:
            af.parent.mkdir(parents=True, exist_ok=True)
            generate_answers(model, tokenizer, convs, decode_settings(args), af, progress=not args.quiet)
        if ifeval_convs:
            jf.parent.mkdir(parents=True, exist_ok=True)
            generate_answers(model, tokenizer, ifeval_convs, ifeval_decode, jf, progress=not args.quiet)
        del model


def load_losses(path: Path):
    from montessori.evaluation.loss import ExampleLoss
    return [ExampleLoss(i, s, n) for i, s, n in json.loads(path.read_text())["losses"]]


def comparisons(arms) -> list[tuple[str, str]]:
    """The paired differences reported: each Montessori arm against Self-Instruct (the paper's question),
    n = 4 against n = 1, and every arm against the untrained student."""
    out = [(a, "self-instruct") for a in arms if a.startswith("montessori") and "self-instruct" in arms]
    if {"montessori", "montessori-n4"} <= set(arms):
        out.append(("montessori-n4", "montessori"))
    return out + [(a, "untrained") for a in arms]


def loss_table(args) -> dict:
    """Token-mean loss of every student per seed; paired differences per seed and across seeds."""
    from montessori.evaluation.loss import bootstrap_indices, difference, summarize, token_mean
    untrained = load_losses(losses_file(args, None, "untrained")) if losses_file(args, None, "untrained").exists() \
        else None
    out: dict = {"untrained": summarize(untrained, samples=args.bootstrap) if untrained else None, "seeds": {}}
    per_seed = {}
    for seed in args.seeds:
        found = {arm: load_losses(losses_file(args, seed, arm)) for arm in args.arms
                 if losses_file(args, seed, arm).exists()}
        if untrained:
            found["untrained"] = untrained
        row = {arm: summarize(v, samples=args.bootstrap, seed=seed) for arm, v in found.items() if arm != "untrained"}
        for a, b in comparisons(args.arms):
            if a in found and b in found:
                row[f"{a} - {b}"] = difference(found[a], found[b], samples=args.bootstrap, seed=seed)
        out["seeds"][seed] = row
        per_seed[seed] = found
    # Across seeds: the mean over seeds of each difference, prompts resampled jointly for all of them.
    complete = [s for s in args.seeds if all(k in per_seed[s] for k in (*args.arms, "untrained"))]
    if complete:
        arrays = {s: {k: (np.array([e.loss_sum for e in v]), np.array([e.tokens for e in v], dtype=float))
                      for k, v in per_seed[s].items()} for s in complete}
        n = len(untrained)
        idx = bootstrap_indices(n, args.bootstrap, 1234)
        across = {}
        for a, b in comparisons(args.arms):
            point = [token_mean(per_seed[s][a]) - token_mean(per_seed[s][b]) for s in complete]
            boot = np.mean([arrays[s][a][0][idx].sum(1) / arrays[s][a][1][idx].sum(1)
                            - arrays[s][b][0][idx].sum(1) / arrays[s][b][1][idx].sum(1) for s in complete], axis=0)
            low, high = np.percentile(boot, [2.5, 97.5])
            across[f"{a} - {b}"] = {"mean": statistics.fmean(point), "low": float(low), "high": float(high),
                                    **seed_spread(point), "seeds": complete,
                                    "example_mean_per_seed": [out["seeds"][s][f"{a} - {b}"]["example_mean_diff"]
                                                              for s in complete]}
        out["across_seeds"] = across
    return out


def seed_spread(point: list[float]) -> dict:
    """The seeds' own interval of a mean difference (t over seeds; 3 seeds make it wide). The bootstrap
    interval beside it is the prompts' uncertainty of these seeds' mean: both are reported."""
    std = statistics.stdev(point) if len(point) > 1 else 0.0
    half = T975.get(len(point) - 1, 1.96) * std / math.sqrt(len(point)) if len(point) > 1 else math.nan
    mean = statistics.fmean(point)
    return {"per_seed": point, "seed_std": std, "seed_t_low": mean - half, "seed_t_high": mean + half}


def judge_step(args) -> dict:
    """Montessori vs Self-Instruct (with --judge-all: each vs untrained too) per seed, from the saved answers
    only. Qwen2.5-Coder-1.5B on 2 CPU cores: a few seconds per judgement, 2 per prompt."""
    from montessori.evaluation.answers import conversations_from_pairs, generate_answers
    from montessori.evaluation.judge import make_judge
    from montessori.evaluation.winrate import judge_pairs, win_rate
    convs = conversations_from_pairs(heldout_pairs(args))[:args.judge_prompts]
    judge = None
    out = {}
    for seed in args.seeds:
        paths = {arm: answers_file(args, seed, arm) for arm in ARMS} | {"untrained": answers_file(args, None,
                                                                                                   "untrained")}
        if not all(p.exists() for p in paths.values()):
            log.warning("seed %d: answers missing (run --step eval first), no win rate", seed)
            continue
        answers = {k: generate_answers(None, None, convs, decode_settings(args), p) for k, p in paths.items()}
        judge = judge or make_judge(args.judge, device=args.judge_device)
        pairs = [("montessori", "self-instruct")]  # the paper's comparison; the others cost 2x more judge time
        if args.judge_all:
            pairs += [("montessori", "untrained"), ("self-instruct", "untrained")]
        for a, b in pairs:
            cache = args.out / "judgements" / f"seed-{seed}-{a}-vs-{b}-{Path(args.judge).name}.jsonl"
            cache.parent.mkdir(parents=True, exist_ok=True)
            out.setdefault(str(seed), {})[f"{a} vs {b}"] = win_rate(
                judge_pairs(judge, convs, answers[a], answers[b], cache, not args.quiet), samples=args.bootstrap,
                seed=seed)
    return out


def diagnose(args) -> list[dict]:
    """Why the arms differ, from the runs' own files: what the influence rewards (its rank correlation
    with the lengths of the candidate's instruction and response), what DPO learned from it (the
    training sets the two teachers then wrote), and the students' answers. Round 1's stages (the
    mechanism table too), whatever --rounds is. Writes OUT/diagnostics.*."""
    from montessori.influence.metrics import spearman
    from montessori.records import InfluenceResult, Pair, PreferencePair
    from montessori.store import read_jsonl
    rows = []
    for seed in args.seeds:
        r1 = RunStore(args.out / f"seed-{seed}" / "montessori")
        if not (r1.stage(1, run_influence).path / "influence.jsonl").exists():
            continue
        pairs = {p.id: p for p in read_jsonl(r1.stage(1, run_responses).path / "pairs.jsonl", Pair)}
        scored = [(r.influence, pairs[r.id]) for r in read_jsonl(r1.stage(1, run_influence).path / "influence.jsonl", InfluenceResult)
                  if r.influence is not None and r.id in pairs]
        infl = [v for v, _ in scored]
        row = {"seed": seed, "candidates": len(scored), "share_positive": sum(v > 0 for v in infl) / len(infl),
               "spearman_response_chars": spearman(infl, [len(p.response) for _, p in scored]),
               "spearman_instruction_chars": spearman(infl, [len(p.instruction) for _, p in scored])}
        # DPO sees only the instructions; how often the chosen one's response was the longer one says how
        # much of the preference is about the answer's length.
        prefs = read_jsonl(r1.stage(1, run_preferences).path / "preferences.jsonl", PreferencePair)
        row["chosen_response_longer"] = statistics.fmean(
            len(pairs[q.chosen_id].response) > len(pairs[q.rejected_id].response) for q in prefs) if prefs else None
        for arm in args.arms:
            data = read_jsonl(RunStore(args.out / f"seed-{seed}" / arm).stage(1, run_dataset).path / "pairs.jsonl", Pair)
            counts = json.loads(RunStore(args.out / f"seed-{seed}" / arm).stage(1, run_dataset).manifest_path
                                .read_text())["counts"]
            answers = answers_file(args, seed, arm)
            row[arm] = {"pairs": len(data), "instruction_chars": statistics.fmean(len(p.instruction) for p in data),
                        "response_chars": statistics.fmean(len(p.response) for p in data),
                        "duplicates_dropped_per_kept": counts.get("dropped_duplicate", 0) / counts["kept"],
                        "answer_chars": statistics.fmean(len(r["answers"][0]) for r in read_jsonl(answers))
                        if answers.exists() else None}
        rows.append(row)
    md = ["| seed | influence > 0 | rank corr. with response / instruction length | preference pairs whose chosen "
          "response is longer | training set (self-instruct vs montessori): response chars | instruction chars | "
          "duplicates dropped per kept | held-out answer chars |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["self-instruct"], r["montessori"]
        ans = (f"{a['answer_chars']:.0f} vs {b['answer_chars']:.0f}" if a["answer_chars"] and b["answer_chars"]
               else "–")
        md.append(f"| {r['seed']} | {r['share_positive']:.3f} | {r['spearman_response_chars']:+.3f} / "
                  f"{r['spearman_instruction_chars']:+.3f} | {fmt(r['chosen_response_longer'], digits=3)} | "
                  f"{a['response_chars']:.0f} vs {b['response_chars']:.0f} | "
                  f"{a['instruction_chars']:.0f} vs {b['instruction_chars']:.0f} | "
                  f"{a['duplicates_dropped_per_kept']:.2f} vs {b['duplicates_dropped_per_kept']:.2f} | {ans} |")
    return publish(args, "diagnostics", rows, md)


def publish(args, name: str, data, md: list[str]):
    return common.publish(args.out, name, data, md)


def fmt(value, low=None, high=None, digits=4) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text + (f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else "")


def mechanism_rows(args) -> list[str]:
    rows = []
    for seed in args.seeds:
        path = RunStore(args.out / f"seed-{seed}" / "montessori").stage(1, run_mechanism).path / "summary.json"
        dpo = RunStore(args.out / f"seed-{seed}" / "montessori").stage(1, run_dpo).manifest_path
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        acc = json.loads(dpo.read_text())["counts"].get("eval_reward_accuracy") if dpo.exists() else None
        cells = [fmt(m[t].get("mean_influence"), m[t].get("mean_influence_low"), m[t].get("mean_influence_high"),
                     6) + " / " + fmt(m[t].get("share_positive"), m[t].get("share_positive_low"),
                                      m[t].get("share_positive_high"), 3) for t in ("updated", "original")]
        d = m.get("difference", {})
        rows.append(f"| {seed} | {fmt(acc, digits=3)} | {cells[0]} | {cells[1]} | "
                    f"{fmt(d.get('mean_influence'), d.get('low'), d.get('high'), 6)} |")
    return rows


def write_summary(args, losses: dict, wins: dict | None, ifeval: dict | None = None) -> dict:
    summary = {"setup": {"preset": args.preset, "seeds": args.seeds, "arms": list(args.arms), "warmup": args.warmup,
                         "probing": args.probing, "pairs": args.pairs, "heldout": str(args.heldout),
                         "ifeval": str(args.ifeval) if args.ifeval else None, "overrides": args.set},
               "loss": losses, "ifeval": ifeval or {}, "win_rate": wins or {}}

    diffs = [f"{a} - {b}" for a, b in comparisons(args.arms)]
    md = [f"# paper-shape: {' vs '.join(args.arms)} ({args.preset})", "",
          (f"Held-out reference-answer loss (token mean, nats) on {args.heldout.name}; 95% bootstrap "
           "intervals over prompts; differences are paired (negative = the first predicts the answers better)."), "",
          "| seed | untrained | " + " | ".join(args.arms) + " | " + " | ".join(diffs) + " |",
          "|---|" + "---|" * (1 + len(args.arms) + len(diffs))]
    u = losses.get("untrained")
    for seed, row in losses["seeds"].items():
        cells = [fmt(u["token_mean"], u["token_mean_low"], u["token_mean_high"]) if u else "–"]
        for arm in args.arms:
            r = row.get(arm)
            cells.append(fmt(r["token_mean"], r["token_mean_low"], r["token_mean_high"]) if r else "–")
        for key in diffs:
            d = row.get(key)
            cells.append(fmt(d["token_mean_diff"], d["low"], d["high"]) if d else "–")
        md.append(f"| {seed} | " + " | ".join(cells) + " |")
    md += ["", "The same differences as the mean of each prompt's own loss per token (every prompt weighs the same):",
           "", "| seed | " + " | ".join(diffs) + " |", "|---|" + "---|" * len(diffs)]
    for seed, row in losses["seeds"].items():
        cells = [fmt(d["example_mean_diff"], d["example_low"], d["example_high"]) if (d := row.get(k)) else "–"
                 for k in diffs]
        md.append(f"| {seed} | " + " | ".join(cells) + " |")
    md.append("")
    for key, a in losses.get("across_seeds", {}).items():
        md.append(f"- across seeds {a['seeds']}: {key} = {fmt(a['mean'], a['low'], a['high'])} over prompts, "
                  f"t-interval over seeds [{a['seed_t_low']:.4f}, {a['seed_t_high']:.4f}] "
                  f"(seed std {a['seed_std']:.4f}; per seed {', '.join(f'{v:.4f}' for v in a['per_seed'])})")
    if ifeval:
        md += ifeval_markdown(args, ifeval)
    mech = mechanism_rows(args)
    if mech:
        md += ["", ("Mechanism check (fresh candidates, same prompts, same warm-up state): mean influence / "
                    "share positive [95%]"), "",
               "| seed | DPO held-out reward accuracy | updated teacher | original teacher | updated - original |",
               "|---|---|---|---|---|", *mech]
    if wins:
        md += ["", (f"Win rate judged by {args.judge} on {args.judge_prompts} prompts (position-swapped; "
                    "LC = length-controlled), percent [95%]"), "",
               "| seed | pair | win rate | LC win rate | first-position rate |", "|---|---|---|---|---|"]
        for seed, pairs in wins.items():
            for pair, w in pairs.items():
                md.append(f"| {seed} | {pair} | {fmt(w['win_rate'], w['win_rate_low'], w['win_rate_high'], 1)} | "
                          f"{fmt(w['lc_win_rate'], w['lc_win_rate_low'], w['lc_win_rate_high'], 1)} | "
                          f"{w['first_position_rate']:.2f} |")
    return publish(args, "summary", summary, md)


def sweep_overrides(chosen: dict) -> list[str]:
    """The sweep's choices as overrides: the SFT lr is also the warm-up lr (the same student, the same
    trainer); a DPO choice is taken only when its held-out accuracy was clearly above 0.5."""
    out = []
    if chosen.get("sft"):
        lr = chosen["sft"]["lr"]
        out += [f"warmup.lr={lr}", f"sft.lr={lr}", f"sft.min_lr={lr / 1000:g}"]
    if chosen.get("dpo") and chosen["dpo"].get("clearly_above_half"):
        out += [f"dpo.lr={chosen['dpo']['lr']}", f"dpo.beta={chosen['dpo']['beta']}"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step", default="all",
                   choices=("all", "style", "teacher", "runs", "eval", "judge", "summary", "diagnose"),
                   help="all = runs, eval, summary (the judge step only with --step judge); teacher = each arm's "
                        "stages that need only the teacher; style = the teacher's share of well-formed "
                        "instructions under each prompt style")
    p.add_argument("--preset", default="paper-shape")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warmup", type=int, default=256, help="warm-up pairs (split.warmup)")
    p.add_argument("--probing", type=int, default=4096, help="probing candidates per Montessori arm")
    p.add_argument("--pairs", type=int, default=4096, help="training pairs per arm and round (sft.num_pairs)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both arms; the last round's students are "
                   "evaluated (use another --out than a run with fewer rounds: answers are cached by name)")
    p.add_argument("--num-prompts", type=int, help="generation prompts (default: (warmup + probing) / 3.2)")
    p.add_argument("--mechanism-prompts", type=int, default=64)
    p.add_argument("--reference", default=str(REFERENCE) if REFERENCE.exists() else None,
                   help="data.reference (default: the method's Alpaca-Eval GPT-4 reference set beside the checkout)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides, every arm")
    p.add_argument("--sweep", type=Path, help="experiments/sweep.py's sweep.json: its chosen warm-up/SFT lr and "
                   "DPO lr/beta go before --set")
    p.add_argument("--heldout", type=Path, default=HELDOUT, help="evaluation prompts no stage reads")
    p.add_argument("--eval-prompts", type=int, help="at most this many held-out prompts for the loss (default all)")
    p.add_argument("--judge-prompts", type=int, default=64, help="prompts answered for the win rate (0 = none)")
    p.add_argument("--judge", default="qwen2.5-coder-1.5b")
    p.add_argument("--judge-device", default="auto")
    p.add_argument("--judge-all", action="store_true", help="also judge each trained student vs the untrained one")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=tuple(ARM_OVERRIDES),
                   help="the arms, each at the same training budget (default: self-instruct montessori)")
    p.add_argument("--ifeval", type=Path, default=IFEVAL if IFEVAL.exists() else None,
                   help="IFEval-format prompts (verifiable instructions) every student answers greedily in the eval "
                        "step; evaluation only (default: ../shared/data/ifeval_input_data.jsonl when present)")
    p.add_argument("--ifeval-prompts", type=int, help="at most this many IFEval prompts (default all)")
    p.add_argument("--ifeval-max-new-tokens", type=int, default=512)
    p.add_argument("--style-prompts", type=int, default=32, help="--step style: generation prompts per style")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-done", action="store_true", help="skip an arm whose sft is done without fingerprinting")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny preset, tiny random models, tiny sizes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1:  # before any run directory is written
        p.error(f"--rounds {args.rounds}: must be 1 or more")
    if args.sweep:
        args.set = sweep_overrides(json.loads(args.sweep.read_text())["chosen"]) + args.set
    if args.tiny:  # every step end to end in minutes on a CPU; the numbers mean nothing
        from montessori.presets import tiny_overrides
        # The preset on tiny random models of its architectures (qwen-gemma: Qwen2 teaching Gemma-3).
        args.set = tiny_overrides(args.preset) + args.set
        args.warmup, args.probing, args.pairs, args.mechanism_prompts = 4, 8, 8, 2
        args.eval_prompts, args.judge_prompts, args.max_new_tokens, args.bootstrap = 8, 4, 16, 200
        args.ifeval_prompts, args.ifeval_max_new_tokens, args.style_prompts = 6, 16, 2
        args.reference = None
        if args.judge == "qwen2.5-coder-1.5b":
            args.judge = "tiny-random:2"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "teacher":
        run_arms(args, teacher_only=True)
        return 0
    if args.step == "style":
        style_check(args)
        return 0
    if args.step == "diagnose":
        diagnose(args)
        return 0
    if args.step in ("all", "runs"):
        run_arms(args)
    if args.step in ("all", "eval"):
        evaluate_students(args)
    wins = None
    if args.step == "judge":
        wins = judge_step(args)
        atomic_write_json(args.out / "win_rate.json", wins)
    elif (args.out / "win_rate.json").exists():
        wins = json.loads((args.out / "win_rate.json").read_text())
    if args.step != "runs":
        write_summary(args, loss_table(args), wins, ifeval_table(args) if args.ifeval else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
