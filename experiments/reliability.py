"""How much of a candidate's influence belongs to its instruction? A test-retest of the preference label.

DPO trains the teacher on instructions only (docs/method.md, step 6), but the influence is measured on the
(instruction, answer) pair, and the answer is sampled (temperature 0.6). If two answers to the same
instruction get unrelated influence, the instruction-level preference DPO is asked to learn is mostly
the answer's luck, and no DPO setting can reach a high held-out reward accuracy (issue 14: 0.52-0.57).

For the first --candidates probing candidates of a finished run (RUN/round-1: instructions,
responses, warmup), this script
  1. answers each instruction a second time (the same teacher and sampling, another seed: `retest`),
  2. scores the original and the new pairs on the run's warm-up state with the influence stage's
     engine and settings, once against each half of the reference set (even / odd records),
and reports correlations (Pearson and Spearman, bootstrap 95% intervals over prompts):

  answer retest     I(x, y1) vs I(x, y2), both on the whole reference set (the halves' token-weighted
                    mean, which is the whole set's mean loss): how much the instruction decides;
  reference halves  I_A(x, y1) vs I_B(x, y1): how much the sample of reference answers decides;

raw, within prompt (each prompt's mean removed: what the rank rule compares), and length-adjusted
(preferences.control_length). Writes OUT/retest.jsonl (the second answers, resumable),
OUT/scores.jsonl (resumable), OUT/reliability.json and OUT/reliability.md.

No data file of its own: everything comes from --run (its records, warm-up state and config); the
reference set is the one the run's config names (data.reference).

    python experiments/reliability.py --run runs/paper/seed-0/montessori --out runs/reliability-0
    python experiments/reliability.py --out runs/reliability-tiny --tiny   # dry run: tiny random models
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from montessori.config import load_config, load_preset
from experiments.common import publish
from montessori.store import JsonlAppender, RunStore, read_jsonl
from montessori.generation.stage import run_responses  # noqa: E402
from montessori.influence.warmup import run_warmup  # noqa: E402

log = logging.getLogger("reliability")
SCORES = ("y1_A", "y1_B", "y2_A", "y2_B")  # answer (original / retest) x reference half


def second_answers(cfg, pairs, out_dir: Path, progress: bool):
    """The retest answers: the responses stage's own function, another seed, into OUT/retest.jsonl."""
    from montessori.generation.backends import make_backend
    from montessori.generation.stage import generate_responses
    from montessori.records import Candidate, Pair
    candidates = [Candidate(id=p.id, prompt_id=p.prompt_id, completion="", instruction=p.instruction) for p in pairs]
    path = out_dir / "retest.jsonl"
    if len(read_jsonl(path, Pair) if path.exists() else []) < len(candidates):
        backend = make_backend(cfg.models.teacher, cfg.generation, cfg.models)
        try:
            generate_responses(backend, cfg.generation, candidates, path, round=1, seed=cfg.seed + 7919,
                               progress=progress)
        finally:
            backend.close()
    answers = {p.id: p for p in read_jsonl(path, Pair)}
    return [answers[p.id] for p in pairs]


def score(cfg, run: Path, first, second, out_dir: Path, progress: bool) -> dict[str, dict[str, float]]:
    """{score name: {pair id: influence}}; a name whose scores are all in OUT/scores.jsonl is not redone."""
    from montessori.influence.engine import compute_influence
    from montessori.influence.settings import InfluenceSettings
    from montessori.influence.warmup import load_warmup
    from montessori.readers import read_pairs
    reference = read_pairs(cfg.data.reference, lenient=cfg.data.lenient, limit=cfg.data.max_reference).records
    halves = {"A": reference[0::2], "B": reference[1::2]}
    with JsonlAppender(out_dir / "scores.jsonl") as out:
        model = None
        for name in SCORES:
            answers, half = (first if name.startswith("y1") else second), halves[name[-1]]
            todo = [p for p in answers if f"{name}:{p.id}" not in out]
            if not todo:
                continue
            if model is None:
                model, tokenizer, state = load_warmup(RunStore(run).stage(1, run_warmup).path, cfg.models.device)
            log.info("scoring %d pairs, %s (reference half of %d)", len(todo), name, len(half))

            def keep(res, name=name):  # appended as each is measured: a killed run resumes where it stopped
                out.append({"id": f"{name}:{res.id}", "score": name, "pair": res.id, "influence": res.influence})
            compute_influence(model, state, todo, half, tokenizer=tokenizer, settings=InfluenceSettings.from_config(cfg),
                              on_result=keep, progress=progress)
        scores: dict[str, dict[str, float]] = {n: {} for n in SCORES}
        for r in out.records:
            scores[r["score"]][r["pair"]] = r["influence"]
    return scores, halves


def correlations(a: np.ndarray, b: np.ndarray, groups: list[str], samples: int, seed: int = 0) -> dict:
    def rank(v):
        return np.argsort(np.argsort(v)).astype(float)

    def both(x, y):
        return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(rank(x), rank(y))[0, 1])
    pearson, spearman = both(a, b)
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    units = list(index.values())
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(samples):
        pick = np.concatenate([units[k] for k in rng.integers(0, len(units), len(units))])
        boot.append(both(a[pick], b[pick]))
    boot = np.array(boot)
    low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    return {"pearson": pearson, "pearson_low": float(low[0]), "pearson_high": float(high[0]),
            "spearman": spearman, "spearman_low": float(low[1]), "spearman_high": float(high[1]), "n": len(a)}


def within_prompt(v: np.ndarray, groups: list[str]) -> np.ndarray:
    out = v.copy()
    for g in set(groups):
        idx = [i for i, h in enumerate(groups) if h == g]
        out[idx] -= v[idx].mean()
    return out


def report(args, first, second, scores, weights) -> dict:
    from montessori.preferences.rules import length_adjusted
    ids = [p.id for p in first if all(scores[n].get(p.id) is not None for n in SCORES)]
    groups = [p.prompt_id for p in first if p.id in set(ids)]
    s = {n: np.array([scores[n][i] for i in ids]) for n in SCORES}
    wa, wb = weights
    y1 = (wa * s["y1_A"] + wb * s["y1_B"]) / (wa + wb)
    y2 = (wa * s["y2_A"] + wb * s["y2_B"]) / (wa + wb)
    chars1 = [len(p.response) for p in first if p.id in set(ids)]
    chars2 = [len(p.response) for p in second if p.id in set(ids)]
    adj1 = np.array(length_adjusted(list(y1), chars1))
    adj2 = np.array(length_adjusted(list(y2), chars2))
    multi = [g for g in groups if groups.count(g) > 1]
    keep = [i for i, g in enumerate(groups) if g in set(multi)]  # within prompt needs 2+ candidates
    kg = [groups[i] for i in keep]
    out = {"run": str(args.run), "candidates": len(ids), "prompts": len(set(groups)), "reference_tokens": [wa, wb],
           "answer_retest": correlations(y1, y2, groups, args.bootstrap),
           "answer_retest_within_prompt": correlations(within_prompt(y1[keep], kg), within_prompt(y2[keep], kg),
                                                       kg, args.bootstrap),
           "answer_retest_length_adjusted": correlations(adj1, adj2, groups, args.bootstrap),
           "reference_halves": correlations(s["y1_A"], s["y1_B"], groups, args.bootstrap),
           "answer_length_retest": correlations(np.log(np.maximum(chars1, 1)), np.log(np.maximum(chars2, 1)),
                                                groups, args.bootstrap)}
    # If I = s(x) + e with e independent of the instruction, the retest correlation r is var(s)/var(I),
    # and a teacher that knew s exactly would order a pair as I does with probability 0.5 + asin(√r)/π
    # (Gaussian s, e): the most a held-out reward accuracy can reach on within-prompt pairs.
    w = out["answer_retest_within_prompt"]
    out["accuracy_ceiling"] = {k: 0.5 + math.asin(math.sqrt(max(w[f"pearson{k}"], 0.0))) / math.pi
                               for k in ("", "_low", "_high")}
    rows = [("answer retest: I(x, y1) vs I(x, y2)", "answer_retest"),
            ("answer retest, within prompt (the rank rule's comparison)", "answer_retest_within_prompt"),
            ("answer retest, length-adjusted influence", "answer_retest_length_adjusted"),
            ("reference halves: I_A(x, y1) vs I_B(x, y1)", "reference_halves"),
            ("log answer length: y1 vs y2", "answer_length_retest")]
    md = [f"Test-retest of the influence, {len(ids)} probing candidates of {len(set(groups))} prompts "
          f"({args.run}); 95% bootstrap over prompts.", "",
          "| what is compared | Pearson [95%] | Spearman [95%] |", "|---|---|---|"]
    for label, key in rows:
        c = out[key]
        md.append(f"| {label} | {c['pearson']:+.3f} [{c['pearson_low']:+.3f}, {c['pearson_high']:+.3f}] | "
                  f"{c['spearman']:+.3f} [{c['spearman_low']:+.3f}, {c['spearman_high']:+.3f}] |")
    c = out["accuracy_ceiling"]
    md += ["", f"Held-out accuracy a teacher that knew each instruction's expected influence could reach on "
               f"within-prompt pairs (Gaussian model, from the within-prompt Pearson r: 0.5 + asin(√r)/π): "
               f"{c['']:.3f} [{c['_low']:.3f}, {c['_high']:.3f}]."]
    return publish(args.out, "reliability", out, md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a finished run directory (RUN/config.yaml, RUN/round-1/warmup done)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--candidates", type=int, default=1024, help="the first N probing candidates")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. models.device)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--tiny", action="store_true", help="dry run: a tiny run made here, tiny random models")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from montessori.records import Pair
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from montessori.pipeline import run_pipeline
        args.run, args.bootstrap = args.out / "tiny-run", 200
        if not RunStore(args.run).stage(1, run_warmup).manifest_path.exists():
            args.run.mkdir(parents=True, exist_ok=True)
            tiny = load_preset("tiny", ["split.warmup=4", "split.probing=24", "generation.num_prompts=10"])
            (args.run / "config.yaml").write_text(tiny.to_yaml())
            run_pipeline(tiny, args.run, until="warmup", progress=False)
    if args.run is None:
        raise SystemExit("reliability: --run RUN (or --tiny)")
    cfg = load_config(args.run / "config.yaml", args.set)
    r1 = RunStore(args.run)
    probing = set(__import__("json").loads((r1.stage(1, run_warmup).path / "split.json").read_text())["probing"])
    first = [p for p in read_jsonl(r1.stage(1, run_responses).path / "pairs.jsonl", Pair) if p.id in probing][:args.candidates]
    second = second_answers(cfg, first, args.out, not args.quiet)
    scores, halves = score(cfg, args.run, first, second, args.out, not args.quiet)
    report(args, first, second, scores, half_weights(cfg, halves))
    return 0


def half_weights(cfg, halves) -> tuple[int, int]:
    """Response tokens of each reference half as the engine encodes them: the whole set's loss is the
    token mean, so its influence is the token-weighted mean of the halves' (exactly, for either estimator)."""
    from montessori.models.batching import encode_pairs
    from montessori.models.load import load_tokenizer
    tokenizer = load_tokenizer(cfg.models.student)
    length = cfg.data.reference_max_length or cfg.influence.max_length
    return tuple(sum(e.num_targets for e in encode_pairs(tokenizer, h, length)) for h in halves.values())


if __name__ == "__main__":
    raise SystemExit(main())
