"""lm-evaluation-harness wrapper: the student in memory, a task from local data (skipped without lm_eval)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from montessori.evaluation.harness import summarize, task_names

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness not installed (pip install 'montessori[eval]')")


def test_paper_task_names_and_primary_metric():
    assert task_names(["MMLU", "arc-c", "gsm8k", "hellaswag", "gpqa", "custom"]) == [
        "mmlu", "arc_challenge", "gsm8k", "hellaswag", "gpqa_main_zeroshot", "custom"]
    out = summarize({"hellaswag": {"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.4,
                                   "acc_norm_stderr,none": 0.02, "alias": "hellaswag"},
                     "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.005}})
    assert out["hellaswag"]["metric"] == "acc_norm,none" and out["hellaswag"]["value"] == pytest.approx(40.0)
    assert out["hellaswag"]["low"] == pytest.approx(40.0 - 1.96 * 2.0)
    assert out["gsm8k"]["value"] == pytest.approx(10.0)


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    import builtins
    from montessori.errors import MontessoriError
    from montessori.evaluation.harness import require_lm_eval
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(MontessoriError, match=r"montessori\[eval\]"):
        require_lm_eval()


@needs_lm_eval
def test_local_multiple_choice_task_on_the_in_memory_student(tiny_model, tmp_path):
    from montessori.evaluation.harness import run_benchmarks
    model, tokenizer = tiny_model
    data = tmp_path / "mc.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "seven"], "answer": 0}
            for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(f"""task: montessori_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    out = run_benchmarks(model, tokenizer, ["montessori_local_mc"], batch_size=4,
                         include_path=str(tmp_path / "tasks"))
    result = out["montessori_local_mc"]
    assert result["metric"] == "acc,none" and 0.0 <= result["value"] <= 100.0
    assert result["value"] * 6 / 100 == pytest.approx(round(result["value"] * 6 / 100))  # k of 6 right


@needs_lm_eval
def test_eval_command_runs_benchmarks(tmp_path):
    from montessori.cli import main
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}?", "choices": ["a", "b"], "answer": 1}) + "\n"
                            for i in range(4)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(f"""task: montessori_cli_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    out = tmp_path / "out"
    assert main(["eval", "tiny-random:0", "--tasks", "montessori_cli_mc", "--task-path", str(tmp_path / "tasks"),
                 "--max-examples", "2", "--max-length", "128", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert "bench/montessori_cli_mc" in {m["metric"] for m in results["metrics"]}
