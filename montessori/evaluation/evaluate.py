"""Evaluate students: the library call behind `montessori eval` and the `eval` stage.

    results = evaluate(["tiny-random:0", "runs/a"], EvalConfig(judge={"model": "smollm2"}), out_dir="eval-out")

Every metric is computed for every student; win rates are against the first student (the
baseline, e.g. the Self-Instruct student, which then scores 50 by construction, as in the paper).
`results["metrics"]` is a flat list {metric, student, value, low, high[, baseline]}: what `compare`
tabulates (loss_diff, win_rate and lc_win_rate name the baseline they are relative to). With
`cfg.ifeval`, IFEval accuracies (ifeval/*) too, and the floor of answering with the prompt itself as
the student `prompt-as-answer` (montessori.evaluation.ifeval).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from montessori.config import EvalConfig
from montessori.evaluation import ifeval
from montessori.evaluation import loss as loss_metric
from montessori.evaluation.answers import (Conversation, DecodeSettings, conversations_from_pairs, prompt_set_hash,
                                           read_questions, student_answers)
from montessori.evaluation.students import Student, model_fingerprint, resolve_student, unique_names
from montessori.evaluation.winrate import grade_answers, grade_summary, judge_pairs, win_rate

log = logging.getLogger("montessori.eval")


def answers_cache_dir(student: Student, fallback: Path, run_answers: Callable[[Path], Path] | None = None) -> Path:
    """A run's students keep their answers in the run store (`run_answers(run_dir)`: the eval stage's
    evaluation.stage.answers_dir, RUN/eval/answers); others in `fallback`."""
    return run_answers(student.run_dir) if student.run_dir is not None and run_answers is not None else fallback


def metric(name: str, student: str, value: float, low: float | None = None, high: float | None = None,
           baseline: str | None = None) -> dict:
    entry = {"metric": name, "student": student, "value": value, "low": low, "high": high}
    return entry | ({"baseline": baseline} if baseline is not None else {})


def evaluate(students: Sequence[str | Student], cfg: EvalConfig, out_dir: str | Path, *, judge=None,
             device: str = "auto", dtype: str = "auto", lenient: bool = False, answers_dir: Path | None = None,
             run_answers: Callable[[Path], Path] | None = None, progress: bool = False, seed: int = 0) -> dict:
    """`answers_dir`: where answers are cached (default OUT/answers); `run_answers(run_dir)`: where the
    students that are run directories keep theirs (evaluation.stage.answers_dir)."""
    from montessori.models import load_model
    from montessori.readers import read_pairs
    out_dir = Path(out_dir)
    students = unique_names([s if isinstance(s, Student) else resolve_student(s) for s in students])
    read = read_pairs(cfg.prompts, lenient=lenient, limit=cfg.max_examples)
    pairs = read.records
    questions = read_questions(cfg.questions) if cfg.questions else None  # bad file: fail before any model loads
    ifeval_prompts = ifeval.read_prompts(cfg.ifeval, limit=cfg.ifeval_max_prompts) if cfg.ifeval else None
    samples = cfg.bootstrap_samples
    results: dict = {
        "students": [{"name": s.name, "spec": s.spec, "fingerprint": model_fingerprint(s.spec)} for s in students],
        "prompts": {"source": cfg.prompts, "examples": len(pairs), "skipped": len(read.skipped),
                    "hash": prompt_set_hash(conversations_from_pairs(pairs))},
        "loss": {}, "loss_difference": {}, "win_rate": {}, "grades": {}, "benchmarks": {}, "metrics": [],
    }
    metrics = results["metrics"]

    # 1. Reference-answer loss (and benchmarks, while the student is loaded).
    per_example = {}
    for s in students:
        model, tokenizer = load_model(s.spec, device=device, dtype=dtype)
        summary, per_example[s.name] = loss_metric.reference_answer_loss(
            model, tokenizer, pairs, batch_size=cfg.batch_size, max_length=cfg.max_length, samples=samples,
            seed=seed, progress=progress)
        results["loss"][s.name] = summary
        log.info("%s: reference-answer loss %.4f (perplexity %.2f) on %d examples", s.name, summary["token_mean"],
                 summary["perplexity"], len(pairs))
        metrics.append(metric("loss", s.name, summary["token_mean"], summary["token_mean_low"],
                              summary["token_mean_high"]))
        metrics.append(metric("perplexity", s.name, summary["perplexity"], summary["perplexity_low"],
                              summary["perplexity_high"]))
        if cfg.tasks:
            from montessori.evaluation.harness import run_benchmarks
            bench = run_benchmarks(model, tokenizer, cfg.tasks, batch_size=cfg.batch_size, seed=seed,
                                   include_path=cfg.task_path)
            results["benchmarks"][s.name] = bench
            for task, r in bench.items():
                metrics.append(metric(f"bench/{task}", s.name, r["value"], r["low"], r["high"]))
        del model
    baseline = students[0]
    for s in students[1:]:
        diff = loss_metric.difference(per_example[s.name], per_example[baseline.name], samples=samples, seed=seed)
        results["loss_difference"][f"{s.name} - {baseline.name}"] = diff
        metrics.append(metric("loss_diff", s.name, diff["token_mean_diff"], diff["low"], diff["high"],
                              baseline.name))

    # 2. Judged metrics: answers generated once per student and prompt set, then judged.
    if judge is not None:
        settings = DecodeSettings(cfg.temperature, cfg.max_new_tokens, cfg.batch_size, seed)
        fallback = answers_dir or out_dir / "answers"
        judge_key = hashlib.sha256(getattr(judge, "name", type(judge).__name__).encode()).hexdigest()[:8]
        if len(students) >= 2:
            convs = conversations_from_pairs(pairs)
            answers = {s.name: _answers(s, convs, settings, answers_cache_dir(s, fallback, run_answers), device, dtype,
                                        progress) for s in students}
            for s in students[1:]:
                cache = out_dir / "judgements" / (f"{judge_key}-{model_fingerprint(s.spec)}-"
                                                  f"{model_fingerprint(baseline.spec)}-{prompt_set_hash(convs)}"
                                                  f"-{settings.key()}.jsonl")
                judgements = judge_pairs(judge, convs, answers[s.name], answers[baseline.name], cache, progress)
                wr = win_rate(judgements, samples=samples, seed=seed)
                results["win_rate"][f"{s.name} vs {baseline.name}"] = wr
                log.info("%s vs %s: win rate %.1f%% [%.1f, %.1f], LC %.1f%%", s.name, baseline.name, wr["win_rate"],
                         wr["win_rate_low"], wr["win_rate_high"], wr["lc_win_rate"])
                metrics.append(metric("win_rate", s.name, wr["win_rate"], wr["win_rate_low"], wr["win_rate_high"],
                                      baseline.name))
                metrics.append(metric("lc_win_rate", s.name, wr["lc_win_rate"], wr["lc_win_rate_low"],
                                      wr["lc_win_rate_high"], baseline.name))
        if questions is not None:
            for s in students:
                ans = _answers(s, questions, settings, answers_cache_dir(s, fallback, run_answers), device, dtype,
                               progress)
                cache = out_dir / "grades" / (f"{judge_key}-{model_fingerprint(s.spec)}-{prompt_set_hash(questions)}"
                                              f"-{settings.key()}.jsonl")
                summary = grade_summary(grade_answers(judge, questions, ans, cache, progress), samples=samples,
                                        seed=seed)
                results["grades"][s.name] = summary
                metrics.append(metric("mt_score", s.name, summary["score"], summary.get("score_low"),
                                      summary.get("score_high")))

    # 3. Verifiable instruction following: greedy answers, checked by program (no judge).
    if ifeval_prompts is not None:
        settings = DecodeSettings(0.0, cfg.ifeval_max_new_tokens, cfg.batch_size, seed)
        convs = [Conversation(p.key, [p.prompt]) for p in ifeval_prompts]
        per_prompt, answer_files = {}, {}
        for s in students:
            answers, answer_files[s.name] = student_answers(
                s.spec, convs, settings, answers_cache_dir(s, answers_dir or out_dir / "answers", run_answers), device=device,
                dtype=dtype, progress=progress)
            per_prompt[s.name] = ifeval.score(ifeval_prompts, {k: a[0] for k, a in answers.items()})
        results["ifeval"] = ifeval_section(ifeval_prompts, per_prompt, cfg, samples, seed, answer_files)
        metrics.extend(ifeval_metrics(results["ifeval"], [s.name for s in students]))
    return results


def ifeval_section(prompts, per_prompt: dict, cfg: EvalConfig, samples: int, seed: int, answer_files: dict) -> dict:
    """eval.json's `ifeval`: each student's accuracies, the floor's, and paired differences (every
    student against the first, and against the floor)."""
    names = list(per_prompt)
    floor_results = ifeval.floor(prompts)
    section = {
        "source": cfg.ifeval, "prompts": len(prompts), "instructions": sum(len(p.instruction_id_list) for p in prompts),
        "hash": prompt_set_hash([Conversation(p.key, [p.prompt]) for p in prompts]),
        "max_new_tokens": cfg.ifeval_max_new_tokens, "checkers": ifeval.library_version(),
        "students": {n: ifeval.summarize(r, samples=samples, seed=seed) for n, r in per_prompt.items()},
        "floor": ifeval.summarize(floor_results, samples=samples, seed=seed),
        "difference": {f"{n} - {names[0]}": ifeval.difference(per_prompt[n], per_prompt[names[0]], samples=samples,
                                                              seed=seed) for n in names[1:]},
        "vs_floor": {f"{n} - {ifeval.FLOOR}": ifeval.difference(per_prompt[n], floor_results, samples=samples,
                                                                seed=seed) for n in names},
        "answers": {n: str(path) for n, path in answer_files.items()},
    }
    for n, summary in section["students"].items():
        log.info("%s: IFEval prompt-level loose %.3f, instruction-level loose %.3f on %d prompts", n,
                 summary["prompt_loose"], summary["inst_loose"], len(prompts))
    return section


def ifeval_metrics(section: dict, names: list[str]) -> list[dict]:
    """The flat entries of `metrics`: ifeval/<level> per student and for the floor (student
    `prompt-as-answer`), ifeval/<level>_diff of every other student against the first."""
    out = []
    for name, summary in [*((n, section["students"][n]) for n in names), (ifeval.FLOOR, section["floor"])]:
        out += [metric(f"ifeval/{lv}", name, summary[lv], summary[f"{lv}_low"], summary[f"{lv}_high"])
                for lv in ifeval.LEVELS]
    for name in names[1:]:
        diff = section["difference"][f"{name} - {names[0]}"]
        out += [metric(f"ifeval/{lv}_diff", name, diff[lv], diff[f"{lv}_low"], diff[f"{lv}_high"], names[0])
                for lv in ifeval.LEVELS]
    return out


def _answers(student: Student, convs: list[Conversation], settings: DecodeSettings, cache: Path, device: str,
             dtype: str, progress: bool) -> dict:
    answers, path = student_answers(student.spec, convs, settings, cache,
                                    device=device, dtype=dtype, progress=progress)
    log.info("%s: %d answers (%s)", student.name, len(answers), path)
    return answers


def make_configured_judge(cfg: EvalConfig, device: str = "auto", dtype: str = "auto"):
    if not cfg.judge.model:  # a base_url without a model is refused with the config (JudgeConfig)
        return None
    from montessori.evaluation.judge import make_judge
    return make_judge(cfg.judge.model, cfg.judge.base_url, api_key_env=cfg.judge.api_key_env,
                      device=device, dtype=dtype)
