"""Benchmarks through lm-evaluation-harness (optional extra: pip install 'montessori[eval]').

The student is passed in memory (HFLM(pretrained=model, tokenizer=tokenizer)), so a model that
`montessori.models.load_model` can load (GGUF, tiny-random, run-store HF dirs) is evaluated exactly as
the rest of montessori sees it. Task data comes from the datasets cache or a local task folder
(`include_path`); with HF_DATASETS_OFFLINE=1 nothing is downloaded. docs/experiments.md shows the
GPU commands for the paper's tasks (MMLU, ARC-C, GSM8K, HellaSwag, GPQA).
"""

from __future__ import annotations

import math

from montessori.errors import MontessoriError

# The paper's benchmarks as lm-evaluation-harness task names.
PAPER_TASKS = {"mmlu": "mmlu", "arc-c": "arc_challenge", "gsm8k": "gsm8k", "hellaswag": "hellaswag",
               "gpqa": "gpqa_main_zeroshot"}
# Which metric of a task's result we report (the harness reports several).
PRIMARY = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
           "exact_match,none")


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MontessoriError("benchmarks need lm-evaluation-harness: pip install 'montessori[eval]'") from None
    return lm_eval


def task_names(tasks: list[str]) -> list[str]:
    return [PAPER_TASKS.get(t.lower(), t) for t in tasks]


def run_benchmarks(model, tokenizer, tasks: list[str], *, batch_size: int = 8, num_fewshot: int | None = None,
                   limit: int | float | None = None, include_path: str | None = None, apply_chat_template: bool = False,
                   seed: int = 0) -> dict[str, dict]:
    """{task: {"metric", "value", "stderr", "low", "high"}} (values in percent) for one in-memory student."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = simple_evaluate(model=lm, tasks=task_names(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, apply_chat_template=apply_chat_template,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    return summarize(results["results"])


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Pick each task's primary metric; the interval is ±1.96 standard errors (the harness's stderr)."""
    out = {}
    for task, metrics in results.items():
        key = next((k for k in PRIMARY if isinstance(metrics.get(k), (int, float))), None)
        if key is None:
            continue
        name = key.split(",")[0]
        value = 100.0 * float(metrics[key])
        stderr = metrics.get(f"{name}_stderr,{key.split(',')[1]}")
        stderr = 100.0 * float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else float("nan")
        out[task] = {"metric": key, "value": value, "stderr": stderr,
                     "low": value - 1.96 * stderr, "high": value + 1.96 * stderr}
    return out
