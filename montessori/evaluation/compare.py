"""`montessori compare RUN_A RUN_B ...`: every metric of several runs side by side, with intervals.

A source is a run directory (its latest round's eval/results.json: the trained student), an output
folder of `montessori eval` (eval.json: each of its students), or one of those JSON files.
Writes compare.md (the table) and compare.png (one panel per metric, 95% intervals as error bars).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from montessori.errors import InputError
from montessori.evaluation.stage import RESULTS, run_eval
from montessori.store import RunStore

EVAL_JSON = "eval.json"


def _results_file(source: Path) -> tuple[Path, bool]:
    """(file, is_run): where a source keeps its results."""
    if source.is_file():
        return source, source.name == RESULTS
    if (source / EVAL_JSON).exists():
        return source / EVAL_JSON, False
    for round_ in reversed(RunStore(source).rounds()):
        path = RunStore(source).stage(round_, run_eval).path / RESULTS
        if path.exists():
            return path, True
    if source.is_dir():
        raise InputError("no evaluation results (no round-*/eval/results.json and no eval.json): "
                         "run `montessori run` through the eval stage, or `montessori eval --out` here", file=source)
    raise InputError("no such file or directory", file=source)


def load_columns(source: str | Path) -> list[tuple[str, dict[str, dict]]]:
    """[(column label, {metric: {value, low, high}})] for one source."""
    source = Path(source)
    path, is_run = _results_file(source)
    try:
        results = json.loads(path.read_text())
        entries = results["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"not an evaluation results file ({type(err).__name__}: {err})", file=path) from None
    label = source.resolve().name if source.is_dir() else path.stem
    columns: dict[str, dict[str, dict]] = {}
    for e in entries:
        if is_run and e["student"] != "trained":
            continue  # a run is represented by what it produced; its base student is every run's base
        name = label if is_run else f"{label}/{e['student']}"
        columns.setdefault(name, {})[e["metric"]] = e
    return list(columns.items())


def compare(sources: list[str | Path]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(column labels, metric names, {(metric, column): entry})."""
    columns: list[str] = []
    cells: dict[tuple[str, str], dict] = {}
    metrics: list[str] = []
    for source in sources:
        for label, values in load_columns(source):
            while label in columns:
                label += "'"
            columns.append(label)
            for name, entry in values.items():
                if name not in metrics:
                    metrics.append(name)
                cells[(name, label)] = entry
    return columns, metrics, cells


def fmt(entry: dict | None) -> str:
    if entry is None or entry.get("value") is None:
        return "–"
    value, low, high = entry["value"], entry.get("low"), entry.get("high")
    text = f"{value:.4g}"
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.4g}, {high:.4g}]"
    return text


def markdown(columns, metrics, cells) -> str:
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(fmt(cells.get((m, c))) for c in columns) + " |")
    return "\n".join(lines) + "\n\nValues with bootstrap 95% intervals over prompts (benchmarks: ±1.96 stderr).\n"


def plot(columns, metrics, cells, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(metrics)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        xs, ys, err = [], [], [[], []]
        for i, c in enumerate(columns):
            e = cells.get((m, c))
            if e is None or e.get("value") is None or not math.isfinite(e["value"]):
                continue
            low = e.get("low") if e.get("low") is not None and math.isfinite(e["low"]) else e["value"]
            high = e.get("high") if e.get("high") is not None and math.isfinite(e["high"]) else e["value"]
            xs.append(i)
            ys.append(e["value"])
            err[0].append(max(0.0, e["value"] - low))
            err[1].append(max(0.0, high - e["value"]))
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=4)
        if m.startswith(("win_rate", "lc_win_rate")):
            ax.axhline(50, color="grey", lw=0.8, ls="--")
        if m.startswith("loss_diff"):
            ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(columns) - 0.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
