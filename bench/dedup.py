"""Time the ROUGE-L near-duplicate filter: montessori's pruned bit-parallel dedup against rouge-score.

Input: real instructions (the shipped seeds, plus ../shared/data Self-Instruct tasks when present),
grown to N by edits and splices so that many pairs are near duplicates, as in a real generation run.
rouge-score is the public code's rule (every candidate against every kept instruction); it is timed on
`--reference-n` texts and extrapolated quadratically beyond that. Decisions are compared where both run.

    python bench/dedup.py --n 1000 10000 --reference-n 1000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from montessori.generation.dedup import dedup
from montessori.readers import read_seeds

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_instructions() -> list[str]:
    texts = [s.text for s in read_seeds("builtin").records]
    for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl"):
        if (SHARED / name).exists():
            for line in (SHARED / name).read_text().splitlines():
                row = json.loads(line)
                texts.append(f"{row['instruction']} {row['instances'][0]['input']}".strip()[:400])
    return texts


def grow(texts: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(texts)
    while len(out) < n:
        a, b = rng.choice(texts).split(), rng.choice(texts).split()
        op = rng.random()
        if op < 0.4 and len(a) > 2:  # splice: head of one instruction, tail of another
            out.append(" ".join(a[: len(a) // 2] + b[len(b) // 2:]))
        elif op < 0.7 and len(a) > 2:  # drop a word
            i = rng.randrange(len(a))
            out.append(" ".join(a[:i] + a[i + 1:]))
        else:  # insert a word from another instruction
            i = rng.randrange(len(a) + 1)
            out.append(" ".join(a[:i] + [rng.choice(b)] + a[i:]))
    rng.shuffle(out)
    return out[:n]


def rouge_score_dedup(texts: list[str], threshold: float = 0.7) -> list[bool]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, keep = [], []
    for text in texts:
        ok = all(scorer.score(k, text)["rougeL"].fmeasure <= threshold for k in kept)
        keep.append(ok)
        if ok:
            kept.append(text)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--reference-n", type=int, default=1000, help="largest N timed with rouge-score")
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()
    base = real_instructions()
    print(f"{len(base)} real instructions, grown by edits/splices\n")
    print(f"{'N':>7} {'kept':>6} {'montessori s':>13} {'rouge-score s':>14} {'speed-up':>9} {'same decisions':>15}")
    ref_point = None
    for n in args.n:
        texts = grow(base, n)
        t0 = time.perf_counter()
        ours = dedup(texts, args.threshold)
        ours_s = time.perf_counter() - t0
        if n <= args.reference_n:
            t0 = time.perf_counter()
            ref = rouge_score_dedup(texts, args.threshold)
            ref_s, same = time.perf_counter() - t0, str(ref == ours)
            ref_point = (n, ref_s)
            ref_text = f"{ref_s:14.1f}"
        else:
            same = "-"
            ref_s = ref_point[1] * (n / ref_point[0]) ** 2 if ref_point else float("nan")
            ref_text = f"~{ref_s:13.0f}"
        print(f"{n:7d} {sum(ours):6d} {ours_s:13.2f} {ref_text} {ref_s / ours_s:8.0f}x {same:>15}")


if __name__ == "__main__":
    main()
