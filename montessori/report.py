"""`montessori report RUN_DIR`: one page per run, read from the run store alone.

Writes RUN_DIR/report.html (self-contained: CSS inline, plots embedded as PNG) and RUN_DIR/report.md
(the same tables, no plots). At the top, the verdict in plain words (montessori.verdict: did the student
improve, how much of the teacher's data helped, which kinds, the next step). Per round: candidates
generated / filtered / duplicate / kept, the
influence distribution, preference pairs, DPO reward margin and accuracy per step, the SFT loss
curve, evaluation results when present, and the most and least influential instructions.
A stage that has not run yet is simply left out, so the report works on a partial run too.
"""

from __future__ import annotations

import errno
import html
import json
import os
import re
import statistics
from pathlib import Path

from montessori.errors import InputError, MontessoriError
from montessori.evaluation.stage import run_eval
from montessori.generation.stage import run_dataset, run_instructions, run_responses
from montessori.influence.mechanism import run_mechanism
from montessori.influence.stage import run_influence
from montessori.preferences.stage import run_preferences
from montessori.sections import ReportSection
from montessori.sections import figure as _figure
from montessori.sections import png as _png
from montessori.store import RunStore, read_jsonl
from montessori.training.dpo import run_dpo
from montessori.training.sft import run_sft

EXAMPLES = 5  # most / least influential instructions shown per round


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def generation_table(store: RunStore, round_: int) -> ReportSection | None:
    rows = []
    for writer, label in ((run_instructions, "probing instructions"), (run_dataset, "training data")):
        sd = store.stage(round_, writer)
        if not (sd.path / "candidates.jsonl").exists():
            continue
        kept = len(read_jsonl(sd.path / "candidates.jsonl"))
        dropped = [d.get("dropped") for d in read_jsonl(sd.path / "dropped.jsonl")]
        duplicate = sum(reason == "duplicate" for reason in dropped)
        rows.append([label, kept + len(dropped), len(dropped) - duplicate, duplicate, kept])
    if not rows:
        return None
    section = ReportSection("Generated candidates")
    section.tables.append((["stage", "generated", "filtered", "duplicate", "kept"], rows))
    reasons: dict[str, int] = {}
    for writer in (run_instructions, run_dataset):
        for d in read_jsonl(store.stage(round_, writer).path / "dropped.jsonl"):
            reasons[d.get("dropped") or "?"] = reasons.get(d.get("dropped") or "?", 0) + 1
    if reasons:
        section.notes.append("drop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return section


def influence_section(store: RunStore, round_: int) -> tuple[ReportSection | None, dict]:
    path = store.stage(round_, run_influence).path / "influence.jsonl"
    results = read_jsonl(path)
    if not results:
        return None, {}
    values = [r["influence"] for r in results if r.get("status") == "ok" and r.get("influence") is not None]
    invalid = len(results) - len(values)
    summary = {"measured": len(values), "invalid": invalid}
    section = ReportSection("Local data influence")
    if values:
        summary |= {"share_positive": sum(v > 0 for v in values) / len(values), "mean": statistics.fmean(values),
                    "median": statistics.median(values), "min": min(values), "max": max(values)}
        fig, ax = _figure()
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c72b0", edgecolor="white")
        ax.axvline(0, color="#c44e52", linewidth=1)
        ax.set_xlabel("influence I(z) = L(ref; warm) - L(ref; after one step on z)")
        ax.set_ylabel("candidates")
        section.plots.append((f"Influence of {len(values)} probing candidates (red line: 0)", _png(fig)))
    section.tables.append((list(summary), [[_fmt(v) for v in summary.values()]]))
    return section, summary


def examples_section(store: RunStore, round_: int) -> ReportSection | None:
    results = [r for r in read_jsonl(store.stage(round_, run_influence).path / "influence.jsonl")
               if r.get("status") == "ok" and r.get("influence") is not None]
    if not results:
        return None
    instructions = {c["id"]: c.get("instruction") or "" for c in
                    read_jsonl(store.stage(round_, run_instructions).path / "candidates.jsonl")}
    responses = {p.get("candidate_id") or p["id"]: p.get("instruction") or "" for p in
                 read_jsonl(store.stage(round_, run_responses).path / "pairs.jsonl")}
    ranked = sorted(results, key=lambda r: r["influence"], reverse=True)
    section = ReportSection("Most and least influential instructions")
    for label, chosen in (("most", ranked[:EXAMPLES]), ("least", ranked[::-1][:EXAMPLES])):
        rows = [[_fmt(r["influence"]), r["id"], instructions.get(r["id"]) or responses.get(r["id"], "")]
                for r in chosen]
        section.tables.append(([f"influence ({label})", "candidate", "instruction"], rows))
    return section


def preferences_section(store: RunStore, round_: int) -> tuple[ReportSection | None, dict]:
    manifest = store.stage(round_, run_preferences).manifest()
    if manifest is None:
        return None, {}
    counts = manifest["counts"]
    keys = ["rule", "pairs", "prompts", "prompts_with_pairs", "prompts_without_pair", "candidates", "positive",
            "negative"]
    section = ReportSection("Preference pairs")
    section.tables.append((keys, [[_fmt(counts.get(k)) for k in keys]]))
    return section, counts


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
    return [p[0] for p in points], [p[1] for p in points]


def dpo_section(store: RunStore, round_: int) -> tuple[ReportSection | None, dict]:
    sd = store.stage(round_, run_dpo)
    history = read_jsonl(sd.path / "metrics.jsonl")
    if not history:
        return None, {}
    section = ReportSection("Teacher DPO")
    fig, ax = _figure()
    steps, margins = _curve(history, "rewards/margins")
    ax.plot(steps, margins, color="#4c72b0", marker="o" if len(steps) < 30 else None, label="reward margin")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin (chosen - rejected)")
    _integer_steps(ax)
    ax2 = ax.twinx()
    steps_a, acc = _curve(history, "rewards/accuracies")
    ax2.plot(steps_a, acc, color="#dd8452", linestyle="--", label="reward accuracy")
    ax2.set_ylabel("reward accuracy")
    ax2.set_ylim(-0.05, 1.05)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    section.plots.append(("DPO reward margin and accuracy per step (training batches)", _png(fig)))
    counts = (sd.manifest() or {}).get("counts", {})
    keys = [k for k in ("pairs_train", "pairs_eval", "steps", "loss", "reward_margin", "reward_accuracy",
                        "eval_reward_margin", "eval_reward_accuracy") if k in counts]
    if keys:
        section.tables.append((keys, [[_fmt(counts[k]) for k in keys]]))
    return section, counts


def mechanism_section(store: RunStore, round_: int) -> ReportSection | None:
    path = store.stage(round_, run_mechanism).path / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    section = ReportSection("Mechanism check: fresh candidates of the updated vs the original teacher")
    rows = []
    for teacher in ("updated", "original"):
        e = summary.get(teacher, {})
        rows.append([teacher, e.get("candidates"), e.get("measured"),
                     f"{_fmt(e.get('mean_influence'))} [{_fmt(e.get('mean_influence_low'))}, "
                     f"{_fmt(e.get('mean_influence_high'))}]",
                     f"{_fmt(e.get('share_positive'))} [{_fmt(e.get('share_positive_low'))}, "
                     f"{_fmt(e.get('share_positive_high'))}]"])
    section.tables.append((["teacher", "candidates", "scored", "mean influence [95%]", "share positive [95%]"], rows))
    if "difference" in summary:
        d = summary["difference"]
        section.notes.append(f"updated - original mean influence {_fmt(d['mean_influence'])} "
                             f"[{_fmt(d['low'])}, {_fmt(d['high'])}] on the same {summary['prompts']} prompts, "
                             "scored on the same warm-up state (bootstrap over prompts)")
    return section


def sft_section(store: RunStore, round_: int) -> tuple[ReportSection | None, dict]:
    sd = store.stage(round_, run_sft)
    history = read_jsonl(sd.path / "metrics.jsonl")
    if not history:
        return None, {}
    section = ReportSection("Student SFT")
    steps, loss = _curve(history, "loss")
    fig, ax = _figure()
    ax.plot(steps, loss, color="#55a868", marker="o" if len(steps) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token loss")
    _integer_steps(ax)
    section.plots.append(("SFT training loss per step", _png(fig)))
    counts = (sd.manifest() or {}).get("counts", {})
    keys = [k for k in ("pairs", "steps", "loss_first", "loss_last", "loss_mean") if k in counts]
    if keys:
        section.tables.append((keys, [[_fmt(counts[k]) for k in keys]]))
    return section, counts


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(data, dict):
        return [kv for k, v in data.items() for kv in _flatten(v, f"{prefix}{k}.")]
    if isinstance(data, (int, float, str, bool)) or data is None:
        return [(prefix.rstrip("."), data)]
    return []  # lists (per-example records) are too long for a summary table


def eval_section(store: RunStore, round_: int) -> tuple[ReportSection | None, dict]:
    sd = store.stage(round_, run_eval)
    path = sd.path / "results.json"
    if not path.exists():
        return None, {}
    section = ReportSection("Evaluation")
    # The stage's headline numbers (its manifest counts) first, then every scalar of results.json.
    headline = (sd.manifest() or {}).get("counts", {})
    if headline:
        section.tables.append((list(headline), [[_fmt(v) for v in headline.values()]]))
    flat = _flatten(json.loads(path.read_text()))
    section.tables.append((["metric", "value"], [[k, _fmt(v)] for k, v in flat]))
    return section, headline or dict(flat)


def stage_table(store: RunStore) -> ReportSection:
    """One row per stage, one column per round: state and seconds."""
    from montessori.pipeline import stage_status
    rounds = store.rounds()
    cells: dict[str, dict[int, str]] = {}
    for r in stage_status(store):
        seconds = f" ({r['seconds']:.1f} s)" if r["seconds"] is not None else ""
        cells.setdefault(r["stage"], {})[r["round"]] = r["state"] + seconds
    section = ReportSection("Stages")
    section.tables.append((["stage"] + [f"round {r}" for r in rounds],
                           [[name] + [row.get(r, "") for r in rounds] for name, row in cells.items()]))
    return section


def build_sections(run_dir: Path) -> tuple[dict, list[ReportSection], list[tuple[int, list[ReportSection]]]]:
    """(the verdict, the sections above the rounds, each round's sections)."""
    store = RunStore(run_dir)
    overview: list[list] = []
    rounds = []
    for round_ in store.rounds():
        influence, inf = influence_section(store, round_)
        preferences, pc = preferences_section(store, round_)
        dpo, dc = dpo_section(store, round_)
        sft, sc = sft_section(store, round_)
        evaluation, ec = eval_section(store, round_)
        sections = [s for s in (generation_table(store, round_), influence, examples_section(store, round_), preferences,
                                dpo, mechanism_section(store, round_), sft, evaluation) if s is not None]
        rounds.append((round_, sections))
        overview.append([round_, _fmt(inf.get("measured")), _fmt(inf.get("share_positive")), _fmt(pc.get("pairs")),
                         _fmt(dc.get("reward_margin")), _fmt(sc.get("loss_last")),
                         "; ".join(f"{k} {_fmt(v)}" for k, v in list(ec.items())[:4])])
    summary = ReportSection("Rounds at a glance")
    summary.tables.append((["round", "influence measured", "share positive", "pairs", "DPO final margin",
                            "SFT final loss", "evaluation"], overview))
    from montessori.analysis import analyze, report_sections  # which kinds of candidates helped, across rounds
    analysis, _ = analyze(run_dir)
    return analysis["verdict"], [summary, stage_table(store)] + report_sections(run_dir, analysis), rounds


def _config_line(run_dir: Path) -> str:
    path = run_dir / "config.resolved.yaml"
    if not path.exists():
        path = run_dir / "config.yaml"
    if not path.exists():
        return ""
    import yaml
    cfg = yaml.safe_load(path.read_text()) or {}
    models = cfg.get("models", {})
    return (f"{cfg.get('name', '')}: method {cfg.get('method', '')}, {cfg.get('rounds', '')} round(s), "
            f"teacher {models.get('teacher', '')}, student {models.get('student', '')}")


def render_html(run_dir: Path, head: list[ReportSection], rounds: list[tuple[int, list[ReportSection]]],
                verdict: dict | None = None) -> str:
    e = html.escape

    def code(text: str) -> str:  # `commands` in the verdict read as code
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", e(text))

    def section_html(s: ReportSection, level: int) -> str:
        parts = [f"<h{level}>{e(s.title)}</h{level}>"]
        for header, rows in s.tables:
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, png in s.plots:
            parts.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{png}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        parts += [f"<p class=note>{e(n)}</p>" for n in s.notes]
        return "\n".join(parts)

    body = [f"<h1>Montessori-Instruct run report</h1><p>{e(str(run_dir))}<br>{e(_config_line(run_dir))}</p>"]
    if verdict:
        body.append("<div class=verdict><h2>Verdict</h2>" + "".join(f"<p>{code(line)}</p>" for line in verdict["lines"])
                    + f"<p><strong>Next step:</strong> {code(verdict['next_step'])}</p></div>")
    body += [section_html(s, 2) for s in head]
    for round_, sections in rounds:
        body.append(f"<h2>Round {round_}</h2>")
        body += [section_html(s, 3) for s in sections] or ["<p>No stage of this round has output yet.</p>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top;max-width:700px}th{background:#f3f3f3}h2{border-bottom:2px solid #444;"
             "margin-top:2em}figure{margin:.5em 0}figcaption{font-size:.9em;color:#555}.note{color:#555}"
             ".verdict{border-left:5px solid #4c72b0;background:#f4f7fb;padding:.2em 1.2em 1em;margin:1em 0}"
             ".verdict h2{border:0;margin-top:.5em}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>montessori report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_markdown(run_dir: Path, head: list[ReportSection], rounds: list[tuple[int, list[ReportSection]]],
                    verdict: dict | None = None) -> str:
    def cell(v) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    def section_md(s: ReportSection, level: int) -> list[str]:
        out = [f"{'#' * level} {s.title}", ""]
        for header, rows in s.tables:
            out += ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("")
        out += [f"_{caption}: plot in report.html_" for caption, _ in s.plots]
        out += [n for n in s.notes]
        return out + [""]

    lines = ["# Montessori-Instruct run report", "", f"{run_dir}  ", _config_line(run_dir), ""]
    if verdict:
        lines += ["## Verdict", ""] + [x for line in verdict["lines"] for x in (line, "")]
        lines += [f"**Next step:** {verdict['next_step']}", ""]
    for s in head:
        lines += section_md(s, 2)
    for round_, sections in rounds:
        lines += [f"## Round {round_}", ""]
        for s in sections:
            lines += section_md(s, 3)
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html and report.md into RUN_DIR, or into the folder `out` (created; the run is then
    only read); returns the HTML path."""
    from montessori.store import atomic_write_text
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not RunStore(run_dir).rounds():
        raise InputError(f"{run_dir}: not a run directory (no round-N folders)")
    folder = run_dir if out is None else Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder}: not a directory (the report is written into a folder)")
    if out is None and not os.access(run_dir, os.W_OK):  # known before the report is built (seconds)
        code = errno.EROFS if os.statvfs(run_dir).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), str(run_dir))
    verdict, head, rounds = build_sections(run_dir)
    atomic_write_text(folder / "report.md", render_markdown(run_dir, head, rounds, verdict))
    atomic_write_text(folder / "report.html", render_html(run_dir, head, rounds, verdict))
    return folder / "report.html"


def cmd_report(args) -> int:
    try:
        path = write_report(args.run_dir, args.out)
    except OSError as err:
        if args.out is not None or err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC,
                                                     errno.EDQUOT):
            raise  # the CLI names the path and the reason
        # Into the run only when it can be written (a run read from a read-only copy, another user's run).
        raise MontessoriError(f"{args.run_dir}: {err.strerror}: the report cannot be written into the run; "
                              f"write it elsewhere: montessori report {args.run_dir} --out DIR") from None
    print(f"report: {path} (and {path.with_suffix('.md')})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html and report.md from a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", metavar="DIR", help="write report.html and report.md into DIR instead of the run "
                   "(for a run you cannot write into)")
    p.set_defaults(func=cmd_report)
