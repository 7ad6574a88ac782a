"""The verdict at the top of `montessori analyze` and of the report: each next step, triggered by the
stage records of a run that should produce it (tests/shopfloor.py's hand-written run: 12 measured
probing candidates of three kinds, with eval results and a task split written as the stages write them)."""

from __future__ import annotations

import json
import re

import pytest

from montessori.analysis import analyze
from montessori.cli import main
from montessori.records import InfluenceResult
from montessori.report import write_report
from montessori.store import RunStore, atomic_write_json, read_jsonl, write_jsonl
from montessori.verdict import KINDS, MAX_GROWTH, WEAK_SHARE, verdict
from shopfloor import MEASURED, TASKS, make_measured_run, write_seeds

CODE, HOWTO, CLASSIFY = range(0, 4), range(4, 8), range(8, 12)  # MEASURED's kinds, in order


def set_influence(run, values: list[float]) -> None:
    """Replace the run's 12 measured influence values (MEASURED's order)."""
    path = RunStore(run).stage(1, "influence").path / "influence.jsonl"
    results = [r for r in read_jsonl(path, InfluenceResult) if r.influence is not None]
    assert len(results) == len(values) == len(MEASURED)
    write_jsonl(path, [InfluenceResult(id=r.id, influence=v, ref_loss_before=2.0, ref_loss_after=2.0 - v)
                       for r, v in zip(results, values)])


def write_eval(run, diff: float, low: float, high: float, examples: int = 8) -> None:
    """round-1/eval/results.json in the eval stage's shape (montessori/evaluation/stage.py)."""
    atomic_write_json(RunStore(run).stage(1, "eval").file("results.json"), {
        "prompts": {"examples": examples}, "round": 1,
        "loss": {"base": {"token_mean": 2.5}, "trained": {"token_mean": 2.5 + diff}},
        "loss_difference": {"trained - base": {"token_mean_diff": diff, "low": low, "high": high}}})


def write_split(run, fraction: float = 0.25) -> None:
    atomic_write_json(run / "tasks" / "split.json", {"source": "/data/shopfloor.csv", "eval_fraction": fraction})


MIXED = [0.1, -0.1, 0.1, -0.1] * 3  # every kind half helpful: no kind clearly helped, half the data did


def run_verdict(run) -> dict:
    summary, _ = analyze(run)
    v = summary["verdict"]
    assert v["kind"] in KINDS and v["lines"] and v["next_step"]
    return v


def test_nothing_measured_yet(tmp_path):
    run = tmp_path / "run"
    RunStore(run).stage(1, "instructions").path.mkdir(parents=True)
    v = run_verdict(run)
    assert v["kind"] == "not_measured" and f"montessori run {run}/config.yaml" in v["next_step"]
    assert v["lines"][0].startswith("Not evaluated yet")


def test_a_teacher_whose_candidates_mostly_hurt_is_replaced(tmp_path):
    run = make_measured_run(tmp_path / "run")
    set_influence(run, [-0.1] * 11 + [0.05])  # 1 of 12 helped: the 135M teacher (2% positive)
    write_split(run)
    v = run_verdict(run)
    assert v["kind"] == "stronger_teacher" and 1 / 12 < WEAK_SHARE
    assert "92% of the teacher's candidates made your student worse on your answers" in v["next_step"]
    assert "montessori init NEW_DIR --tasks /data/shopfloor.csv --teacher-url URL" in v["next_step"]
    assert "pip install 'montessori[qwen]'" in v["next_step"]
    assert "Of the 12 candidates the teacher wrote, 8% helped your student" in " ".join(v["lines"])


def test_a_kind_that_helped_is_steered_toward(tmp_path):
    run = make_measured_run(tmp_path / "run")  # code +0.5 to +0.8, how-to about 0, classification negative
    v = run_verdict(run)
    assert v["kind"] == "steer" and v["next_step"].startswith("kind 'code' helped")
    assert f"generation: {{steer: {{enabled: true, source: {run}, by: task_type}}}}" in v["next_step"]
    text = " ".join(v["lines"])
    assert "Kind that helped most: code (100% of 4 helped" in text and "least: classification (0% of 4" in text
    assert "The seed tasks by kind: 9 open question" in text and "The teacher's candidates: 4 classification" in text
    # The seeds have no code task: steering by task type would find none to show more of; by seed it does.
    write_seeds(run / "seeds.jsonl", [t for t in TASKS if "Python" not in t[0] and "SQL" not in t[0]])
    assert "by: seed}" in run_verdict(run)["next_step"]


def test_kinds_that_helped_alike_are_not_steered_between():
    """All candidates helped, the kinds' intervals overlap (as in the measured Japanese run): no kind
    stands out, so the next step follows the student's result, not a steer."""
    def kind(value, mean):
        return {"value": value, "n": 6, "mean": mean, "ci_low": mean - 0.0003, "ci_high": mean + 0.0003,
                "share_positive": 1.0}
    summary = {"run": "r", "measured": 18, "features": {"task_type": [kind("other", 0.0064), kind("how-to", 0.0062),
                                                                       kind("open question", 0.0061)]},
               "overall": {"share_positive": 1.0, "share_negative": 0.0, "mean": 0.0062, "ci_low": 0.006,
                           "ci_high": 0.0064}}
    better = {"loss_difference": {"trained - base": {"token_mean_diff": -0.046, "low": -0.058, "high": -0.037}},
              "prompts": {"examples": 8}, "loss": {}}
    assert verdict(summary, better).kind == "scale_up"
    assert verdict(summary, None).kind == "evaluate"
    apart = dict(summary, features={"task_type": [kind("other", 0.0074), kind("open question", 0.0061)]})
    assert verdict(apart, better).kind == "steer"  # the same kinds, apart: steer toward the one that stands out


def test_measured_but_not_evaluated(tmp_path):
    run = make_measured_run(tmp_path / "run")
    set_influence(run, MIXED)
    v = run_verdict(run)
    assert v["kind"] == "evaluate" and "the eval stage" in v["next_step"]


def test_an_unclear_result_asks_for_n_more_tasks(tmp_path):
    run = make_measured_run(tmp_path / "run")
    set_influence(run, MIXED)
    write_split(run, 0.25)
    # 8 held-out tasks, change -0.125 with interval +-0.25: the interval narrows as 1/sqrt(tasks), so
    # 8 * (0.25 / 0.125)^2 = 32 tasks give +-0.125: 24 more held out, 96 more in the file (a quarter held out).
    write_eval(run, -0.125, -0.375, 0.125)
    v = run_verdict(run)
    assert v["kind"] == "more_tasks" and v["lines"][0].startswith("No clear change in your student")
    assert ("add about 96 more tasks to /data/shopfloor.csv (24 more held out for evaluation)" in v["next_step"])
    assert "about 32 would narrow it to ±0.125" in v["next_step"]
    # A change near zero would need thousands: then 4 times today's held-out tasks, to halve the interval.
    write_eval(run, 0.0078125, -0.25, 0.2578125)
    v = run_verdict(run)
    assert v["kind"] == "more_tasks" and "add about 96 more tasks" in v["next_step"]
    assert "4 times as many held-out tasks halve the interval" in v["next_step"] and 8 * 32.5 ** 2 > MAX_GROWTH * 8
    # Without init --tasks's split: held-out examples to add to eval.prompts.
    (run / "tasks" / "split.json").unlink()
    assert "add about 24 more examples to eval.prompts" in run_verdict(run)["next_step"]


def test_a_student_that_improved_scales_up(tmp_path):
    run = make_measured_run(tmp_path / "run")
    set_influence(run, MIXED)
    write_eval(run, -0.2, -0.3, -0.1)
    v = run_verdict(run)
    assert v["kind"] == "scale_up" and "sft.num_pairs" in v["next_step"]
    assert v["lines"][0] == ("Your student got better at your tasks: on the 8 held-out tasks (tasks the run never "
                             "saw) it now predicts your answers more closely (loss on your answers 2.500 before, "
                             "2.300 after: change -0.200, 95% interval -0.300 to -0.100; lower is better).")


def test_a_student_that_got_worse_needs_a_stronger_teacher(tmp_path):
    run = make_measured_run(tmp_path / "run")
    set_influence(run, MIXED)
    write_eval(run, 0.032, 0.01, 0.05)  # the run: loss_diff +0.032
    v = run_verdict(run)
    assert v["kind"] == "stronger_teacher" and v["lines"][0].startswith("Your student got worse at your tasks")
    assert v["next_step"].startswith("training on the teacher's data made your student worse")


def test_a_held_out_task_that_repeats_a_reference_task_is_pointed_out(tmp_path):
    run = make_measured_run(tmp_path / "run")
    write_jsonl(run / "tasks" / "reference.jsonl", [{"id": "task-001", "instruction": TASKS[0][0]},
                                                    {"id": "task-002", "instruction": TASKS[1][0]}])
    write_jsonl(run / "tasks" / "eval.jsonl", [{"id": "task-003", "instruction": TASKS[0][0].replace("mean", "say")},
                                               {"id": "task-004", "instruction": TASKS[2][0]}])
    summary, _ = analyze(run)
    (repeat,) = summary["tasks"]["held_out_repeats"]
    assert (repeat["held_out"], repeat["reference"]) == ("task-003", "task-001") and repeat["rouge_l"] > 0.7
    assert any(line.startswith("Careful: 1 held-out task(s) nearly repeat") for line in summary["verdict"]["lines"])


def test_the_verdict_is_on_top_of_analyze_and_the_report(tmp_path, capsys):
    run = make_measured_run(tmp_path / "run")
    write_eval(run, -0.2, -0.3, -0.1)
    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Verdict\n") and "Next step: kind 'code' helped" in " ".join(out.split())
    assert out.index("Next step") < out.index("influence by task_type")
    assert json.loads((run / "analysis" / "summary.json").read_text())["verdict"]["kind"] == "steer"
    page = write_report(run).read_text()
    assert page.index("<div class=verdict><h2>Verdict</h2>") < page.index("Rounds at a glance")
    assert re.search(r"<strong>Next step:</strong> kind &#x27;code&#x27; helped", page)
    assert "<code>generation: {steer:" in page  # commands read as code
    md = (run / "report.md").read_text()
    assert md.index("## Verdict") < md.index("Rounds at a glance") and "**Next step:** kind 'code'" in md


@pytest.mark.parametrize("share, kind", [(0.2, "stronger_teacher"), (0.3, "evaluate")])
def test_the_weak_teacher_threshold(share, kind):
    summary = {"run": "r", "measured": 10, "overall": {"share_positive": share, "mean": 0.0, "ci_low": -1,
                                                     "ci_high": 1}, "features": {}}
    assert verdict(summary, None).kind == kind
