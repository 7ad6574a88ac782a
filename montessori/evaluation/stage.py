"""Stage `eval`: the round's trained student against the student that entered the round.

Both are scored on the reference-answer loss over `eval.prompts` (and, when configured, judged and
benchmarked); results.json holds both, the difference with a paired bootstrap interval, and the
flat metric list `montessori compare` reads. Answers are cached in RUN/eval/answers, outside the
stage folder, so re-running the stage with another judge does not regenerate them.
"""

from __future__ import annotations

from pathlib import Path

from montessori.context import stage
from montessori.keys import STUDENT
from montessori.evaluation.evaluate import evaluate, make_configured_judge
from montessori.evaluation.students import Student
from montessori.store import StageDir, atomic_write_json

RESULTS = "results.json"


def answers_dir(run_dir: Path) -> Path:
    """Where a run's students keep their sampled answers (RUN/eval/answers), shared by this stage and
    `montessori eval` of the run directory: answers are sampled once per student and prompt set."""
    return Path(run_dir) / run_eval.stage.name / "answers"


@stage("eval", keys=STUDENT + tuple(f"eval.{k}" for k in (
           "prompts", "max_examples", "batch_size", "max_length", "bootstrap_samples", "temperature",
           "max_new_tokens", "judge.model", "judge.base_url", "questions", "tasks", "task_path", "ifeval",
           "ifeval_max_prompts", "ifeval_max_new_tokens")) + ("data.lenient", "method", "seed"),
       inputs=("sft",), files=("eval.prompts", "eval.questions", "eval.task_path", "eval.ifeval"),
       models=("student",), baseline=True)
def run_eval(ctx, sft: StageDir) -> dict:
    cfg, models = ctx.config.eval, ctx.config.models
    trained = sft.path / "model"
    students = [Student("base", ctx.student_spec()), Student("trained", str(trained))]
    judge = make_configured_judge(cfg, models.device, models.dtype)
    results = evaluate(students, cfg, ctx.dir.path, judge=judge, device=models.device, dtype=models.dtype,
                       lenient=ctx.config.data.lenient, answers_dir=answers_dir(ctx.store.root), run_answers=answers_dir,
                       progress=ctx.progress, seed=ctx.config.seed)
    results["round"] = ctx.round
    results["method"] = ctx.config.method
    results["name"] = ctx.config.name
    atomic_write_json(ctx.dir.file(RESULTS), results)
    diff = results["loss_difference"]["trained - base"]
    counts = {"examples": results["prompts"]["examples"],
              "loss_base": results["loss"]["base"]["token_mean"],
              "loss_trained": results["loss"]["trained"]["token_mean"],
              "loss_diff": diff["token_mean_diff"], "loss_diff_low": diff["low"], "loss_diff_high": diff["high"]}
    for key, wr in results["win_rate"].items():
        counts["win_rate"], counts["lc_win_rate"] = wr["win_rate"], wr["lc_win_rate"]
    for name, grades in results["grades"].items():
        counts[f"mt_score_{name}"] = grades["score"]
    return counts
