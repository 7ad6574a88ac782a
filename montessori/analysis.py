"""`montessori analyze RUN`: which kinds of synthetic data helped the student.

Every probing candidate whose influence was measured is described by six features, each assigned by
a deterministic rule from the run store alone:

  task_type           a fixed taxonomy (TASK_TYPES), the first rule of `task_type()` that matches
  instruction_length  short / medium / long, by words
  response_length     short / medium / long, by words
  has_input           whether the instruction carries its own input (a quoted text, a colon and a passage, a new line)
  seed                the seed example of the candidate's prompt it resembles most (ROUGE-L), i.e. the one it
                      was most likely written after
  round               the round it was generated in

Per feature value: count, mean influence with a 95% bootstrap interval, share positive, and the top
and bottom examples. The features that best separate high from low influence are the feature values
whose indicator correlates most with influence (point-biserial r, with a bootstrap interval), and
the two lengths (Spearman r). Influence values of different rounds come from different warm-up
states; they are pooled as they are (the `round` feature shows the difference).

Above the tables, the verdict (montessori.verdict): did the student get better at the held-out tasks,
how much of the teacher's data helped, which kinds helped most and least, and the next step. The
summary also counts the run's own seed tasks by task type (`tasks`), beside the teacher's candidates.

`analyze` writes RUN/analysis/candidates.jsonl (the features of every measured candidate) and
RUN/analysis/summary.json (what it printed; `--json` prints it instead of the table). The report
has the same numbers in its "Which data works" section, with plots, and the verdict at its top.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from montessori.errors import InputError
# The features live below the views (tests/test_layers.py: generation steers by them); task_type and
# has_input stay importable from here, where `montessori analyze` documents them.
from montessori.features import (FEATURES, INSTRUCTION_BUCKETS, RESPONSE_BUCKETS, TASK_TYPES,  # noqa: F401
                                 CandidateFeatures, has_input, measured_candidates, seed_texts, task_type)
from montessori.config import GenerationConfig
from montessori.generation.dedup import near_duplicates
from montessori.generation.prompts import detect_language
from montessori.generation.stage import run_instructions, run_responses
from montessori.influence.stage import run_influence
from montessori.store import RunStore, atomic_write_json, read_jsonl, write_jsonl
from montessori.verdict import run_verdict

BOOTSTRAP_SAMPLES = 1000
EXAMPLES = 3  # top and bottom examples kept per feature value
SEPARATORS = 8


def _rng(label: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def mean_interval(values: np.ndarray, label: str, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) < 2:
        return float(values[0]), float(values[0])
    idx = _rng(label, seed).integers(0, len(values), size=(samples, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _example(c: CandidateFeatures) -> dict:
    return {"id": c.id, "influence": c.influence, "instruction": c.instruction}


def group_stats(items: list[CandidateFeatures], label: str, seed: int = 0) -> dict:
    values = np.array([c.influence for c in items], dtype=np.float64)
    low, high = mean_interval(values, label, seed)
    ranked = sorted(items, key=lambda c: (-c.influence, c.id))
    return {"n": len(items), "mean": float(values.mean()), "ci_low": low, "ci_high": high,
            "share_positive": float((values > 0).mean()),
            "top": [_example(c) for c in ranked[:EXAMPLES]],
            "bottom": [_example(c) for c in ranked[::-1][:EXAMPLES]]}


def _order(feature: str, value) -> tuple:
    if feature == "task_type":
        return (TASK_TYPES.index(value),)
    if feature in ("instruction_length", "response_length"):
        buckets = INSTRUCTION_BUCKETS if feature == "instruction_length" else RESPONSE_BUCKETS
        return ([label for _, label in buckets].index(value),)
    return (0, value) if feature == "round" else (str(value),)


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's r is Pearson's r of these)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def _corr_interval(x: np.ndarray, y: np.ndarray, label: str, seed: int, rank: bool = False) -> tuple[float, float]:
    idx = _rng(label, seed).integers(0, len(x), size=(BOOTSTRAP_SAMPLES, len(x)))
    rs = [_corr(_ranks(x[i]), _ranks(y[i])) if rank else _corr(x[i], y[i]) for i in idx]
    return float(np.quantile(rs, 0.025)), float(np.quantile(rs, 0.975))


def separators(items: list[CandidateFeatures], seed: int = 0, top: int = SEPARATORS) -> list[dict]:
    """Feature values (and the two lengths) ranked by how strongly they go with high influence."""
    y = np.array([c.influence for c in items], dtype=np.float64)
    if len(items) < 4 or y.std() == 0:
        return []
    median = float(np.median(y))
    high, low = y > median, y < median
    rows = []
    for feature in FEATURES:
        column = [getattr(c, feature) for c in items]
        values = sorted(set(column), key=lambda v: _order(feature, v))
        found = []
        for value in values:
            x = np.array([v == value for v in column], dtype=np.float64)
            if x.sum() < 2 or x.sum() > len(x) - 2:  # an indicator that is (almost) constant separates nothing
                continue
            label = f"{feature}={value}"
            lo, hi = _corr_interval(x, y, label, seed)
            found.append({"feature": feature, "value": value, "n": int(x.sum()), "r": _corr(x, y), "ci_low": lo,
                          "ci_high": hi, "mean_with": float(y[x == 1].mean()), "mean_without": float(y[x == 0].mean()),
                          "share_high": float(x[high].mean()) if high.any() else 0.0,
                          "share_low": float(x[low].mean()) if low.any() else 0.0})
        if len(values) == 2:  # two complementary indicators: keep the one that goes with high influence
            found = [max(found, key=lambda r: r["r"])] if found else []
        rows += found
    for feature in ("instruction_chars", "response_chars"):
        x = np.array([getattr(c, feature) for c in items], dtype=np.float64)
        if x.std() == 0:
            continue
        lo, hi = _corr_interval(x, y, feature, seed, rank=True)
        rows.append({"feature": feature, "value": "(Spearman)", "n": len(items), "r": _corr(_ranks(x), _ranks(y)),
                     "ci_low": lo, "ci_high": hi, "mean_with": None, "mean_without": None,
                     "share_high": None, "share_low": None})
    rows.sort(key=lambda r: (-abs(r["r"]), r["feature"], str(r["value"])))
    return rows[:top]


def own_tasks(run_dir: Path) -> dict:
    """The run's seed tasks (with `init --tasks`, the user's own) by task type, and the language the teacher
    was asked to write in (the instructions stage's record, else detected from the seeds); {} when the
    seed file is not readable."""
    texts = list(seed_texts(run_dir).values())
    if not texts:
        return {}
    language = detect_language(texts)
    store = RunStore(run_dir)
    for round_ in store.rounds():
        try:
            language = (store.stage(round_, run_instructions).manifest() or {}).get("language", language)
        except InputError:  # a damaged manifest: status reports it; the seeds still say the language
            pass
        break
    kinds = Counter(task_type(t) for t in texts)
    return {"count": len(texts), "language": language,
            "task_types": {k: kinds[k] for k in TASK_TYPES if kinds[k]}, "held_out_repeats": held_out_repeats(run_dir)}


def held_out_repeats(run_dir: Path) -> list[dict]:
    """Held-out tasks of `init --tasks` that nearly repeat a reference task (dedup's ROUGE-L rule, over
    characters for Japanese or Chinese): the teacher was shown the one and influence measured against
    it, so the held-out result partly measures what the run saw."""
    folder = run_dir / "tasks"
    if not (folder / "eval.jsonl").exists() or not (folder / "reference.jsonl").exists():
        return []
    def text(t: dict) -> str:
        return f"{t.get('instruction', '')} {t.get('input') or ''}".strip()
    held_out, reference = read_jsonl(folder / "eval.jsonl"), read_jsonl(folder / "reference.jsonl")
    threshold = GenerationConfig.model_fields["rouge_threshold"].default
    return [{"held_out": held_out[i]["id"], "held_out_instruction": text(held_out[i]),
             "reference": reference[j]["id"], "reference_instruction": text(reference[j]), "rouge_l": f}
            for i, j, f in near_duplicates([text(t) for t in held_out], [text(t) for t in reference], threshold)]


def analyze(run_dir: str | Path, seed: int = 0) -> tuple[dict, list[CandidateFeatures]]:
    """The summary (JSON-ready, with the verdict) and the per-candidate features of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not RunStore(run_dir).rounds():
        raise InputError(f"{run_dir}: not a run directory (no round-N folders)")
    items, invalid = measured_candidates(run_dir, run_instructions, run_responses, run_influence)
    summary = {"run": str(run_dir), "measured": len(items), "invalid": invalid, "task_types": list(TASK_TYPES),
               "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "level": 0.95, "seed": seed}, "features": {},
               "separators": [], "tasks": own_tasks(run_dir)}
    if items:
        _measured_summary(summary, items, seed)
    summary["verdict"] = run_verdict(run_dir, summary).as_dict()
    return summary, items


def _measured_summary(summary: dict, items: list[CandidateFeatures], seed: int) -> None:
    summary["overall"] = {k: v for k, v in group_stats(items, "all", seed).items() if k not in ("top", "bottom")}
    summary["overall"]["share_negative"] = float(np.mean([c.influence < 0 for c in items]))
    for feature in FEATURES:
        groups: dict = {}
        for c in items:
            groups.setdefault(getattr(c, feature), []).append(c)
        summary["features"][feature] = [{"value": v, **group_stats(groups[v], f"{feature}={v}", seed)}
                                        for v in sorted(groups, key=lambda v: _order(feature, v))]
    for g in summary["features"]["seed"]:
        g["text"] = next(c.seed_text for c in items if c.seed == g["value"])
    summary["separators"] = separators(items, seed)


def write_analysis(run_dir: str | Path, seed: int = 0) -> dict:
    run_dir = Path(run_dir)
    summary, items = analyze(run_dir, seed)
    write_jsonl(run_dir / "analysis" / "candidates.jsonl", items)
    atomic_write_json(run_dir / "analysis" / "summary.json", summary)
    return summary


# --- presentation: terminal table (rich) and the report's section -----------------------------------

def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _rows(summary: dict, feature: str, width: int = 60) -> list[list[str]]:
    def label(g) -> str:
        return f"{g['value']}: {_short(g['text'], width // 2)}" if g.get("text") else str(g["value"])
    return [[label(g), str(g["n"]), f"{g['mean']:+.4g}", f"[{g['ci_low']:+.3g}, {g['ci_high']:+.3g}]",
             f"{g['share_positive']:.0%}", _short(g["top"][0]["instruction"], width),
             _short(g["bottom"][0]["instruction"], width)] for g in summary["features"].get(feature, [])]


KIND_HEADER = ["n", "mean influence", "95% CI", "positive", "best example", "worst example"]
SEPARATOR_HEADER = ["feature", "value", "n", "r", "95% CI", "mean with", "mean without", "share of top half",
                    "share of bottom half"]


def _separator_rows(summary: dict) -> list[list[str]]:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    return [[s["feature"], str(s["value"]), str(s["n"]), f"{s['r']:+.2f}", f"[{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]",
             f(s["mean_with"], "+.4g"), f(s["mean_without"], "+.4g"), f(s["share_high"], ".0%"),
             f(s["share_low"], ".0%")] for s in summary["separators"]]


def print_verdict(console, verdict: dict) -> None:
    from rich.markup import escape
    console.print("[bold]Verdict[/]")
    for line in verdict["lines"]:
        console.print(f"  {escape(line)}")
    console.print(f"  [bold]Next step:[/] {escape(verdict['next_step'])}\n")


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if "verdict" in summary:
        print_verdict(console, summary["verdict"])
    if not summary["measured"]:
        console.print(f"{summary['run']}: no measured influence yet (run the influence stage)")
        return
    o = summary["overall"]
    console.print(f"[bold]{summary['run']}[/]: {summary['measured']} candidates measured ({summary['invalid']} "
                  f"invalid), mean influence {o['mean']:+.4g} [{o['ci_low']:+.3g}, {o['ci_high']:+.3g}], "
                  f"{o['share_positive']:.0%} positive")
    for feature in FEATURES:
        table = Table(title=f"influence by {feature}", title_justify="left")
        table.add_column(feature, no_wrap=True)
        for col in KIND_HEADER:
            table.add_column(col, overflow="fold")
        for row in _rows(summary, feature, 40):
            table.add_row(*row)
        console.print(table)
    table = Table(title="features that best separate high from low influence", title_justify="left")
    for col in SEPARATOR_HEADER:
        table.add_column(col)
    for row in _separator_rows(summary):
        table.add_row(*row)
    console.print(table)


def report_sections(run_dir: Path, summary: dict | None = None) -> list:
    """The report's "Which data works" sections (none before influence is measured); `summary`: the run's
    `analyze` summary, when the caller has it."""
    from montessori.sections import ReportSection
    from montessori.sections import figure as _figure
    from montessori.sections import png as _png
    if summary is None:
        summary, _ = analyze(run_dir)
    if not summary["measured"]:
        return []
    o = summary["overall"]
    kinds = ReportSection("Which data works: influence per kind of candidate")
    kinds.notes.append(f"{summary['measured']} measured candidates, mean influence {o['mean']:+.4g} (95% bootstrap "
                       f"interval {o['ci_low']:+.3g} to {o['ci_high']:+.3g}), {o['share_positive']:.0%} positive. "
                       "Features are assigned by fixed rules (montessori.analysis); RUN/analysis/ has them per "
                       "candidate after `montessori analyze`.")
    plotted = [f for f in FEATURES if f != "seed"]
    fig, axes = _figure(11, 2.2 * ((len(plotted) + 1) // 2))
    fig.clf()
    for i, feature in enumerate(plotted):
        _bars(fig.add_subplot((len(plotted) + 1) // 2, 2, i + 1), summary["features"][feature], feature)
    fig.tight_layout()
    kinds.plots.append(("Mean influence per kind (bars: 95% bootstrap interval; n = candidates)", _png(fig)))
    seeds = summary["features"]["seed"]
    fig, ax = _figure(11, max(2.5, 0.28 * len(seeds) + 1))
    _bars(ax, seeds, "seed example the candidate resembles most")
    kinds.plots.append(("Mean influence per seed example", _png(fig)))
    numbers = ReportSection("Which data works: the numbers per kind")
    for feature in FEATURES:
        numbers.tables.append(([feature] + KIND_HEADER, _rows(summary, feature, 90)))
    section = ReportSection("Which data works: features that best separate high from low influence")
    if summary["separators"]:
        section.tables.append((SEPARATOR_HEADER, _separator_rows(summary)))
        fig, ax = _figure(8, max(2.5, 0.35 * len(summary["separators"]) + 1))
        rows = summary["separators"][::-1]
        r = np.array([s["r"] for s in rows])
        err = np.array([[s["r"] - s["ci_low"] for s in rows], [s["ci_high"] - s["r"] for s in rows]])
        ax.barh(range(len(rows)), r, xerr=err, color=["#55a868" if v > 0 else "#c44e52" for v in r], capsize=3)
        ax.set_yticks(range(len(rows)), [f"{s['feature']}={s['value']}" for s in rows], fontsize=8)
        ax.axvline(0, color="#444", linewidth=0.8)
        ax.set_xlabel("correlation with influence (r, 95% bootstrap interval)")
        section.plots.append(("Features that go with high (green) and low (red) influence", _png(fig)))
    else:
        section.notes.append("too few measured candidates (or no spread) to rank features")
    examples = ReportSection("Which data works: top and bottom examples of each kind")
    for feature in ("task_type", "has_input", "round"):
        rows = []
        for g in summary["features"][feature]:
            rows += [[str(g["value"]), "top", f"{e['influence']:+.4g}", e["instruction"]] for e in g["top"]]
            rows += [[str(g["value"]), "bottom", f"{e['influence']:+.4g}", e["instruction"]]
                     for e in g["bottom"] if g["n"] > EXAMPLES or e not in g["top"]]
        examples.tables.append(([feature, "", "influence", "instruction"], rows))
    return [kinds, numbers, section, examples]


def _bars(ax, groups: list[dict], title: str) -> None:
    labels = [f"{g['value']} (n={g['n']})" for g in groups][::-1]
    means = np.array([g["mean"] for g in groups][::-1])
    err = np.array([[g["mean"] - g["ci_low"] for g in groups][::-1], [g["ci_high"] - g["mean"] for g in groups][::-1]])
    ax.barh(range(len(groups)), means, xerr=err, color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(groups)), labels, fontsize=8)
    ax.axvline(0, color="#c44e52", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)


def cmd_analyze(args) -> int:
    summary = write_analysis(args.run_dir, seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print_summary(summary)
        print(f"per-candidate features: {Path(args.run_dir) / 'analysis' / 'candidates.jsonl'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("analyze", help="which kinds of candidates helped: influence per task type, length, "
                       "input, seed and round")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_analyze)
